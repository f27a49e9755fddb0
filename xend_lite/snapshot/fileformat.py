"""The snapshot file layout, shared by the writer and the reader.

One file holds a whole snapshot (so one rename publishes it). All integers little-endian::

    0      header, 64 bytes:
             magic "XLSNAP\\r\\n", u32 format version, u32 flags (0), u64 creation time (ns
             since the epoch), u64 metadata length, u64 memory offset, u64 file end,
             u32 table length, u32 checksum chunk size, u32 page size, u32 CRC-32
    64     metadata (metadata length bytes):
             table     codec dict {"sections": [{name, version, offset, length, crc32}],
                                   "regions": [{name, gpa, size, offset}]}
                       (a region's offset counts from the memory offset)
             payloads  each section's encoded State, back to back in table order
             sums      per region: u64 data bytes, then one u32 chunk sum per chunk of memory
    ...    zero padding up to the memory offset (the next page boundary)
    memory each region's guest memory at its page-aligned offset, back to back up to the
           file end; all-zero pages are holes that take no disk space

The header CRC-32 covers every byte before the memory offset (header with the CRC field
zeroed, metadata and padding). Each section also carries its own CRC-32, so corruption is
reported by section. Chunk sums cover the region's memory in chunk-size pieces (the last one
may be shorter); the reader only reads them back when asked to verify memory. A chunk sum is
CRC-32C taken over four lanes of the chunk at once, combined by one more CRC-32C (see
``xend_lite/snapshot/_build.py``): several gigabytes a second on one core, so checksumming
keeps up with the disk.

Format history: version 1 summed chunks with plain CRC-32 (zlib), about four times slower;
version 2 (this one) with the lanes of CRC-32C. Everything else is the same, so both are read
(``chunk_summer`` picks the sum); only version 2 is written.
"""

from __future__ import annotations

import array
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any

from xend_lite.snapshot.checksum import chunk_sum
from xend_lite.snapshot import codec
from xend_lite.snapshot.errors import (
    BadMagic,
    DuplicateSection,
    MalformedSnapshot,
    MemoryTableError,
    Truncated,
    UnsupportedFormat,
)
from xend_lite.snapshot.state import INSTANCE_RE, NAME_RE, SEPARATOR

MAGIC = b"XLSNAP\r\n"
FORMAT_VERSION = 2
#: versions this program reads (and the chunk sum each uses, see chunk_summer)
READ_VERSIONS = (1, 2)
PAGE_SIZE = 4096
CHUNK_SIZE = 1 << 20
HEADER = struct.Struct("<8sIIQQQQIIII")
HEADER_SIZE = HEADER.size
CRC_OFFSET = HEADER_SIZE - 4
MAX_METADATA = 256 << 20
MAX_U64 = (1 << 64) - 1
SUM_HEAD = struct.Struct("<Q")

assert HEADER_SIZE == 64


def align_up(n: int, a: int = PAGE_SIZE) -> int:
    return (n + a - 1) // a * a


_ZERO_SUMS: dict[tuple[int, int], int] = {}


def chunk_summer(version: int = FORMAT_VERSION):
    """The chunk sum of format ``version``: a function of a bytes-like chunk."""
    return zlib.crc32 if version == 1 else chunk_sum


def zero_chunk_sum(n: int, version: int = FORMAT_VERSION) -> int:
    """The chunk sum of ``n`` zero bytes (cached; n is a chunk length)."""
    c = _ZERO_SUMS.get((n, version))
    if c is None:
        c = _ZERO_SUMS[n, version] = chunk_summer(version)(bytes(n))
    return c


def chunk_count(size: int, chunk: int) -> int:
    return (size + chunk - 1) // chunk


def sums_length(sizes: list[int], chunk: int) -> int:
    return sum(SUM_HEAD.size + 4 * chunk_count(s, chunk) for s in sizes)


def valid_section_name(name: Any) -> bool:
    if type(name) is not str:
        return False
    base, sep, inst = name.partition(SEPARATOR)
    return bool(NAME_RE.match(base)) and (not sep or bool(INSTANCE_RE.match(inst)))


def valid_region_name(name: Any) -> bool:
    return type(name) is str and 0 < len(name) <= 64 and name.isprintable()


@dataclass(frozen=True)
class Header:
    format_version: int
    flags: int
    created_ns: int
    meta_len: int
    mem_offset: int
    file_end: int
    table_len: int
    chunk_size: int
    page_size: int
    crc: int

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.format_version, self.flags, self.created_ns,
                           self.meta_len, self.mem_offset, self.file_end, self.table_len,
                           self.chunk_size, self.page_size, self.crc)


@dataclass(frozen=True)
class SectionEntry:
    name: str
    version: int
    offset: int  # into the payload area
    length: int
    crc32: int


@dataclass(frozen=True)
class RegionEntry:
    name: str
    gpa: int
    size: int
    offset: int  # from the memory offset


