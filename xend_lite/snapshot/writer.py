"""Writing a snapshot: states and sparse guest memory into one file, published atomically.

(Longer than most modules: the copy loop, its writeback pacing and the atomic publish share
one open file and one error path; split, each half would need the other's internals.)

``save_snapshot`` writes to a temporary file in the target's directory (``.NAME.PID.RAND.tmp``,
locked with flock while it is written), fsyncs it, renames it over the target and fsyncs the
directory. Whatever happens before the rename (SIGKILL, disk full, an exception), an earlier
snapshot at the target stays intact. Temporary files left by writers that died are removed by
the next save to the same name (and by ``remove_stale_temps``, which a daemon runs at start).

Everything happens relative to one fd of the target's directory: for a ``ConfinedPath`` that
directory is resolved beneath the snapshot root (``confine.py``), so no symlink swapped in
during the save can move it elsewhere. A save only ever replaces a snapshot: an existing file
at the target that is not one (no snapshot magic), a directory, a device or a symlink is
refused (TargetRefused) and left as it was.

Memory is copied chunk by chunk. Holes of the source (found with SEEK_DATA/SEEK_HOLE on its
fd, so untouched memfd pages are never read) and all-zero pages within data are not written:
they stay holes in the output file, whose disk use follows the data the guest really has.
Each chunk is summed (CRC-32C lanes, in C) just before it is copied, while it is fresh in the
CPU's cache, and every few megabytes the kernel is asked to start writing what was copied, so
the disk works during the copy and the final fsync only waits for the tail.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from xend_lite.snapshot import checksum as csum
from xend_lite.snapshot import fileformat as ff
from xend_lite.snapshot.confine import open_parent
from xend_lite.snapshot.errors import SnapshotWriteError, StateClassError, StateEncodeError
from xend_lite.snapshot.state import State, encode_state, split_section_name
from xend_lite.snapshot.target import (_check_replaceable, _keep_old, _start_reclaim, _tmp_name,
                                       check_target, cleanup_stale_temps, remove_stale_temps,
                                       wait_reclaimed)

__all__ = ["MemoryRegion", "SnapshotInfo", "save_snapshot", "check_target", "Progress"]

Progress = Callable[[int, int], None]
PROGRESS_STEP = 64 << 20


@dataclass(frozen=True)
class MemoryRegion:
    """Guest memory to save: ``size`` bytes at guest address ``gpa``, read from ``fd`` at
    ``offset`` (a memfd or a file; holes are skipped without reading). Where the memory is a
    MAP_PRIVATE mapping whose pages differ from its file, pass the mapping as ``buffer``
    instead (fd -1): every page of it is then read. Passing both, a shared mmap of the fd as
    ``buffer`` saves mapping the fd again."""

    name: str
    gpa: int
    size: int
    fd: int = -1
    offset: int = 0
    buffer: Any = None  # a bytes-like object of at least ``size`` bytes, or None


@dataclass(frozen=True)
class SnapshotInfo:
    """What a save produced. ``bytes_written`` counts metadata plus memory data written."""

    path: str
    logical_size: int
    size_on_disk: int
    bytes_written: int
    memory_size: int
    memory_data: int
    sections: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


RegionLike = MemoryRegion | tuple[str, int, int, int, int]


def _regions(regions: Iterable[RegionLike]) -> list[MemoryRegion]:
    out: list[MemoryRegion] = []
    names: set[str] = set()
    for r in regions:
        if not isinstance(r, MemoryRegion):
            r = MemoryRegion(*r)
        if not ff.valid_region_name(r.name) or r.name in names:
            raise StateClassError(f"memory region name {r.name!r} is invalid or repeated")
        for k in ("gpa", "size", "offset", "fd"):
            if type(getattr(r, k)) is not int:
                raise StateClassError(f"memory region {r.name!r}: {k} must be an int")
        if not 0 <= r.gpa or r.gpa % ff.PAGE_SIZE or r.gpa + r.size - 1 > ff.MAX_U64:
            raise StateClassError(f"memory region {r.name!r}: gpa not page-aligned or out of "
                                  "range")
        if r.size <= 0 or r.size % ff.PAGE_SIZE or r.offset < 0 or r.offset % ff.PAGE_SIZE:
            raise StateClassError(f"memory region {r.name!r}: size and offset must be page "
                                  "multiples")
        if r.buffer is not None:
            if memoryview(r.buffer).nbytes < r.size:
                raise StateClassError(f"memory region {r.name!r}: buffer smaller than size")
        elif r.fd < 0:
            raise StateClassError(f"memory region {r.name!r}: needs an fd or a buffer")
        for o in out:
            if r.gpa < o.gpa + o.size and o.gpa < r.gpa + r.size:
                raise StateClassError(f"memory regions {o.name!r} and {r.name!r} overlap in "
                                      "guest memory")
        names.add(r.name)
        out.append(r)
    return out


def _sections(states: Mapping[str, State] | Iterable[State]) -> list[tuple[str, State]]:
    items = list(states.items()) if isinstance(states, Mapping) else \
        [(getattr(s, "NAME", "?"), s) for s in states]
    seen: set[str] = set()
    out = []
    for name, st in items:
        if not isinstance(st, State):
            raise StateEncodeError(f"section {name!r}: {type(st).__name__} is not a State")
        base, _ = split_section_name(name)
        if base != st.NAME:
            raise StateClassError(f"section {name!r} holds a {st.NAME!r} state")
        if name in seen:
            raise StateClassError(f"section {name!r} given twice")
        seen.add(name)
        out.append((name, st))
    return out


class _Tracker:
    def __init__(self, total: int, cb: Progress | None):
        self.total = total
        self.done = 0
        self.cb = cb
        self.last = 0

    def advance_to(self, target: int) -> None:
        """Move to ``target`` bytes done, reporting every PROGRESS_STEP crossed on the way
        (so a large hole skipped at once still yields one call per step) and the end."""
        if self.cb is not None:
            while target - self.last >= PROGRESS_STEP:
                self.last += PROGRESS_STEP
                self.cb(self.last, self.total)
            if target == self.total and self.last != target:
                self.last = target
                self.cb(target, self.total)
        self.done = target


def _pwrite_all(fd: int, data: memoryview | bytes, off: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, off)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        mv = mv[n:]
        off += n


#: Bytes of memory written between two requests to start writing them to disk.
WRITEBACK_STEP = 8 << 20


class _MemoryCopier:
    """Copies regions into the output, page holes kept, one chunk CRC per chunk."""

    def __init__(self, out_fd: int, chunk: int, tracker: _Tracker):
        self.out = out_fd
        self.chunk = chunk
        self.buf = bytearray(chunk)
        self.view = memoryview(self.buf)
        self.zero_chunk = bytes(chunk)
        self.zero_page = bytes(ff.PAGE_SIZE)
        self.tracker = tracker
        self.written = 0
        self._wb_from = -1      # file offset from which written data awaits writeback, or -1
        self._wb_to = 0
        self._wb = True

    def _written(self, start: int, end: int) -> None:
        """Data went to [start, end) of the file. Every WRITEBACK_STEP bytes the kernel is asked
        to start writing it out, so the disk works while later memory is copied and the final
        fsync has only the tail left; without this, nothing reaches the disk before fsync (the
        dirty limits of a host with free memory are gigabytes away)."""
        if not self._wb:
            return
        if self._wb_from < 0:
            self._wb_from = start
        self._wb_to = end
        if end - self._wb_from >= WRITEBACK_STEP:
            self.flush_writeback()

    def flush_writeback(self) -> None:
        if self._wb and self._wb_from >= 0:
            try:
                csum.start_writeback(self.out, self._wb_from, self._wb_to - self._wb_from)
            except OSError:    # only a head start: fsync still writes everything
                self._wb = False
            self._wb_from = -1

    def region(self, r: MemoryRegion, out_off: int) -> tuple[int, list[int]]:
        """Copy one region to ``out_off``; return (data bytes written, chunk sums)."""
        n_chunks = ff.chunk_count(r.size, self.chunk)
        crcs = [ff.zero_chunk_sum(min(self.chunk, r.size - i * self.chunk))
                for i in range(n_chunks)]
        data = 0
        base = self.tracker.done
        src = self._map_source(r)
        try:
            for lo, hi in self._extents(r):
                c = lo // self.chunk * self.chunk
                while c < hi:
                    length = min(self.chunk, r.size - c)
                    # a chunk wholly inside a data extent is read in place from a mapping of
                    # the source (no copy); one that touches a hole is read with preadv,
                    # which leaves the hole unallocated
                    if src is not None and lo <= c and c + length <= hi:
                        n, crcs[c // self.chunk] = self._chunk(src, c, length, out_off + c)
                    else:
                        self._read(r, c, length)
                        n, crcs[c // self.chunk] = self._chunk(self.buf, 0, length, out_off + c)
                    data += n
                    c += length
                    self.tracker.advance_to(base + c)
        finally:
            if src is not None and src is not r.buffer:
                try:
                    src.close()
                except BufferError:   # a failed write's traceback still holds a view of it:
                    pass              # it is unmapped when that goes
        self.tracker.advance_to(base + r.size)
        return data, crcs

    @staticmethod
    def _map_source(r: MemoryRegion) -> mmap.mmap | None:
        if r.fd >= 0 and isinstance(r.buffer, mmap.mmap):
            return r.buffer                    # the caller's own shared mapping of the fd
        if r.buffer is not None or r.fd < 0 or r.offset % mmap.ALLOCATIONGRANULARITY or r.size == 0:
            return None
        try:
            return mmap.mmap(r.fd, r.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=r.offset)
        except (OSError, ValueError):
            return None

    def _extents(self, r: MemoryRegion) -> Iterable[tuple[int, int]]:
        """Ranges (relative to the region) that may hold data, in order, chunk-disjoint."""
        if r.fd < 0:
            yield 0, r.size
            return
        pos = 0
        while pos < r.size:
            try:
                d = os.lseek(r.fd, r.offset + pos, os.SEEK_DATA) - r.offset
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data after pos
                    return
                if err.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE):
                    yield pos, r.size  # no hole support: read everything
                    return
                raise
            if d >= r.size:
                return
            h = min(os.lseek(r.fd, r.offset + d, os.SEEK_HOLE) - r.offset, r.size)
            yield d, h
            # the chunk holding h was read whole: go on after it
            pos = max(h, (h + self.chunk - 1) // self.chunk * self.chunk)

    def _read(self, r: MemoryRegion, c: int, length: int) -> None:
        view = self.view[:length]
        if r.fd < 0:
            view[:] = memoryview(r.buffer).cast("B")[c:c + length]
        else:
            got = os.preadv(r.fd, [view], r.offset + c)
            if got < length:  # past the source's end: zeros
                view[got:length] = self.zero_chunk[:length - got]

    def _chunk(self, obj: mmap.mmap | bytearray, at: int, length: int,
               out_off: int) -> tuple[int, int]:
        """Write obj[at:at+length] (page holes kept); return (bytes written, chunk sum)."""
        page = ff.PAGE_SIZE
        # A page of zeros starts with a zero byte: the first byte of every page (a strided
        # slice, a few hundred bytes) rules out most pages of dense memory without a scan.
        heads = obj[at:at + length:page]
        zero_pages: list[int] = []
        if 0 in heads:
            if not heads.strip(b"\0"):   # every page starts with zero: maybe all zeros
                zero = self.zero_chunk if length == self.chunk else self.zero_chunk[:length]
                if obj.find(zero, at, at + length) == at:   # all zeros: no write
                    return 0, ff.zero_chunk_sum(length)
            zp = self.zero_page
            i = heads.find(0)
            while i >= 0:
                if obj.find(zp, at + i * page, at + (i + 1) * page) >= 0:
                    zero_pages.append(i)
                i = heads.find(0, i + 1)
        view = memoryview(obj)[at:at + length]
        try:
            # summed first: the chunk is then in the CPU's cache for the copy into the file
            crc = ff.chunk_sum(view)
            written = 0
            run = 0                                  # start of the pages not yet written
            for i in zero_pages + [length // page]:
                p = i * page
                if p > run:
                    _pwrite_all(self.out, view[run:p], out_off + run)
                    written += p - run
                run = p + page
            self.written += written
            if written:
                self._written(out_off, out_off + length)
            return written, crc
        finally:
            view.release()


def save_snapshot(path: str | os.PathLike[str],
                  states: Mapping[str, State] | Iterable[State],
                  regions: Iterable[RegionLike],
                  *, progress: Progress | None = None) -> SnapshotInfo:
    """Write ``states`` and the memory ``regions`` to ``path`` as one snapshot.

    ``states`` maps section names (``NAME`` or ``NAME/INSTANCE``) to State objects, or is an
    iterable of States named by their NAME. States whose ``needed()`` is False are left out;
    ``pre_save()`` runs on the others before they are encoded. ``progress(done, total)`` is
    called about every 64 MiB of memory and once at the end. Raises StateEncodeError /
    StateClassError before touching the disk, SnapshotWriteError on any OS error (with the
    temporary file removed and the earlier file at ``path`` untouched).
    """
    t0 = time.monotonic()
    path = os.fspath(path)
    sections = _sections(states)
    mem = _regions(regions)

    entries: list[ff.SectionEntry] = []
    payloads: list[bytes] = []
    pos = 0
    for name, st in sections:
        if not st.needed():
            continue
        st.pre_save()
        blob = encode_state(st)
        entries.append(ff.SectionEntry(name, type(st).VERSION, pos, len(blob),
                                       zlib.crc32(blob)))
        payloads.append(blob)
        pos += len(blob)
    payload_len = pos

    chunk = ff.CHUNK_SIZE
    placed, off = [], 0
    for r in mem:  # offsets relative to the memory offset
        placed.append(ff.RegionEntry(r.name, r.gpa, r.size, off))
        off += r.size
    table = ff.build_table(entries, placed)
    meta_len = len(table) + payload_len + ff.sums_length([r.size for r in mem], chunk)
    if meta_len > ff.MAX_METADATA:
        raise StateEncodeError(f"states and memory tables take {meta_len} bytes, more than "
                               f"a snapshot holds ({ff.MAX_METADATA})")
    mem_offset = ff.align_up(ff.HEADER_SIZE + meta_len)
    file_end = mem_offset + sum(r.size for r in mem)

    try:
        dir_fd, base = open_parent(path)
    except OSError as err:
        raise SnapshotWriteError(f"writing snapshot {path} failed: {os.strerror(err.errno)}",
                                 err.errno) from err
    tmp = _tmp_name(base)
    fd = -1
    published = created = False
    try:
        _check_replaceable(dir_fd, base, path)
        remove_stale_temps(dir_fd, base)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        created = True
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, file_end)
        tracker = _Tracker(sum(r.size for r in mem), progress)
        if progress is not None:
            progress(0, tracker.total)
        copier = _MemoryCopier(fd, chunk, tracker)
        sums = bytearray()
        data_total = 0
        for r, e in zip(mem, placed):
            data, crcs = copier.region(r, mem_offset + e.offset)
            data_total += data
            sums += ff.SUM_HEAD.pack(data)
            sums += b"".join(c.to_bytes(4, "little") for c in crcs)
        copier.flush_writeback()
        created_ns = time.time_ns()
        head = ff.Header(ff.FORMAT_VERSION, 0, created_ns, meta_len, mem_offset, file_end,
                         len(table), chunk, ff.PAGE_SIZE, 0)
        pre = bytearray(head.pack())
        pre += table
        for blob in payloads:
            pre += blob
        pre += sums
        pre += bytes(mem_offset - len(pre))
        crc = ff.header_crc(pre)
        pre[ff.CRC_OFFSET:ff.HEADER_SIZE] = crc.to_bytes(4, "little")
        _pwrite_all(fd, memoryview(pre), 0)
        os.fsync(fd)
        st = os.fstat(fd)
        os.close(fd)
        fd = -1
        # The file this replaces is freed after the rename, in the background: freeing a
        # large file's blocks can take longer than writing the directory entry. It is kept
        # meanwhile under a temporary name, which the next save removes if this process dies.
        old = _keep_old(dir_fd, base)
        os.rename(tmp, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        published = True
        os.fsync(dir_fd)
        if old is not None:
            _start_reclaim(dir_fd, old)
    except OSError as err:
        where = "publishing" if published else "writing"
        raise SnapshotWriteError(f"{where} snapshot {path} failed: "
                                 f"{os.strerror(err.errno) if err.errno else err}",
                                 err.errno) from err
    finally:
        if fd >= 0:
            os.close(fd)
        if created and not published:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
        os.close(dir_fd)
    return SnapshotInfo(
        path=path, logical_size=file_end, size_on_disk=st.st_blocks * 512,
        bytes_written=len(pre) + copier.written, memory_size=tracker.total,
        memory_data=data_total, sections=len(entries), seconds=time.monotonic() - t0)
