"""The machine layer's native helpers on host memory (``_build.py``, compiled into
``xend_lite.machine._machine``), as plain Python functions. The machine package's only user
of cffi; nothing here touches KVM."""

from __future__ import annotations

import os

from xend_lite.machine._machine import ffi as _ffi
from xend_lite.machine._machine import lib as _lib

__all__ = ["buffer_address", "map_shared_fixed", "punch_hole", "written_runs"]

_E2BIG = 7


def _check(ret: int) -> int:
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return ret


def buffer_address(buf) -> int:
    """The host virtual address of a writable buffer (e.g. an mmap), for memory slots.

    The caller keeps ``buf`` alive and unmoved for as long as KVM uses the address."""
    c = _ffi.from_buffer(buf, require_writable=True)
    addr = int(_ffi.cast("uintptr_t", c))
    _ffi.release(c)
    return addr


def map_shared_fixed(addr: int, length: int, fd: int, offset: int) -> None:
    """Map ``fd`` at ``offset`` over the host pages at ``addr`` (MAP_SHARED | MAP_FIXED)."""
    _check(_lib.xl_map_shared_fixed(addr, length, fd, offset))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Release the pages of a file range (fallocate PUNCH_HOLE): they read back as zeros."""
    _check(_lib.xl_punch_hole(fd, offset, length))


def written_runs(addr: int, pages: int) -> list[tuple[int, int]]:
    """(first page, count) runs of a private file mapping at ``addr`` whose pages now hold
    their own copy (written since mapped), read from /proc/self/pagemap."""
    cap = 4096
    while True:
        buf = _ffi.new("uint64_t[]", 2 * cap)
        n = _lib.xl_written_runs(addr, pages, buf, cap)
        if n == -_E2BIG and cap < pages:   # more runs than room
            cap *= 8
            continue
        _check(n)
        vals = _ffi.unpack(buf, 2 * n)
        return list(zip(vals[0::2], vals[1::2]))
