"""The Xen layer's native helpers (``_build.py``, compiled into ``xend_lite.xen._xen``) as
plain Python values and functions: the hypercall decoder the vCPU loop calls in C, atomic
bit operations on guest memory, and the host TSC. No cffi object leaves this module."""

from __future__ import annotations

from xend_lite.xen._xen import lib as _lib

__all__ = ["CALL_LONG", "CALL_USER", "DECODE_CALL", "atomic_and64", "atomic_or64", "atomic_xchg8",
           "host_tsc"]

#: flags the decoder sets in a call's second word: the caller was in 64-bit mode / was not
#: the guest kernel
CALL_LONG: int = _lib.XEN_CALL_LONG
CALL_USER: int = _lib.XEN_CALL_USER
#: the address of the C function that decodes a hypercall from the synced registers into
#: [number, flags, five arguments]; the vCPU loop calls it right after a hypercall exit
DECODE_CALL: int = _lib.xen_decode_call_address()



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
