"""The hypercall page and the hypercall path, from the vCPU's exit to RAX.

A stub in the hypercall page is ``mov $nr, %eax; out %al, $HYPERCALL_PORT; ret``: the same
bytes work in 64-bit and 32-bit code and change no register but RAX. The port write reaches
the vCPU thread's hot path (a machine doorbell) with the call already decoded in C for the
caller's mode (native.DECODE_CALL); :meth:`Hypercalls.on_hypercall` runs the one handler the
table names and returns RAX, which the vCPU loop gives the guest with its next KVM_RUN.

Handlers behave as Xen does toward an unprivileged HVM guest: its numbers, its structs, its
errno values, its order of argument checks. A handler raises XenError for a failure; any
other exception is a bug, counted and answered with -EINVAL, never allowed out of the vCPU
loop. The table itself is built in one place, ``dispatch.py``.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Callable

from xend_lite.machine.backing import PAGE_SIZE
from xend_lite.xen.abi import Layout, guest_layout
from xend_lite.xen.dispatch import WHOLE_CALLS
from xend_lite.xen.errors import XenError
from xend_lite.xen.guestview import GuestView
from xend_lite.xen.native import CALL_LONG, CALL_USER, CALL_WAKE
from xend_lite.xen.xenabi import X, all_constants

if TYPE_CHECKING:
    from xend_lite.machine.guestmem import GuestMemory
    from xend_lite.machine.vcpu import VcpuRunner
    from xend_lite.xen.native import NativeHypercalls

log = logging.getLogger("xend_lite.xen")

HYPERCALL_PORT = 0xE4
STUB_SIZE = 32
NR_STUBS = PAGE_SIZE // STUB_SIZE
TABLE_SIZE = 64
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

HYPERCALL_NAMES: dict[int, str] = {v: n.removeprefix("__HYPERVISOR_")
                                   for n, v in all_constants("__HYPERVISOR_").items()}
#: refused to an unprivileged guest with -EPERM, as Xen's XSM does
PRIVILEGED = {X.__HYPERVISOR_platform_op, X.__HYPERVISOR_sysctl, X.__HYPERVISOR_domctl,
              X.__HYPERVISOR_kexec_op, X.__HYPERVISOR_dm_op}
_EPERM, _ENOSYS, _EINVAL = -X.XEN_EPERM, -X.XEN_ENOSYS, -X.XEN_EINVAL


def stub(nr: int) -> bytes:
    """One hypercall stub: mov $nr,%eax; out %al,$port; ret; padded with int3."""
    code = b"\xb8" + nr.to_bytes(4, "little") + bytes([0xE6, HYPERCALL_PORT, 0xC3])
    return code.ljust(STUB_SIZE, b"\xcc")


HYPERCALL_PAGE = b"".join(stub(i) for i in range(NR_STUBS))


class Call:
    """One hypercall in progress on one vCPU: its mode and its view of guest memory."""

    __slots__ = ("mem", "runner", "vcpu", "index", "long_mode", "_view")

    def __init__(self, mem: GuestMemory, runner: VcpuRunner):
        self.mem = mem
        self.runner = runner
        self.vcpu = runner.vcpu
        self.index = runner.index
        self.long_mode = False
        self._view: GuestView | None = None

    @property
    def view(self) -> GuestView:
        """Guest-virtual memory as the calling vCPU sees it now (made on first use)."""
        if self._view is None:
            self._view = GuestView.for_vcpu(self.mem, self.vcpu, self.long_mode)
        return self._view

    def lay(self, name: str) -> Layout:
        return guest_layout(name, self.long_mode)

    def read(self, name: str, gva: int) -> dict[str, int]:
        return self.view.read_struct(self.lay(name), gva)

    def write(self, name: str, gva: int, **values: int) -> None:
        self.view.write_fields(self.lay(name), gva, values)

    @property
    def ulong(self) -> int:
        return 8 if self.long_mode else 4


Handler = Callable[..., int]


def _arity(fn: Handler) -> int:
    """How many argument registers a handler takes (it is called with exactly those): its
    parameters after the Call, or 5 with *args. A plain function or method is read from
    its code object (inspect.signature cost 0.2 ms for a new domain's handlers); anything
    else (a wrapped function, a partial) through inspect.signature."""
    func = getattr(fn, "__func__", fn)
    code = getattr(func, "__code__", None)
    if code is None or hasattr(func, "__wrapped__") or not inspect.isfunction(func):
        params = list(inspect.signature(fn).parameters.values())[1:]
        return 5 if any(p.kind == p.VAR_POSITIONAL for p in params) else len(params)
    if code.co_flags & inspect.CO_VARARGS:
        return 5
    n = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & inspect.CO_VARKEYWORDS)
    return n - (2 if func is not fn else 1)      # self (when bound) and the Call


class Hypercalls:
    """The dispatcher: a table of handlers and the counters of what the guest called."""

    def __init__(self, mem: GuestMemory, table: dict[int, Handler],
                 native: NativeHypercalls | None = None,
                 wake: Callable[[], None] = lambda: None):
        self.mem = mem
        self.native = native
        self.wake = wake             # wakes vCPUs blocked for an event (CALL_WAKE)
        # the native counters only grow: reading subtracts what they were at the last reset
        self._native_base = ([0] * (TABLE_SIZE + 1), [0] * (TABLE_SIZE + 1))
        self._table: list[tuple[Handler, int] | None] = [None] * TABLE_SIZE
        for nr, fn in table.items():
            self._table[nr] = (fn, _arity(fn))
        self._calls: dict[int, Call] = {}
        self.calls = [0] * (TABLE_SIZE + 1)
        self.errors = [0] * (TABLE_SIZE + 1)
        self.errnos: dict[tuple[int, int], int] = {}     # (slot, Xen errno) -> errors
        self.internal_errors = 0

    def served(self) -> dict[str, str]:
        """Which hypercalls have a handler, by name, and who serves them."""
        out = {HYPERCALL_NAMES.get(nr, str(nr)): "python"
               for nr, e in enumerate(self._table) if e is not None}
        if self.native is not None and self.native.enabled:
            for op, subop in self.native.slots:
                name = HYPERCALL_NAMES.get(op, str(op))
                out[name if op in WHOLE_CALLS else f"{name}/{subop}"] = "native"
        return out

    def on_hypercall(self, runner: VcpuRunner) -> int:
        # The hot path of every hypercall: the call arrives decoded for the caller's mode,
        # one Call object per vCPU is reused, and the result goes back to the vCPU loop.
        nr, flags, a1, a2, a3, a4, a5 = runner.vcpu.hook_values(7)
        mask = U64 if flags & CALL_LONG else U32
        if flags & CALL_WAKE:        # served and counted in C; a blocked vCPU may wait for it
            self.wake()
            return a1 & mask
        if flags & CALL_USER:
            ret = _EPERM             # not from the guest kernel: Xen refuses
        else:
            entry = self._table[nr] if nr < TABLE_SIZE else None
            if entry is None:
                ret = _EPERM if nr in PRIVILEGED else _ENOSYS
            else:
                fn, nargs = entry
                c = self._calls.get(runner.index)
                if c is None:
                    c = self._calls[runner.index] = Call(self.mem, runner)
                c.long_mode = flags & CALL_LONG != 0
                c._view = None
                try:
                    # exactly as many arguments as the handler takes
                    ret = (fn(c, a1, a2) if nargs == 2 else
                           fn(c, a1, a2, a3) if nargs == 3 else
                           fn(c, *(a1, a2, a3, a4, a5)[:nargs]))
                except XenError as exc:
                    ret = -exc.errno
                except Exception:  # noqa: BLE001 - a handler bug must not reach the vCPU loop
                    return self._handler_failed(nr) & mask
        slot = nr if nr < TABLE_SIZE else TABLE_SIZE
        self.calls[slot] += 1
        if ret < 0:
            self._count_error(slot, -ret)
        return ret & mask

    def _count_error(self, slot: int, errno: int) -> None:
        self.errors[slot] += 1
        key = (slot, errno)
        self.errnos[key] = self.errnos.get(key, 0) + 1

    def _handler_failed(self, nr: int) -> int:
        """A handler raised: the guest gets -EINVAL, and the call is counted (as a call and
        an error) before the internal error is, so whoever sees the internal error sees the
        call too."""
        self.calls[nr] += 1
        self._count_error(nr, -_EINVAL)
        self.internal_errors += 1
        if self.internal_errors <= 10:
            log.exception("hypercall %d failed inside the daemon", nr)
        return _EINVAL

    def totals(self) -> tuple[list[int], list[int]]:
        """(calls, errors) by call number, the natively served ones included."""
        if self.native is None:
            return list(self.calls), list(self.errors)
        nc, ne = self.native.calls(), self.native.errors()
        bc, be = self._native_base
        return ([p + n - b for p, n, b in zip(self.calls, nc, bc)],
                [p + n - b for p, n, b in zip(self.errors, ne, be)])

    def count(self, nr: int) -> int:
        """How many times call ``nr`` was made (natively served included)."""
        return self.totals()[0][nr]

    def counters(self) -> dict:
        """Calls and errors per hypercall (any thread: vCPUs may count meanwhile)."""
        calls, errors = self.totals()
        out = {}
        errnos = sorted(dict(self.errnos).items())
        for nr in range(TABLE_SIZE + 1):
            if calls[nr]:
                name = HYPERCALL_NAMES.get(nr, f"hypercall_{nr}") if nr < TABLE_SIZE else "unknown"
                out[name] = {"calls": calls[nr], "errors": errors[nr]}
                by_errno = {str(e): n for (slot, e), n in errnos if slot == nr}
                if by_errno:
                    out[name]["errnos"] = by_errno
        return {"hypercalls": out, "total": sum(calls), "internal_errors": self.internal_errors}

    def _rebase_native(self) -> None:
        if self.native is not None:
            self._native_base = (self.native.calls(), self.native.errors())

    def reset_counters(self) -> None:
        self.calls = [0] * (TABLE_SIZE + 1)
        self.errors = [0] * (TABLE_SIZE + 1)
        self.errnos = {}
        self._rebase_native()

    def load_counters(self, calls: list[int], errors: list[int]) -> None:
        if len(calls) == len(self.calls) and len(errors) == len(self.errors):
            self.calls, self.errors = list(calls), list(errors)
            self._rebase_native()
