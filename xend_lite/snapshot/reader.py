"""Reading a snapshot: the whole file is validated before the caller applies anything.

``load_snapshot`` checks, in this order, and raises the first fault it finds:

1. the header: magic (BadMagic), format version (UnsupportedFormat), the metadata fits in the
   file (Truncated);
2. the checksum over header, table, sections and memory checksums (ChecksumMismatch; when the
   table still decodes, the section whose own CRC fails is named: SectionChecksumMismatch);
3. the checksummed header fields and the file size (MalformedSnapshot, Truncated), then the
   table (MalformedSnapshot, DuplicateSection, MemoryTableError);
4. which sections are there: UnknownSection (no class), MissingSection (``required`` not
   present), UnexpectedSection (outside ``required`` and ``allowed``, when ``allowed`` is
   given);
5. each section: version within [MIN_VERSION, VERSION] of its class (SectionVersionError),
   decoded into its class, upgraded and ``post_load``-checked (StateDecodeError naming the
   field);
6. optionally (``verify_memory``) every memory chunk against its chunk sum
   (MemoryChecksumMismatch).

Guest memory is not read (except to verify): the caller maps each region of the returned
read-only fd with MAP_PRIVATE at its ``file_offset``, so a restored guest never writes to the
snapshot file.

A ``ConfinedPath`` is opened beneath its root (``confine.py``): a name that leads out of the
snapshot directory is refused (InvalidArgument) before anything is read.
"""

from __future__ import annotations

import datetime
import errno
import mmap
import os
import stat
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xend_lite.snapshot import fileformat as ff
from xend_lite.snapshot.confine import open_snapshot_file
from xend_lite.snapshot.errors import (
    ChecksumMismatch,
    MissingSection,
    SectionChecksumMismatch,
    SnapshotError,
    SnapshotReadError,
    Truncated,
    UnexpectedSection,
    UnknownSection,
)
from xend_lite.snapshot.state import State, decode_state, registered_states, split_section_name
from xend_lite.snapshot.verify import verify_memory as _verify_memory

__all__ = [
    "LoadedRegion",
    "LoadedSnapshot",
    "SectionInfo",
    "check_sections",
    "SnapshotHeader",
    "load_snapshot",
    "describe",
]


@dataclass(frozen=True)
class SnapshotHeader:
    """The header of a validated snapshot."""

    format_version: int
    created_ns: int
    metadata_length: int
    memory_offset: int
    file_size: int
    chunk_size: int
    page_size: int

    @property
    def created(self) -> str:
        """Creation time, ISO-8601 in UTC."""
        return iso_utc(self.created_ns)


@dataclass(frozen=True)
class SectionInfo:
    name: str
    version: int
    length: int


@dataclass(frozen=True)
class LoadedRegion:
    """One region of guest memory: ``size`` bytes for guest address ``gpa``, stored in the
    snapshot file at ``file_offset`` (page-aligned). ``data`` counts the bytes that were
    written (the rest are holes that read as zeros)."""

    name: str
    gpa: int
    size: int
    file_offset: int
    data: int = 0


