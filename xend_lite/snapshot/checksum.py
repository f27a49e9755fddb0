"""The snapshot file's guest memory checksum and file writeback, in C (``_build.py``, compiled
into ``xend_lite.snapshot._snapshot``). The snapshot package's only user of cffi."""

from __future__ import annotations

import os

from xend_lite.snapshot._snapshot import ffi as _ffi
from xend_lite.snapshot._snapshot import lib as _lib

__all__ = ["chunk_sum", "crc32c", "hardware_crc", "start_writeback"]


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