def parse_header(raw: bytes, file_size: int) -> Header:
    """First look at a header: magic, format version and the metadata length, which says how
    much to read for the checksum. Fields the checksum protects are checked afterwards by
    :func:`check_header_fields`, so that a flipped bit is reported as corruption."""
    if len(raw) < len(MAGIC) and MAGIC.startswith(raw):
        raise Truncated(f"file ends inside the header ({len(raw)} of {HEADER_SIZE} bytes)",
                        HEADER_SIZE, len(raw))
    if raw[:len(MAGIC)] != MAGIC:
        raise BadMagic("not a xend-lite snapshot (bad magic)")
    if len(raw) < HEADER_SIZE:
        raise Truncated(f"file ends inside the header ({len(raw)} of {HEADER_SIZE} bytes)",
                        HEADER_SIZE, len(raw))
    h = Header(*HEADER.unpack(raw[:HEADER_SIZE])[1:])
    if h.format_version not in READ_VERSIONS:
        v = h.format_version
        what = "newer than this program" if v > FORMAT_VERSION else "unknown to this program"
        raise UnsupportedFormat(f"snapshot format version {v} is {what} (it reads versions "
                                f"{', '.join(map(str, READ_VERSIONS))})", v, FORMAT_VERSION)
    if h.meta_len > MAX_METADATA:
        raise MalformedSnapshot(f"metadata length {h.meta_len} exceeds {MAX_METADATA}")
    meta_end = HEADER_SIZE + h.meta_len
    if file_size < meta_end:
        raise Truncated(f"file is {file_size} bytes, shorter than its {meta_end} bytes of "
                        f"header and sections", meta_end, file_size)
    return h


def pre_memory_length(h: Header) -> int:
    """Bytes the header checksum covers: header, metadata and padding to the next page."""
    return align_up(HEADER_SIZE + h.meta_len)


def check_header_fields(h: Header, file_size: int) -> None:
    """Sanity of the fields once the checksum has matched."""
    if h.flags != 0:
        raise UnsupportedFormat(f"snapshot uses feature flags {h.flags:#x} this program "
                                "does not know", h.format_version, FORMAT_VERSION)
    if h.page_size != PAGE_SIZE:
        raise MalformedSnapshot(f"page size {h.page_size} is not {PAGE_SIZE}")
    c = h.chunk_size
    if c < PAGE_SIZE or c > (1 << 30) or c & (c - 1):
        raise MalformedSnapshot(f"checksum chunk size {c} is not a power of two in "
                                f"[{PAGE_SIZE}, 1 GiB]")
    if h.table_len > h.meta_len:
        raise MalformedSnapshot(f"table length {h.table_len} exceeds the metadata "
                                f"({h.meta_len})")
    if h.mem_offset != pre_memory_length(h):
        raise MalformedSnapshot(f"memory offset {h.mem_offset} is not the page after the "
                                f"metadata ({pre_memory_length(h)})")
    if h.file_end < h.mem_offset or h.file_end % PAGE_SIZE:
        raise MalformedSnapshot(f"file end {h.file_end} is before the memory offset or "
                                "not page-aligned")
    if file_size < h.file_end:
        raise Truncated(f"file is {file_size} bytes, shorter than the declared memory end "
                        f"{h.file_end}", h.file_end, file_size)
    if file_size != h.file_end:
        raise MalformedSnapshot(f"file is {file_size} bytes but declares its end at "
                                f"{h.file_end} (trailing data)")


def header_crc(pre_memory: bytes | bytearray | memoryview) -> int:
    """CRC-32 of everything before the memory offset, with the CRC field taken as zero."""
    mv = memoryview(pre_memory)
    crc = zlib.crc32(mv[:CRC_OFFSET])
    crc = zlib.crc32(b"\0\0\0\0", crc)
    return zlib.crc32(mv[HEADER_SIZE:], crc)


def build_table(sections: list[SectionEntry], regions: list[RegionEntry]) -> bytes:
    return codec.encode({
        "sections": [{"name": s.name, "version": s.version, "offset": s.offset,
                      "length": s.length, "crc32": s.crc32} for s in sections],
        "regions": [{"name": r.name, "gpa": r.gpa, "size": r.size, "offset": r.offset}
                    for r in regions],
    })


_SECTION_KEYS = {"name": str, "version": int, "offset": int, "length": int, "crc32": int}
_REGION_KEYS = {"name": str, "gpa": int, "size": int, "offset": int}


def _entry(raw: Any, keys: dict[str, type], what: str) -> dict[str, Any]:
    if type(raw) is not dict or set(raw) != set(keys):
        raise MalformedSnapshot(f"{what}: expected fields {sorted(keys)}")
    for k, t in keys.items():
        if type(raw[k]) is not t or (t is int and raw[k] < 0):
            raise MalformedSnapshot(f"{what}: field {k!r} has a bad value {raw[k]!r}")
    return raw