def iso_utc(ns: int) -> str:
    t = datetime.datetime.fromtimestamp(ns // 1_000_000_000, tz=datetime.timezone.utc)
    t = t.replace(microsecond=(ns % 1_000_000_000) // 1000)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class LoadedSnapshot:
    """A validated snapshot. ``states`` maps section names to decoded States; ``fd`` is a
    read-only descriptor of the file, open until :meth:`close` (or the end of a ``with``)."""

    path: str
    header: SnapshotHeader
    sections: list[SectionInfo]
    states: dict[str, State]
    regions: list[LoadedRegion]
    fd: int
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> LoadedSnapshot:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def region(self, name: str) -> LoadedRegion:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    def map_region(self, name: str) -> mmap.mmap:
        """A copy-on-write (MAP_PRIVATE) mapping of one region: writes to it stay in memory
        and never reach the snapshot file. Reading a hole faults in a page from the file's
        filesystem: on a full tmpfs that fault fails with SIGBUS, so keep snapshots where
        their holes can be backed."""
        if self._closed:
            raise ValueError("snapshot is closed")
        r = self.region(name)
        return mmap.mmap(self.fd, r.size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=r.file_offset)


# -- validation shared by load_snapshot and describe ---------------------------------------

@dataclass
class _Parsed:
    header: ff.Header
    file_size: int
    blocks: int
    sections: list[ff.SectionEntry]
    payloads: list[bytes]
    regions: list[ff.RegionEntry]
    sums: list[tuple[int, list[int]]]


def _open(path: str) -> tuple[int, os.stat_result]:
    """A read-only fd of the snapshot (a ConfinedPath resolved beneath its root)."""
    try:
        fd = open_snapshot_file(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block
    except OSError as err:
        raise SnapshotReadError(f"cannot open snapshot {path}: {os.strerror(err.errno)}",
                                err.errno) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotReadError(f"snapshot {path} is not a regular file", errno.EINVAL)
    except BaseException as err:
        os.close(fd)
        if isinstance(err, OSError):
            raise SnapshotReadError(f"cannot stat snapshot {path}: {os.strerror(err.errno)}",
                                    err.errno) from err
        raise
    return fd, st


def _pread(fd: int, n: int, off: int, path: str) -> bytes:
    parts = []
    while n > 0:
        try:
            b = os.pread(fd, min(n, 1 << 24), off)
        except OSError as err:
            raise SnapshotReadError(f"reading snapshot {path} failed: "
                                    f"{os.strerror(err.errno)}", err.errno) from err
        if not b:
            break
        parts.append(b)
        n -= len(b)
        off += len(b)
    return b"".join(parts)


def _section_at_fault(h: ff.Header, pre: bytes, size: int) -> SectionChecksumMismatch | None:
    """After a checksum mismatch: if header and table still make sense, the section whose
    own CRC fails (so the error can name it)."""
    try:
        ff.check_header_fields(h, size)
        sections, _ = ff.parse_table(h, pre[ff.HEADER_SIZE:ff.HEADER_SIZE + h.table_len])
    except SnapshotError:
        return None
    base = ff.HEADER_SIZE + h.table_len
    for s in sections:
        blob = pre[base + s.offset:base + s.offset + s.length]
        if zlib.crc32(blob) != s.crc32:
            return SectionChecksumMismatch(f"section {s.name!r} is corrupt (checksum "
                                           "mismatch)", s.name)
    return None


def _parse(fd: int, st: os.stat_result, path: str) -> _Parsed:
    size = st.st_size
    head = _pread(fd, ff.HEADER_SIZE, 0, path)
    h = ff.parse_header(head, size)
    n = ff.pre_memory_length(h)
    pre = _pread(fd, n, 0, path)
    if len(pre) < n:
        raise Truncated(f"file is {len(pre)} bytes, shorter than its {n} bytes of header, "
                        "metadata and padding", n, len(pre))
    if ff.header_crc(pre) != h.crc:
        err = _section_at_fault(h, pre, size) or ChecksumMismatch(
            f"snapshot {path} is corrupt: header or table checksum mismatch")
        raise err
    ff.check_header_fields(h, size)
    table_end = ff.HEADER_SIZE + h.table_len
    sections, regions = ff.parse_table(h, pre[ff.HEADER_SIZE:table_end])
    payloads = []
    for s in sections:
        blob = pre[table_end + s.offset:table_end + s.offset + s.length]
        if zlib.crc32(blob) != s.crc32:  # the header CRC matched, so the writer erred
            raise SectionChecksumMismatch(f"section {s.name!r}: checksum mismatch", s.name)
        payloads.append(blob)
    sums_at = table_end + sum(s.length for s in sections)
    sums = ff.parse_sums(h, regions, pre[sums_at:ff.HEADER_SIZE + h.meta_len])
    return _Parsed(h, size, st.st_blocks, sections, payloads, regions, sums)


def _class_map(classes: Mapping[str, type[State]] | Iterable[type[State]] | None
               ) -> Mapping[str, type[State]]:
    if classes is None:
        return registered_states()
    if isinstance(classes, Mapping):
        return classes
    return {c.NAME: c for c in classes}


def _lookup(classes: Mapping[str, type[State]], name: str) -> type[State] | None:
    cls = classes.get(name)
    if cls is None:
        cls = classes.get(split_section_name(name)[0])
    return cls


def _accepted(name: str, names: set[str]) -> bool:
    return name in names or split_section_name(name)[0] in names


def warm_up() -> None:
    """Do ahead what the first load in a process does once (load what a confined open
    needs; sum an all-zero chunk, which every hole is checked against), for a daemon that
    waits for a snapshot to load."""
    from xend_lite.snapshot import confine

    confine.warm_up()
    ff.zero_chunk_sum(ff.CHUNK_SIZE)


def check_sections(names: Iterable[str], required: Iterable[str] = (),
                   allowed: Iterable[str] | None = None) -> None:
    """Raise MissingSection when a ``required`` section is not among ``names``, and, when
    ``allowed`` is given, UnexpectedSection for a section in neither (by full or base name).
    For a caller that learns what it requires from the file itself."""
    names, required = list(names), list(required)
    missing = tuple(r for r in required if r not in names)
    if missing:
        raise MissingSection(f"snapshot lacks required section(s) "
                             f"{', '.join(map(repr, missing))}", missing)
    if allowed is not None:
        ok = set(required) | set(allowed)
        extra = tuple(n for n in names if not _accepted(n, ok))
        if extra:
            raise UnexpectedSection(f"snapshot holds unexpected section(s) "
                                    f"{', '.join(map(repr, extra))}", extra)


def load_snapshot(path: str | os.PathLike[str],
                  classes: Mapping[str, type[State]] | Iterable[type[State]] | None = None,
                  required: Iterable[str] = (),
                  allowed: Iterable[str] | None = None,
                  *, verify_memory: bool = False) -> LoadedSnapshot:
    """Open and validate the snapshot at ``path``; return its decoded states and memory map.

    ``classes`` maps section names (full ``NAME/INSTANCE`` or base ``NAME``) to State
    classes, or is an iterable of State classes; by default the registered classes are used.
    ``required`` lists section names that must be present. When ``allowed`` is given, every
    section must be in ``required`` or ``allowed`` (by full or base name). Nothing is applied
    and no ``post_load`` has side effects outside the states: on any fault a SnapshotError
    subclass is raised and the file is closed.
    """
    path = os.fspath(path)
    cmap = _class_map(classes)
    required = list(required)
    fd, st = _open(path)
    try:
        p = _parse(fd, st, path)
        names = [s.name for s in p.sections]
        for s in p.sections:
            if _lookup(cmap, s.name) is None:
                raise UnknownSection(f"section {s.name!r}: no state class is known for it",
                                     s.name)
        check_sections(names, required, allowed)
        states: dict[str, State] = {}
        for s, blob in zip(p.sections, p.payloads):
            cls = _lookup(cmap, s.name)
            assert cls is not None
            states[s.name] = decode_state(cls, s.name, s.version, blob)
        if verify_memory:
            _verify_memory(fd, p.header, p.regions, p.sums, path)
        h = p.header
        return LoadedSnapshot(
            path=path,
            header=SnapshotHeader(h.format_version, h.created_ns, h.meta_len, h.mem_offset,
                                  p.file_size, h.chunk_size, h.page_size),
            sections=[SectionInfo(s.name, s.version, s.length) for s in p.sections],
            states=states,
            regions=[LoadedRegion(r.name, r.gpa, r.size, h.mem_offset + r.offset, data)
                     for r, (data, _) in zip(p.regions, p.sums)],
            fd=fd)
    except BaseException:
        os.close(fd)
        raise


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-able description of a snapshot, from its validated header and table only
    (sections are not decoded, memory is not read)."""
    path = os.fspath(path)
    fd, st = _open(path)
    try:
        p = _parse(fd, st, path)
    finally:
        os.close(fd)
    h = p.header
    return {
        "path": path,
        "format_version": h.format_version,
        "created": iso_utc(h.created_ns),
        "sections": [{"name": s.name, "version": s.version, "length": s.length}
                     for s in p.sections],
        "regions": [{"name": r.name, "gpa": r.gpa, "size": r.size, "data": data}
                    for r, (data, _) in zip(p.regions, p.sums)],
        "memory_size": sum(r.size for r in p.regions),
        "memory_data": sum(data for data, _ in p.sums),
        "file_size": p.file_size,
        "size_on_disk": p.blocks * 512,
    }
