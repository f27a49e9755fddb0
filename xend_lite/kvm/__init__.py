"""Typed KVM bindings: Kvm (/dev/kvm) -> Vm -> Vcpu, compiled against <linux/kvm.h> with cffi.

This package is the only code in xend-lite that imports cffi.
"""

import os

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

def atomic_or64(addr: int, mask: int) -> int:
    """Atomically OR ``mask`` into the aligned u64 at host address ``addr``; the old value."""
    return _lib.xl_fetch_or64(addr, mask)


def atomic_and64(addr: int, mask: int) -> int:
    """Atomically AND ``mask`` into the aligned u64 at host address ``addr``; the old value."""
    return _lib.xl_fetch_and64(addr, mask)


def atomic_xchg8(addr: int, value: int) -> int:
    """Atomically swap the byte at host address ``addr``; the old value."""
    return _lib.xl_xchg8(addr, value)


def map_shared_fixed(addr: int, length: int, fd: int, offset: int) -> None:
    """Map ``fd`` at ``offset`` over the host pages at ``addr`` (MAP_SHARED | MAP_FIXED)."""
    ret = _lib.xl_map_shared_fixed(addr, length, fd, offset)
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))


def written_runs(addr: int, pages: int) -> list[tuple[int, int]]:
    """(first page, count) runs of a private file mapping at ``addr`` whose pages now hold
    their own copy (written since mapped), read from /proc/self/pagemap."""
    from xend_lite.kvm._ffi import ffi

    cap = 4096
    while True:
        buf = ffi.new("uint64_t[]", 2 * cap)
        n = _lib.xl_written_runs(addr, pages, buf, cap)
        if n == -7 and cap < pages:   # E2BIG: more runs than room
            cap *= 8
            continue
        if n < 0:
            raise OSError(-n, os.strerror(-n))
        vals = ffi.unpack(buf, 2 * n)
        return list(zip(vals[0::2], vals[1::2]))


def host_tsc() -> int:
    """The host's time-stamp counter (RDTSC)."""
    return _lib.xl_rdtsc()


__all__ = [
    "map_shared_fixed", "written_runs", "atomic_and64", "atomic_or64", "atomic_xchg8", "host_tsc",
    "CAPABILITIES", "CpuidEntry", "Dtable", "Kvm", "KvmError", "MsrFilterRange", "Regs",
    "SYNC_EVENTS", "SYNC_REGS", "SYNC_SREGS", "Segment", "Sregs", "Translation", "Vcpu", "Vm",
    "buffer_address", "const", "exits",
]
