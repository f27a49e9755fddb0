"""Control methods that look inside the guest: event channels (QMP's xen-event-list and
xen-event-inject), guest memory (QMP's pmemsave and memsave, and x-read-memory and
x-write-memory for a few bytes inline) and registers (query-vcpus with registers=true, in methods.py)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from xend_lite.daemon.params import Param, ParamError, int_range, opt, string, u64
from xend_lite.daemon.rpc import RpcContext, method

U32_MAX = (1 << 32) - 1
CPU_INDEX = int_range(0, 4095)


@method("xen-event-list")
async def xen_event_list(ctx: RpcContext) -> Any:
    """Every event channel port in use: port, vcpu, type, remote-domain, target, pending,
    masked."""
    return await ctx.controller.query("xen_event_list")


@method("xen-event-inject", Param("port", int_range(0, U32_MAX)))
async def xen_event_inject(ctx: RpcContext, port: int) -> None:
    """Set a port pending and deliver its upcall, as its remote end's send would."""
    await ctx.controller.xen_event_inject(port)


@method("pmemsave", Param("val", u64), Param("size", u64), Param("filename", string))
async def pmemsave(ctx: RpcContext, val: int, size: int, filename: str) -> Any:
    """Write guest-physical memory [val, val+size) to a new file in the snapshot directory."""
    return await ctx.controller.memory_dump(filename, val, size, None)


@method("memsave", Param("val", u64), Param("size", u64), Param("filename", string),
        opt("cpu-index", CPU_INDEX, 0))
async def memsave(ctx: RpcContext, val: int, size: int, filename: str, **kw: Any) -> Any:
    """Write guest-virtual memory (in vCPU cpu-index's paging) to a new file in the
    snapshot directory."""
    return await ctx.controller.memory_dump(filename, val, size, kw["cpu-index"])


@method("x-read-memory", opt("gpa", u64, None), opt("gva", u64, None),
        Param("size", int_range(1, 4096)), opt("cpu-index", CPU_INDEX, 0))
async def x_read_memory(ctx: RpcContext, gpa: int | None, gva: int | None, size: int,
                        **kw: Any) -> Any:
    """Up to 4096 bytes of guest memory, base64: at gpa (guest-physical) or at gva
    (guest-virtual in vCPU cpu-index's paging); exactly one of the two."""
    if (gpa is None) == (gva is None):
        raise ParamError("gpa", "give exactly one of 'gpa' and 'gva'")
    cpu = None if gva is None else kw["cpu-index"]
    addr = gpa if gva is None else gva
    data = await ctx.controller.read_memory(addr, size, cpu)
    out = {"size": len(data), "data": base64.b64encode(data).decode("ascii")}
    out["gpa" if gva is None else "gva"] = addr
    return out


def base64_data(v: Any) -> bytes:
    if not isinstance(v, str):
        raise ValueError("must be a base64 string")
    try:
        data = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be valid base64") from None
    if not 1 <= len(data) <= 4096:
        raise ValueError("must decode to 1..4096 bytes")
    return data


@method("x-write-memory", Param("gpa", u64), Param("data", base64_data))
async def x_write_memory(ctx: RpcContext, gpa: int, data: bytes) -> Any:
    """Write up to 4096 bytes (base64) at a guest-physical address, as the guest would see
    them (an overlay page included); only while the VM is paused."""
    await ctx.controller.write_memory(gpa, data)
    return {"gpa": gpa, "size": len(data)}
