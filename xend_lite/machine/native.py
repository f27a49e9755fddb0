"""The machine layer's native helpers (``_build.py``, compiled into
``xend_lite.machine._machine``), as plain Python functions: host memory, and LZ4 legacy frames
for guest images. The machine package's only user of cffi; nothing here touches KVM."""

from __future__ import annotations

import mmap
import os

from xend_lite.machine._machine import ffi as _ffi
from xend_lite.machine._machine import lib as _lib

__all__ = ["DecompressError", "buffer_address", "lz4_legacy_decompress", "map_shared_fixed", "set_mmap_threshold",
           "punch_hole", "written_runs"]

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


def set_mmap_threshold(nbytes: int) -> bool:
    """Allocations of at least ``nbytes`` get a mapping of their own; smaller ones come from
    the heap (glibc's M_MMAP_THRESHOLD, which otherwise moves with what was freed)."""
    return bool(_lib.xl_mmap_threshold(nbytes))


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


class DecompressError(ValueError):
    """Compressed data that cannot be decoded: malformed, truncated or too large."""


_LZ4_ERRORS = {
    -1: "no LZ4 legacy-frame magic (02 21 4c 18)",
    -2: "truncated",
    -3: "corrupt (a bad match distance, length or block size)",
    -4: "decompresses to more than the limit",
    -5: "corrupt (a block decodes to more than 8 MiB)",
    -6: "holds no block",
}


def lz4_legacy_decompress(data: bytes, limit: int) -> tuple[bytes, int | None]:
    """Decode LZ4 legacy frames (``lz4 -l``; Linux's compressed kernels) into at most
    ``limit`` bytes. Returns the data and the u32 size trailer Linux appends, or None when
    there is none. Raises DecompressError naming what is wrong and where."""
    if limit <= 0:
        raise ValueError("limit must be positive")
    out = mmap.mmap(-1, limit)   # untouched pages cost nothing
    try:
        trailer = _ffi.new("uint64_t *")
        err_at = _ffi.new("uint64_t *")
        dst = _ffi.from_buffer(out, require_writable=True)
        try:
            n = _lib.xl_lz4_legacy(data, len(data), dst, limit, trailer, err_at)
        finally:
            _ffi.release(dst)
        if n < 0:
            what = _LZ4_ERRORS.get(n, f"error {n}")
            where = f" at input offset {err_at[0]:#x}" if n not in (-1, -4, -6) else ""
            raise DecompressError(f"LZ4 data {what}{where}")
        value = trailer[0]
        return out[:n], (value & 0xFFFFFFFF if value >> 32 else None)
    finally:
        out.close()
