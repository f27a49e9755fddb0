"""State classes and memory builders shared by the snapshot tests."""

from __future__ import annotations

import os
import random
import zlib
from dataclasses import dataclass, field
from typing import Any

from xend_lite.snapshot import MemoryRegion, State
from xend_lite.snapshot import codec
from xend_lite.snapshot import fileformat as ff

PAGE = 4096
MiB = 1 << 20


@dataclass
class Regs:
    rax: int = 0
    rip: int = 0
    flags: list[bool] = field(default_factory=list)


@dataclass
class CpuState(State, register=False):
    NAME = "tcpu"
    VERSION = 1
    regs: Regs
    msrs: dict[str, int] = field(default_factory=dict)
    cr: tuple[int, ...] = ()
    name: str | None = None
    blob: bytes = b""
    ratio: float = 0.0
    extra: Any = None


@dataclass
class ClockState(State, register=False):
    NAME = "tclock"
    VERSION = 1
    ns: int = 0
    running: bool = True


def sample_states(seed: int = 0) -> dict[str, State]:
    return {
        "tcpu/0": CpuState(Regs(rax=seed, rip=0xFFFF_FFFF_8100_0000 + seed, flags=[True, False]),
                           msrs={"efer": 0xD01, "star": seed}, cr=(1, 2, 3 + seed), name="cpu0",
                           blob=bytes(range(seed % 7, 40)), ratio=1.5 + seed,
                           extra={"a": [1, None, "x"]}),
        "tclock": ClockState(ns=123456789 + seed, running=bool(seed % 2)),
    }


CLASSES = {"tcpu": CpuState, "tclock": ClockState}


def memfd(size: int, name: str = "ram") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def fill_pages(fd: int, pages: list[int], seed: int) -> None:
    """Write a pseudo-random page at each page index."""
    rng = random.Random(seed)
    for p in pages:
        os.pwrite(fd, rng.randbytes(PAGE), p * PAGE)


def read_all(fd: int, size: int, offset: int = 0) -> bytes:
    out = bytearray()
    while len(out) < size:
        b = os.pread(fd, min(size - len(out), 16 * MiB), offset + len(out))
        if not b:
            out += bytes(size - len(out))
            break
        out += b
    return bytes(out)


def small_memory(seed: int = 0) -> tuple[list[MemoryRegion], dict[str, bytes]]:
    """Two small regions: data pages, explicitly written zero pages and holes."""
    lo = memfd(1 * MiB, "lo")
    fill_pages(lo, [0, 1, 5, 200, 255], seed)
    os.pwrite(lo, bytes(PAGE), 7 * PAGE)  # an allocated page of zeros
    hi = memfd(2 * MiB, "hi")
    fill_pages(hi, list(range(0, 512, 3)), seed + 1)
    regions = [MemoryRegion("lo", 0, 1 * MiB, lo), MemoryRegion("hi", 1 << 32, 2 * MiB, hi)]
    contents = {"lo": read_all(lo, 1 * MiB), "hi": read_all(hi, 2 * MiB)}
    return regions, contents


def close_regions(regions: list[MemoryRegion]) -> None:
    for r in regions:
        if r.fd >= 0:
            os.close(r.fd)


def build_file(sections: list[dict[str, Any]], payloads: list[bytes],
               regions: list[dict[str, Any]] | None = None, *,
               version: int = ff.FORMAT_VERSION, fix_section_crcs: bool = True,
               table: bytes | None = None) -> bytes:
    """A snapshot file built by hand (memory all holes), for tables the writer never makes.
    ``sections`` entries may leave out offset/length/crc32; they are filled in."""
    regions = regions or []
    secs, pos = [], 0
    for s, blob in zip(sections, payloads):
        e = {"name": s["name"], "version": s.get("version", 1), "offset": s.get("offset", pos),
             "length": s.get("length", len(blob)),
             "crc32": zlib.crc32(blob) if fix_section_crcs else s.get("crc32", 0)}
        secs.append(e)
        pos += len(blob)
    if table is None:
        table = codec.encode({"sections": secs, "regions": regions})
    chunk = ff.CHUNK_SIZE
    sums = bytearray()
    for r in regions:
        n = ff.chunk_count(r["size"], chunk)
        sums += ff.SUM_HEAD.pack(0)
        for i in range(n):
            sums += ff.zero_chunk_sum(min(chunk, r["size"] - i * chunk)).to_bytes(4, "little")
    meta = table + b"".join(payloads) + bytes(sums)
    mem_offset = ff.align_up(ff.HEADER_SIZE + len(meta))
    file_end = mem_offset + ff.align_up(sum(r["size"] for r in regions))
    h = ff.Header(version, 0, 1_700_000_000_000_000_000, len(meta), mem_offset, file_end,
                  len(table), chunk, ff.PAGE_SIZE, 0)
    pre = bytearray(h.pack()) + meta
    pre += bytes(mem_offset - len(pre))
    fix_header_crc(pre)
    return bytes(pre) + bytes(file_end - mem_offset)


def fix_header_crc(buf: bytearray) -> None:
    """Recompute the header checksum of a file image in place."""
    meta_len = int.from_bytes(buf[24:32], "little")
    n = ff.align_up(ff.HEADER_SIZE + meta_len)
    buf[ff.CRC_OFFSET:ff.HEADER_SIZE] = ff.header_crc(bytes(buf[:n])).to_bytes(4, "little")


CRASH_SIZE = 8 * MiB


def crash_memory(seed: int) -> int:
    """An 8 MiB memfd, every other page pseudo-random data (the same for the same seed)."""
    fd = memfd(CRASH_SIZE, f"crash{seed}")
    data = random.Random(seed).randbytes(CRASH_SIZE // 2)
    for i in range(0, CRASH_SIZE // PAGE, 2):
        j = i // 2 * PAGE
        os.pwrite(fd, data[j:j + PAGE], i * PAGE)
    return fd
