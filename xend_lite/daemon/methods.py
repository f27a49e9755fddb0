"""The control plane's methods, by QMP's names. Each only names its parameters and asks the
controller; the controller runs the work on the VM owner."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import xend_lite
from xend_lite.daemon.params import Param, boolean, int_range, opt, string, u64
from xend_lite.daemon.rpc import METHODS, RpcContext, method
from xend_lite.daemon.runstate import qmp_name
from xend_lite.errors import InvalidArgument

__all__ = ["METHODS", "xend_lite_version"]


@method("query-version", on_loop=True)
async def query_version(ctx: RpcContext) -> dict:
    """The daemon's version and the Xen version the guest sees."""
    parts = [int(p) if p.isdigit() else 0 for p in (xend_lite_version().split(".") + ["0", "0"])[:3]]
    spec = getattr(ctx.controller, "_spec", None)
    return {"xend-lite": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
            "package": f"xend-lite {xend_lite_version()}",
            "xen": getattr(spec, "xen_version", None)}


def xend_lite_version() -> str:
    v = getattr(xend_lite, "__version__", None)
    if v:
        return str(v)
    try:
        from importlib.metadata import version

        return version("xend-lite")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0.0.0"


@method("query-status", on_loop=True)
async def query_status(ctx: RpcContext) -> dict:
    """The run state, answered from the loop so it is seen even during a save: ``status``
    is the daemon's name, ``qmp-status`` QMP's (prelaunch, save-vm, restore-vm...)."""
    c = ctx.controller
    state = c.state
    return {"status": state.value, "running": state.value == "running", "singlestep": False,
            "qmp-status": qmp_name(state, getattr(c, "stop_reason", None))}


@method("query-capabilities")
async def query_capabilities(ctx: RpcContext) -> Any:
    return await ctx.controller.query("query_capabilities")


@method("query-vcpus", opt("registers", boolean, False))
async def query_vcpus(ctx: RpcContext, registers: bool) -> Any:
    """Each vCPU's state; registers=true adds its general, segment and control registers
    (read with the vCPUs held out of the guest for a moment)."""
    vcpus = await ctx.controller.query("query_vcpus")
    if registers:
        for v, regs in zip(vcpus, await ctx.controller.query_registers()):
            v.update(regs)
    return vcpus


@method("query-memory-map")
async def query_memory_map(ctx: RpcContext) -> Any:
    return await ctx.controller.query("query_memory_map")


@method("query-console", opt("max_bytes", int_range(0, 1 << 20), 4096))
async def query_console(ctx: RpcContext, max_bytes: int) -> Any:
    """The last max_bytes of guest console output (UTF-8, invalid bytes replaced)."""
    return {"data": await ctx.controller.query("query_console", max_bytes)}


@method("query-hypercalls")
async def query_hypercalls(ctx: RpcContext) -> Any:
    return await ctx.controller.query("query_hypercalls")


@method("stop")
async def stop(ctx: RpcContext) -> None:
    await ctx.controller.stop()


@method("cont")
async def cont(ctx: RpcContext) -> None:
    await ctx.controller.cont()


@method("system_reset")
async def system_reset(ctx: RpcContext) -> None:
    await ctx.controller.system_reset()


@method("quit", on_loop=True)
async def quit_(ctx: RpcContext) -> None:
    """Stop the daemon (exit status 0) once this reply has been sent."""
    if ctx.daemon is not None:
        ctx.after_reply.append(lambda: ctx.daemon.request_exit(0, "quit requested over RPC"))


@method("query-xen-overlay")
async def query_xen_overlay(ctx: RpcContext) -> Any:
    return await ctx.controller.query("query_xen_overlay")


@method("xen-overlay-map", Param("page", string), Param("gpa", u64), opt("force", boolean, False))
async def xen_overlay_map(ctx: RpcContext, page: str, gpa: int, force: bool) -> Any:
    """Map or move a page; one the guest mapped itself needs force=true (it is not told)."""
    return await ctx.controller.overlay_map(page, gpa, force)


@method("xen-overlay-unmap", Param("page", string), opt("force", boolean, False))
async def xen_overlay_unmap(ctx: RpcContext, page: str, force: bool) -> Any:
    return await ctx.controller.overlay_unmap(page, force)


@method("snapshot-save", Param("path", string), opt("paused", boolean, False))
async def snapshot_save(ctx: RpcContext, path: str, paused: bool) -> Any:
    """Pause, save, and resume unless paused=true (or it was paused already)."""
    return await ctx.controller.snapshot_save(path, paused)


@method("snapshot-load", Param("path", string), opt("verify", boolean, True))
async def snapshot_load(ctx: RpcContext, path: str, verify: bool) -> Any:
    """Load a snapshot; verify=false skips the guest-memory checksums (the fastest restore)."""
    return await ctx.controller.snapshot_load(path, verify)


