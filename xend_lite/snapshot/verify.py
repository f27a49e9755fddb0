"""Checking a snapshot's guest memory against its chunk sums before anything is restored."""

from __future__ import annotations

import errno
import os
import threading

from xend_lite.snapshot import fileformat as ff
from xend_lite.snapshot.checksum import sparse_chunk_sum
from xend_lite.snapshot.errors import (MemoryChecksumMismatch, SnapshotError, SnapshotReadError,
                                       Truncated)

__all__ = ["verify_memory", "VERIFY_THREADS"]


VERIFY_THREADS = 2     # chunks with data are read and summed on this many threads at once


def verify_memory(fd: int, h: ff.Header, regions: list[ff.RegionEntry],
                  sums: list[tuple[int, list[int]]], path: str) -> None:
    """Every chunk against its sum: holes without reading them, chunks with data read and
    summed on VERIFY_THREADS threads (pread and the sum both run without the GIL). Of a
    chunk with data only its data extents are read; the zeros between them are summed
    without reading them (format 2). The first bad chunk in file order is the one
    reported."""
    chunk = h.chunk_size
    summer = ff.chunk_summer(h.format_version)
    sparse = h.format_version >= 2
    jobs: list[tuple[int, int, int, int, int]] = []   # region, chunk, file offset, length, sum
    bad: list[tuple[int, int, SnapshotError]] = []    # region, chunk, what is wrong
    end = max((h.mem_offset + r.offset + r.size for r in regions), default=0)
    size = os.fstat(fd).st_size
    if size < end:        # shorter than when its header was checked: holes would hide it
        raise Truncated(f"snapshot {path} ends at {size}, inside its memory", end, size)
    for ri, (r, (_, crcs)) in enumerate(zip(regions, sums)):
        data = _data_chunks(fd, h.mem_offset + r.offset, r.size, chunk)
        hole = _first_bad_hole(crcs, data, r.size, chunk, h.format_version)
        if hole is not None:
            bad.append((ri, hole, _mismatch(r, hole, chunk)))
        for i in sorted(data):
            if hole is not None and i > hole:
                break
            length = min(chunk, r.size - i * chunk)
            jobs.append((ri, i, h.mem_offset + r.offset + i * chunk, length, crcs[i]))

    def check(part: list[tuple[int, int, int, int, int]]) -> None:
        view: memoryview | None = None      # for chunks read whole (a fresh megabyte costs)
        for ri, i, at, length, want in part:
            extents = _extents(fd, at, length) if sparse else [(0, length)]
            whole = extents == [(0, length)]
            if whole and view is None:
                view = memoryview(bytearray(chunk))
            pieces = []
            for off, n in extents:
                try:
                    if whole:
                        got = os.preadv(fd, [view[:n]], at)
                    else:
                        pieces.append((off, os.pread(fd, n, at + off)))
                        got = len(pieces[-1][1])
                except OSError as err:
                    bad.append((ri, i, SnapshotReadError(
                        f"reading snapshot {path} failed: {os.strerror(err.errno)}", err.errno)))
                    return
                if got != n:
                    bad.append((ri, i, Truncated(f"memory region {regions[ri].name!r} ends early",
                                                 at + off + n, at + off + got)))
                    return
            s = summer(view[:length]) if whole else sparse_chunk_sum(length, pieces)
            if s != want:
                bad.append((ri, i, _mismatch(regions[ri], i, chunk)))
                return

    if len(jobs) < 2 * VERIFY_THREADS:
        check(jobs)
    else:
        step = -(-len(jobs) // VERIFY_THREADS)
        threads = [threading.Thread(target=check, args=(jobs[k:k + step],), name="snapshot-verify")
                   for k in range(step, len(jobs), step)]
        for t in threads:
            t.start()
        check(jobs[:step])
        for t in threads:
            t.join()
    if bad:
        raise min(bad, key=lambda b: (b[0], b[1]))[2]


def _first_bad_hole(crcs: list[int], data: set[int], size: int, chunk: int,
                    version: int) -> int | None:
    """The first chunk without data whose sum is not the sum of zeros (a hole reads as
    zeros), or None. Counted in C: the full-length holes hold the zero sum exactly when the
    zero sums among all full-length chunks, less those among the data chunks, are as many
    as those holes; a per-chunk walk runs only to name the chunk when they are not."""
    full = size // chunk
    zero = ff.zero_chunk_sum(chunk, version)
    holes = full - sum(1 for i in data if i < full)
    zero_in_data = sum(1 for i in data if i < full and crcs[i] == zero)
    if crcs[:full].count(zero) - zero_in_data != holes:
        return next(i for i in range(full) if i not in data and crcs[i] != zero)
    last = len(crcs) - 1
    if last >= full and last not in data and crcs[last] != ff.zero_chunk_sum(size - full * chunk, version):
        return last
    return None


def _extents(fd: int, at: int, length: int) -> list[tuple[int, int]]:
    """The data extents of [at, at + length) as (offset from at, length), found with
    SEEK_DATA / SEEK_HOLE; the whole range where the file system cannot tell."""
    out: list[tuple[int, int]] = []
    pos, end = at, at + length
    try:
        while pos < end:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:      # only holes from here to the end
                    break
                raise
            if d >= end:
                break
            h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
            out.append((d - at, h - d))
            pos = h
    except OSError:
        return [(0, length)]
    return out


def _mismatch(r: ff.RegionEntry, i: int, chunk: int) -> MemoryChecksumMismatch:
    off = i * chunk
    return MemoryChecksumMismatch(f"memory region {r.name!r} is corrupt at offset {off:#x} "
                                  f"(chunk {i} checksum mismatch)", r.name, off)


def _data_chunks(fd: int, start: int, size: int, chunk: int) -> set[int]:
    """Indexes of the chunks of [start, start+size) that hold data, found by walking the
    file's data extents (SEEK_DATA / SEEK_HOLE): a run of holes costs one lseek however
    long it is, and no chunk costs more than two. Where the file system cannot tell, every
    chunk counts as data."""
    end = start + size
    out: set[int] = set()
    pos = start
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:      # nothing but holes to the end of the file
                break
            d = pos
        if d >= end:
            break
        try:
            hole = min(os.lseek(fd, d, os.SEEK_HOLE), end)
        except OSError:
            hole = end
        first, last = (d - start) // chunk, (max(hole, d + 1) - 1 - start) // chunk
        out.update(range(first, last + 1))
        pos = max(hole, start + (last + 1) * chunk)   # the rest of that chunk is data anyway
    return out
