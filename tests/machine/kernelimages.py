"""Test-side makers of what the kernel reader opens: an LZ4 block encoder (greedy, written from
the format's description, independent of the decoder under test), legacy frames, and
bzImages with a chosen setup header around a chosen payload."""

from __future__ import annotations

import gzip
import lzma
import struct

LZ4_MAGIC = b"\x02\x21\x4c\x18"
BLOCK = 8 << 20


def _length(out: bytearray, extra: int) -> None:
    while extra >= 255:
        out.append(255)
        extra -= 255
    out.append(extra)


def sequence(literals: bytes, dist: int | None = None, match: int = 0) -> bytes:
    """One LZ4 sequence: literals, then (unless dist is None) a match of ``match`` >= 4 bytes."""
    out = bytearray()
    lit = len(literals)
    ml = 0 if dist is None else match - 4
    out.append((min(lit, 15) << 4) | min(ml, 15))
    if lit >= 15:
        _length(out, lit - 15)
    out += literals
    if dist is not None:
        out += struct.pack("<H", dist)
        if ml >= 15:
            _length(out, ml - 15)
    return bytes(out)


def compress_block(data: bytes) -> bytes:
    """An LZ4 block holding ``data``: 4-byte hash matches, the last 5 bytes always literals."""
    out = bytearray()
    table: dict[bytes, int] = {}
    n, i, anchor = len(data), 0, 0
    while i + 12 <= n:
        key = data[i:i + 4]
        cand = table.get(key)
        table[key] = i
        if cand is not None and i - cand <= 0xFFFF:
            m = 4
            while i + m < n - 5 and data[cand + m] == data[i + m]:
                m += 1
            out += sequence(data[anchor:i], i - cand, m)
            i += m
            anchor = i
        else:
            i += 1
    out += sequence(data[anchor:])
    return bytes(out)


def block_frame(block: bytes) -> bytes:
    return struct.pack("<I", len(block)) + block


def legacy_frame(data: bytes, trailer: bool = False) -> bytes:
    """LZ4 legacy frames as `lz4 -l` writes them (8 MiB blocks), optionally with Linux's
    size trailer."""
    out = bytearray(LZ4_MAGIC)
    for pos in range(0, max(len(data), 1), BLOCK):
        out += block_frame(compress_block(data[pos:pos + BLOCK]))
    if trailer:
        out += struct.pack("<I", len(data) & 0xFFFFFFFF)
    return bytes(out)


def compress(data: bytes, fmt: str) -> bytes:
    """A kernel payload as Linux's build makes it (size trailer on all but gzip)."""
    if fmt == "lz4":
        return legacy_frame(data, trailer=True)
    if fmt == "gzip":
        return gzip.compress(data, mtime=0)
    if fmt == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) \
            + struct.pack("<I", len(data))
    if fmt == "none":
        return data
    raise ValueError(fmt)


def bzimage(payload: bytes, *, version: int = 0x020F, setup_sects: int = 3,
            lead: int = 0x2CC, boot_flag: int = 0xAA55, length: int | None = None,
            tail: bytes = b"\xcc" * 64) -> bytes:
    """A bzImage: setup sectors with the header, ``lead`` bytes of protected-mode code, then
    the payload (payload_offset = lead), then ``tail``."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    banner = b"6.1.0-test (xend-lite) #1\0"
    setup[0x400:0x400 + len(banner)] = banner
    struct.pack_into("<H", setup, 0x20E, 0x400 - 0x200)
    struct.pack_into("<II", setup, 0x248, lead, len(payload) if length is None else length)
    struct.pack_into("<Q", setup, 0x258, 0x1000000)
    struct.pack_into("<I", setup, 0x260, 0x3000000)
    return bytes(setup) + b"\x90" * lead + payload + tail