@method("query-snapshot", Param("path", string))
async def query_snapshot(ctx: RpcContext, path: str) -> Any:
    return await ctx.controller.snapshot_describe(path)


@method("query-commands", on_loop=True)
async def query_commands(ctx: RpcContext) -> list[dict]:
    """Every method with its parameters (QMP has the same)."""
    return [{"name": m.name, "params": [{"name": p.name, "required": p.required} for p in m.params]}
            for m in sorted(METHODS.values(), key=lambda m: m.name)]


# -- the guest's console and xenstore -----------------------------------------------------
# The operator types into the PV console ring and acts on the guest's xenstore as domain 0,
# the toolstack. xenstore errors keep xenstored's name in the error's data ("errno").

CONSOLE_WRITE_MAX = 64 * 1024          # bytes of input one console-write takes at most
XS_VALUE_MAX = 4096                    # XENSTORE_PAYLOAD_MAX: a value never exceeds it


def _console_text(v: Any) -> bytes:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    data = v.encode("utf-8", "surrogatepass")
    if len(data) > CONSOLE_WRITE_MAX:
        raise ValueError(f"must be at most {CONSOLE_WRITE_MAX} bytes")
    return data


def _console_base64(v: Any) -> bytes:
    if not isinstance(v, str) or len(v) > CONSOLE_WRITE_MAX * 4 // 3 + 4:
        raise ValueError(f"must be base64 of at most {CONSOLE_WRITE_MAX} bytes")
    try:
        data = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None
    if len(data) > CONSOLE_WRITE_MAX:
        raise ValueError(f"must be at most {CONSOLE_WRITE_MAX} bytes")
    return data


def _xs_path(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("must be a non-empty string (a xenstore path)")
    return v


def _xs_value(v: Any) -> bytes:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    data = v.encode("utf-8")
    if len(data) > XS_VALUE_MAX:
        raise ValueError(f"must be at most {XS_VALUE_MAX} bytes (UTF-8)")
    return data


@method("console-write", opt("data", _console_text, None), opt("data-base64", _console_base64, None))
async def console_write(ctx: RpcContext, **kw: Any) -> Any:
    """Type into the guest's PV console (data: UTF-8 text, or data-base64: bytes; one of
    them, at most 64 KiB). Returns {"taken": bytes queued, "pending": bytes the guest has not
    read yet}; taken < the length given means the input queue is full."""
    text, raw = kw["data"], kw["data-base64"]
    if (text is None) == (raw is None):
        raise InvalidArgument("give exactly one of 'data' and 'data-base64'")
    return await ctx.controller.console_write(text if raw is None else raw)


def _decode_value(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        from xend_lite.xen.xenstore.server import escape   # loaded by the read already

        return escape(value)


@method("xenstore-read", Param("path", _xs_path))
async def xenstore_read(ctx: RpcContext, path: str) -> Any:
    """A node's value (UTF-8; other bytes as \\xNN). Relative paths are under the guest's
    /local/domain/<domid>."""
    return {"value": _decode_value(await ctx.controller.xenstore("read", path))}


@method("xenstore-write", Param("path", _xs_path), Param("value", _xs_value))
async def xenstore_write(ctx: RpcContext, path: str, value: bytes) -> None:
    """Write a node as domain 0 (parents are created); the guest's watches fire."""
    await ctx.controller.xenstore("write", path, value)


@method("xenstore-rm", Param("path", _xs_path))
async def xenstore_rm(ctx: RpcContext, path: str) -> None:
    """Remove a node and everything under it; the guest's watches fire."""
    await ctx.controller.xenstore("rm", path)


@method("xenstore-ls", Param("path", _xs_path), opt("recursive", boolean, False))
async def xenstore_ls(ctx: RpcContext, path: str, recursive: bool) -> Any:
    """{"value", "perms", "children": {name: {...}}} at path: its children, or with
    recursive=true the whole subtree."""
    tree = await ctx.controller.xenstore("ls", path)
    if not recursive:
        for child in tree["children"].values():
            child["children"] = {}
    return tree


@method("system_powerdown")
async def system_powerdown(ctx: RpcContext) -> None:
    """Ask the guest to power off (control/shutdown = "poweroff", as a toolstack does) and
    return at once; the guest stops later, with reason poweroff, if it acts on the request."""
    await ctx.controller.system_powerdown()


# -- long jobs, looking inside the guest (inspect.py registers its own methods) --------------

@method("query-snapshot-job", on_loop=True)
async def query_snapshot_job(ctx: RpcContext) -> dict:
    """The snapshot save or load running now: status "active" with kind, path, percent,
    bytes, total and seconds; status "none" when there is none. Answered from the loop."""
    return ctx.controller.snapshot_job()


from xend_lite.daemon import inspect as _inspect  # noqa: E402,F401
