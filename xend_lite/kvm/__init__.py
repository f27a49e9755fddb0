"""Typed KVM bindings: Kvm (/dev/kvm) -> Vm -> Vcpu, compiled against <linux/kvm.h> with cffi.

This package is the only code in xend-lite that imports cffi.
"""

from xend_lite.kvm import exits
from xend_lite.kvm._ffi import lib as _lib
from xend_lite.kvm.errors import KvmError
from xend_lite.kvm.system import CAPABILITIES, CpuidEntry, Kvm
from xend_lite.kvm.vcpu import (SYNC_EVENTS, SYNC_REGS, SYNC_SREGS, Dtable, Regs, Segment, Sregs,
                                Translation, Vcpu)
from xend_lite.kvm.vm import MsrFilterRange, Vm

#: Constants a caller needs by name (capabilities, exit reasons, MSR exit reasons).
const = _lib


def buffer_address(buf) -> int:
    """The host virtual address of a writable buffer (e.g. an mmap), for memory slots.

    The caller keeps ``buf`` alive and unmoved for as long as KVM uses the address."""
    from xend_lite.kvm._ffi import ffi

    c = ffi.from_buffer(buf, require_writable=True)
    addr = int(ffi.cast("uintptr_t", c))
    ffi.release(c)
    return addr

__all__ = [
    "CAPABILITIES", "CpuidEntry", "Dtable", "Kvm", "KvmError", "MsrFilterRange", "Regs",
    "SYNC_EVENTS", "SYNC_REGS", "SYNC_SREGS", "Segment", "Sregs", "Translation", "Vcpu", "Vm",
    "buffer_address", "const", "exits",
]
