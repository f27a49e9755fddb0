"""The Xen layer's native helpers (``_build.py``, compiled into ``xend_lite.xen._xen``) as
plain Python values and functions: the hypercall decoder the vCPU loop calls in C, atomic
bit operations on guest memory, and the host TSC. No cffi object leaves this module."""

from __future__ import annotations

from collections.abc import Iterable

from xend_lite.xen._xen import ffi as _ffi
from xend_lite.xen._xen import lib as _lib

__all__ = ["CALL_LONG", "CALL_USER", "DECODE_CALL", "NATIVE_HOOK", "NativeHypercalls",
           "atomic_and64", "atomic_or64", "atomic_xchg8", "host_tsc"]

#: flags the decoder sets in a call's second word: the caller was in 64-bit mode / was not
#: the guest kernel
CALL_LONG: int = _lib.XEN_CALL_LONG
CALL_USER: int = _lib.XEN_CALL_USER
#: the address of the C function that decodes a hypercall from the synced registers into
#: [number, flags, five arguments]; the vCPU loop calls it right after a hypercall exit
DECODE_CALL: int = _lib.xen_decode_call_address()
#: the address of the C function that serves the natively served hypercalls in the vCPU
#: loop and decodes every other one as DECODE_CALL does; its context is a
#: NativeHypercalls.ctx(vcpu index)
NATIVE_HOOK: int = _lib.xen_native_hook_address()
#: how many counters each vCPU keeps (the Python dispatcher's TABLE_SIZE + 1)
NATIVE_COUNTERS: int = _lib.XEN_NATIVE_COUNTERS


class NativeHypercalls:
    """The C-owned state of the hypercalls served natively: which (call, sub-op) pairs are on,
    the fixed values they answer with, and each vCPU's counters (summed on read)."""

    def __init__(self, nr_vcpus: int, version_word: int, served: Iterable[tuple[int, int]],
                 enabled: bool = True):
        self._dom = _ffi.new("struct xen_native_dom *")
        self._dom.version_word = version_word
        self.slots = {}
        for op, subop in served:
            slot = _lib.xen_native_slot(op, subop)
            if slot < 0:
                raise ValueError(f"hypercall {op} sub-op {subop} has no native handler")
            self.slots[(op, subop)] = slot
        self._vcpus = [_ffi.new("struct xen_native_vcpu *") for _ in range(nr_vcpus)]
        for v in self._vcpus:
            v.dom = self._dom
        self.set_enabled(enabled)

    @property
    def enabled(self) -> bool:
        return any(self._dom.on[s] for s in self.slots.values())

    def set_enabled(self, on: bool) -> None:
        """Serve the named pairs in C (True) or leave every call to Python (False); a byte
        store per pair, which the vCPU loops read atomically at their next hypercall."""
        for slot in self.slots.values():
            self._dom.on[slot] = 1 if on else 0

    def ctx(self, index: int) -> int:
        """The hook's context for vCPU ``index`` (0: none, every call goes to Python)."""
        if not 0 <= index < len(self._vcpus):
            return 0
        return int(_ffi.cast("uintptr_t", self._vcpus[index]))

    def calls(self) -> list[int]:
        return [sum(v.calls[i] for v in self._vcpus) for i in range(NATIVE_COUNTERS)]

    def errors(self) -> list[int]:
        return [sum(v.errors[i] for v in self._vcpus) for i in range(NATIVE_COUNTERS)]



def atomic_or64(addr: int, mask: int) -> int:
    """Atomically OR ``mask`` into the aligned u64 at host address ``addr``; the old value."""
    return _lib.xen_fetch_or64(addr, mask)


def atomic_and64(addr: int, mask: int) -> int:
    """Atomically AND ``mask`` into the aligned u64 at host address ``addr``; the old value."""
    return _lib.xen_fetch_and64(addr, mask)


def atomic_xchg8(addr: int, value: int) -> int:
    """Atomically swap the byte at host address ``addr``; the old value."""
    return _lib.xen_xchg8(addr, value)


def host_tsc() -> int:
    """The host's time-stamp counter (RDTSC)."""
    return _lib.xen_rdtsc()
