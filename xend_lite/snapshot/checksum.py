"""The snapshot file's guest memory checksum and file writeback, in C (``_build.py``, compiled
into ``xend_lite.snapshot._snapshot``). The snapshot package's only user of cffi."""

from __future__ import annotations

import os
from typing import Any

from xend_lite.snapshot._snapshot import ffi as _ffi
from xend_lite.snapshot._snapshot import lib as _lib

__all__ = ["chunk_sum", "crc32c", "crc32c_zeros", "sparse_chunk_sum", "hardware_crc",
           "start_writeback"]


def chunk_sum(data) -> int:
    """The checksum of one chunk of guest memory (snapshot format 2): CRC-32C over four
    lanes, combined (see ``_csum_build``). ``data`` is any contiguous bytes-like object (an
    mmap, a memoryview slice of one, bytes); the GIL is released while it runs."""
    buf = _ffi.from_buffer(data)
    try:
        return _lib.xl_chunk_sum(buf, len(buf))
    finally:
        _ffi.release(buf)   # an mmap with a live export cannot be closed


def crc32c(data, crc: int = 0) -> int:
    """Plain CRC-32C of ``data``, continuing from ``crc``."""
    buf = _ffi.from_buffer(data)
    try:
        return _lib.xl_crc32c(crc, buf, len(buf))
    finally:
        _ffi.release(buf)


def crc32c_zeros(n: int, crc: int = 0) -> int:
    """CRC-32C of ``n`` zero bytes continuing from ``crc``, without touching n bytes."""
    return _lib.xl_crc32c_zeros(crc, n)


def sparse_chunk_sum(n: int, extents: list[tuple[int, Any]]) -> int:
    """``chunk_sum`` of an n-byte chunk that is zero except for ``extents``: (offset,
    bytes-like) pairs in offset order, not overlapping. Only the extents' bytes are read:
    a stretch of zeros costs the same however long it is."""
    lane = n // 4 & ~7
    bounds = (0, lane, 2 * lane, 3 * lane, n)
    sums = bytearray()
    for k in range(4):
        lo, hi = bounds[k], bounds[k + 1]
        crc, pos = 0, lo
        for off, data in extents:
            a, b = max(lo, off), min(hi, off + len(data))
            if a >= b:
                continue
            if a > pos:
                crc = _lib.xl_crc32c_zeros(crc, a - pos)
            crc = crc32c(data[a - off:b - off], crc)
            pos = b
        if pos < hi:
            crc = _lib.xl_crc32c_zeros(crc, hi - pos)
        sums += crc.to_bytes(4, "little")
    return crc32c(sums)


def hardware_crc() -> bool:
    """True when the checksums run on the CPU's CRC-32C instruction."""
    return bool(_lib.xl_hw_crc())


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing the dirty pages of ``fd`` in [offset, offset + nbytes) to disk without
    waiting for them (sync_file_range SYNC_FILE_RANGE_WRITE): a later fsync then has less left
    to wait for. It makes nothing durable by itself."""
    err = _lib.xl_writeback(fd, offset, nbytes)
    if err < 0:
        raise OSError(-err, os.strerror(-err))
