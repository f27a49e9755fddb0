"""A shared page as the rings see it, and byte rings with free-running 32-bit indices.

The xenstore and console rings live in a guest page that the guest may change at any moment
and that may be replaced under a long-lived view (guest RAM is remapped on restore). So the
rings never hold a view of it: every access goes through a :class:`Page`, which the
integrator backs with bounds-checked guest-memory reads and writes. Indices read from the
page are guest-controlled: :func:`ring_used` says when a producer/consumer pair is
impossible, and the chunk helpers never touch a byte outside the ring they are given.
"""

from __future__ import annotations

import struct
from typing import Protocol

__all__ = ["Page", "BytesPage", "IDX_MASK", "ring_used", "ring_read", "ring_write",
           "read_u32s", "write_u32"]

IDX_MASK = 0xFFFF_FFFF
PAGE_SIZE = 4096


class Page(Protocol):
    """Byte access to one shared page. Offsets and lengths are within the page."""

    def read(self, off: int, n: int) -> bytes: ...

    def write(self, off: int, data: bytes) -> None: ...


class BytesPage:
    """A page backed by a bytearray: for tests and for rings kept in host memory."""

    def __init__(self, size: int = PAGE_SIZE):
        self.buf = bytearray(size)

    def read(self, off: int, n: int) -> bytes:
        if off < 0 or n < 0 or off + n > len(self.buf):
            raise ValueError(f"page read [{off}, +{n}) outside {len(self.buf)} bytes")
        return bytes(self.buf[off:off + n])

    def write(self, off: int, data: bytes) -> None:
        if off < 0 or off + len(data) > len(self.buf):
            raise ValueError(f"page write [{off}, +{len(data)}) outside {len(self.buf)} bytes")
        self.buf[off:off + len(data)] = data


def read_u32s(page: Page, off: int, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{count}I", page.read(off, 4 * count))


def write_u32(page: Page, off: int, value: int) -> None:
    page.write(off, struct.pack("<I", value & IDX_MASK))


def ring_used(cons: int, prod: int, size: int) -> int | None:
    """Bytes between consumer and producer, or None when the pair is impossible (the
    producer is more than a ring ahead, or behind, the consumer)."""
    used = (prod - cons) & IDX_MASK
    return used if used <= size else None


def ring_read(page: Page, base: int, size: int, cons: int, n: int) -> bytes:
    """``n`` (<= size) bytes of the ring at [base, base+size) starting at stream offset
    ``cons``, across the wrap if needed."""
    assert 0 <= n <= size
    off = cons & (size - 1)
    first = min(n, size - off)
    data = page.read(base + off, first)
    if first < n:
        data += page.read(base, n - first)
    return data


def ring_write(page: Page, base: int, size: int, prod: int, data: bytes) -> None:
    """Write ``data`` (<= size bytes) into the ring at stream offset ``prod``."""
    assert len(data) <= size
    off = prod & (size - 1)
    first = min(len(data), size - off)
    page.write(base + off, data[:first])
    if first < len(data):
        page.write(base, data[first:])
