"""The page-table walk over a fake guest-physical memory, for each paging mode."""

from __future__ import annotations

import struct

import pytest

from xend_lite.errors import GuestMemoryError, InvalidArgument
from xend_lite.vmm.pagewalk import CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA, Paging, translate

P, W, PS = 1, 2, 1 << 7


class Mem:
    """Sparse guest-physical memory: a table entry is a word at an address."""

    def __init__(self, size: int = 1 << 32):
        self.words: dict[int, int] = {}
        self.size = size

    def put64(self, addr: int, v: int) -> None:
        self.words[addr] = v

    def put32(self, addr: int, v: int) -> None:
        self.words[addr] = v

    def read_u64(self, addr: int) -> int:
        if addr + 8 > self.size:
            raise GuestMemoryError("outside", addr, 8)
        return self.words.get(addr, 0)

    def read_u32(self, addr: int) -> int:
        if addr + 4 > self.size:
            raise GuestMemoryError("outside", addr, 4)
        return self.words.get(addr, 0) & 0xFFFF_FFFF


LONG = Paging(CR0_PG | 1, 0x1000, CR4_PAE, EFER_LMA | 0x100)


def test_no_paging_is_identity():
    assert translate(Mem(), Paging(0x11, 0, 0, 0), 0x12345) == 0x12345


def test_four_level_4k_2m_and_1g_pages():
    m = Mem()
    gva = 0xFFFF_8000_1234_5678          # pml4 256, pdpt 0, pd 0x91, pt 0x145
    m.put64(0x1000 + 256 * 8, 0x2000 | P | W)
    m.put64(0x2000 + 0 * 8, 0x3000 | P)
    m.put64(0x3000 + 0x91 * 8, 0x4000 | P)
    m.put64(0x4000 + 0x145 * 8, 0xABC000 | P | 1 << 63)   # NX bit is not part of the address
    assert translate(m, LONG, gva) == 0xABC678
    m.put64(0x3000 + 0x91 * 8, 0x4000_0000 | P | PS)       # a 2 MiB page
    assert translate(m, LONG, gva) == 0x4000_0000 | (gva & 0x1F_FFFF)
    m.put64(0x2000 + 0 * 8, 0x8000_0000 | P | PS)          # a 1 GiB page
    assert translate(m, LONG, gva) == 0x8000_0000 | (gva & 0x3FFF_FFFF)


def test_five_level():
    m = Mem()
    pg = Paging(CR0_PG, 0x1000, CR4_PAE | CR4_LA57, EFER_LMA)
    gva = 2 << 39 | 0x123                                  # pml5 0, pml4 2
    m.put64(0x1000, 0x2000 | P)
    m.put64(0x2000 + 2 * 8, 0x3000 | P)
    m.put64(0x3000, 0x4000 | P)
    m.put64(0x4000, 0x5000 | P)
    m.put64(0x5000, 0x7000 | P)
    assert translate(m, pg, gva) == 0x7123
    with pytest.raises(InvalidArgument):
        translate(m, pg, 0x0100_0000_0000_0000)           # not canonical with 57 bits


def test_pae_and_32_bit():
    m = Mem()
    pae = Paging(CR0_PG, 0x1020, CR4_PAE, 0)
    gva = 0xC040_1234                                      # pdpt 3, pd 2, pt 1
    m.put64(0x1020 + 3 * 8, 0x2000 | P)
    m.put64(0x2000 + 2 * 8, 0x3000 | P)
    m.put64(0x3000 + 1 * 8, 0x9000 | P)
    assert translate(m, pae, gva) == 0x9234
    m.put64(0x2000 + 2 * 8, 0x60_0000 | P | PS)
    assert translate(m, pae, gva) == 0x60_0000 | (gva & 0x1F_FFFF)

    flat = Paging(CR0_PG, 0x5000, CR4_PSE, 0)
    m.put32(0x5000 + (gva >> 22) * 4, 0x6000 | P)
    m.put32(0x6000 + ((gva >> 12) & 0x3FF) * 4, 0x7000 | P)
    assert translate(m, flat, gva) == 0x7234
    m.put32(0x5000 + (gva >> 22) * 4, 0x0C00_0000 | 1 << 13 | P | PS)   # PSE-36: bit 32
    assert translate(m, flat, gva) == 1 << 32 | 0x0C00_0000 | (gva & 0x3F_FFFF)
    with pytest.raises(InvalidArgument):
        translate(m, flat, 1 << 32)


def test_not_present_non_canonical_and_tables_outside_memory():
    m = Mem()
    with pytest.raises(GuestMemoryError, match="not mapped"):
        translate(m, LONG, 0x1000)
    with pytest.raises(InvalidArgument, match="canonical"):
        translate(m, LONG, 0x0000_8000_0000_0000)
    far = Paging(CR0_PG, 0xFFFF_F000, CR4_PAE, EFER_LMA)
    with pytest.raises(GuestMemoryError, match="outside guest memory"):
        translate(Mem(size=1 << 20), far, 0x1000)