def parse_table(h: Header, table: bytes) -> tuple[list[SectionEntry], list[RegionEntry]]:
    """Decode and check the table: section names, versions, contiguous payloads, and a
    memory table of unique, page-aligned, non-overlapping regions inside the file."""
    try:
        raw = codec.decode(table)
    except codec.CodecError as err:
        raise MalformedSnapshot(f"section table does not decode: {err}") from None
    if type(raw) is not dict or set(raw) != {"sections", "regions"}:
        raise MalformedSnapshot("section table lacks its sections and regions")
    if type(raw["sections"]) is not list or type(raw["regions"]) is not list:
        raise MalformedSnapshot("section table: sections and regions must be lists")

    sections: list[SectionEntry] = []
    names: set[str] = set()
    pos = 0
    for i, s in enumerate(raw["sections"]):
        e = _entry(s, _SECTION_KEYS, f"section #{i}")
        if not valid_section_name(e["name"]):
            raise MalformedSnapshot(f"section #{i}: {e['name']!r} is not a valid name")
        if e["name"] in names:
            raise DuplicateSection(f"section {e['name']!r} appears twice", e["name"])
        if not 1 <= e["version"] < (1 << 32):
            raise MalformedSnapshot(f"section {e['name']!r}: version {e['version']} invalid")
        if e["offset"] != pos or e["crc32"] > 0xFFFFFFFF:
            raise MalformedSnapshot(f"section {e['name']!r}: offset or checksum invalid")
        pos += e["length"]
        names.add(e["name"])
        sections.append(SectionEntry(**e))

    regions: list[RegionEntry] = []
    rnames: set[str] = set()
    end = 0
    for i, r in enumerate(raw["regions"]):
        e = _entry(r, _REGION_KEYS, f"memory region #{i}")
        name = e["name"]
        if not valid_region_name(name):
            raise MemoryTableError(f"memory region #{i}: {name!r} is not a valid name")
        if name in rnames:
            raise MemoryTableError(f"memory region {name!r} appears twice")
        if e["size"] == 0 or e["size"] % PAGE_SIZE or e["offset"] % PAGE_SIZE:
            raise MemoryTableError(f"memory region {name!r}: size or offset not page-aligned")
        if e["gpa"] % PAGE_SIZE or e["gpa"] + e["size"] - 1 > MAX_U64:
            raise MemoryTableError(f"memory region {name!r}: guest address not page-aligned "
                                   "or past 2^64")
        if e["offset"] < end:
            raise MemoryTableError(f"memory region {name!r} overlaps the region before it")
        end = e["offset"] + e["size"]
        if h.mem_offset + end > h.file_end:
            raise MemoryTableError(f"memory region {name!r} ends at {h.mem_offset + end}, "
                                   f"past the file end {h.file_end}")
        rnames.add(name)
        regions.append(RegionEntry(**e))
    by_gpa = sorted(regions, key=lambda r: r.gpa)
    for a, b in zip(by_gpa, by_gpa[1:]):
        if b.gpa < a.gpa + a.size:
            raise MemoryTableError(f"memory regions {a.name!r} and {b.name!r} overlap in "
                                   "guest memory")
    if h.mem_offset + end != h.file_end:
        raise MemoryTableError(f"memory ends at {h.mem_offset + end} but the file end is "
                               f"{h.file_end}")

    expected = len(table) + pos + sums_length([r.size for r in regions], h.chunk_size)
    if expected != h.meta_len:
        raise MalformedSnapshot(f"metadata length {h.meta_len} does not match its table, "
                                f"sections and memory checksums ({expected})")
    return sections, regions


def _u32_list(raw: bytes) -> list[int]:
    """Little-endian u32s, decoded in C (a 4 GiB guest has 4096 chunk sums)."""
    a = array.array("I")
    assert a.itemsize == 4
    a.frombytes(raw)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


def parse_sums(h: Header, regions: list[RegionEntry], blob: bytes) -> list[tuple[int, list[int]]]:
    """Split the memory checksum block into (data bytes, chunk sums) per region."""
    out = []
    pos = 0
    for r in regions:
        n = chunk_count(r.size, h.chunk_size)
        if pos + SUM_HEAD.size + 4 * n > len(blob):
            raise MemoryTableError("memory checksums are shorter than the memory table needs")
        (data,) = SUM_HEAD.unpack_from(blob, pos)
        pos += SUM_HEAD.size
        if data > r.size or data % PAGE_SIZE:
            raise MemoryTableError(f"memory region {r.name!r}: {data} data bytes do not fit "
                                   f"its {r.size} bytes in whole pages")
        crcs = _u32_list(blob[pos:pos + 4 * n])
        pos += 4 * n
        out.append((data, crcs))
    if pos != len(blob):
        raise MemoryTableError("memory checksums are longer than the memory table needs")
    return out
