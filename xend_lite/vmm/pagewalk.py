"""Guest-virtual to guest-physical translation by walking the guest's own page tables.

The walk starts at CR3 and reads each table entry guest-physically (through overlays, as the
guest's MMU would), for the four paging modes: none (CR0.PG clear), 32-bit (with 4 MiB pages
when CR4.PSE is set), PAE (3 levels, 2 MiB pages) and long mode (4 levels, or 5 with CR4.LA57;
1 GiB and 2 MiB pages). At most five entries are read per address. A non-canonical address is
refused (InvalidArgument); a not-present entry or a table outside guest memory is a
GuestMemoryError naming the address.
"""

from __future__ import annotations

from dataclasses import dataclass

from xend_lite.errors import GuestMemoryError, InvalidArgument

CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
PRESENT = 1
PAGE_SIZE_BIT = 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000
PAGE = 4096


@dataclass(frozen=True)
class Paging:
    """The control registers a walk needs."""

    cr0: int
    cr3: int
    cr4: int
    efer: int

    @property
    def mode(self) -> str:
        if not self.cr0 & CR0_PG:
            return "none"
        if self.efer & EFER_LMA:
            return "5-level" if self.cr4 & CR4_LA57 else "4-level"
        return "pae" if self.cr4 & CR4_PAE else "32-bit"


def check_canonical(paging: Paging, gva: int) -> None:
    if not isinstance(gva, int) or gva < 0 or gva >= 1 << 64:
        raise InvalidArgument("a guest-virtual address is an integer in 0..2^64-1")
    mode = paging.mode
    if mode in ("4-level", "5-level"):
        bits = 57 if mode == "5-level" else 48
        top = gva >> (bits - 1)
        if top not in (0, (1 << (65 - bits)) - 1):
            raise InvalidArgument(f"{gva:#x} is not a canonical address")
    elif gva >= 1 << 32:
        raise InvalidArgument(f"{gva:#x} is beyond the 32-bit address space of this vCPU's mode")


def _entry(read_u64, read_u32, addr: int, wide: bool, gva: int) -> int:
    try:
        return read_u64(addr) if wide else read_u32(addr)
    except GuestMemoryError:
        raise GuestMemoryError(f"page table of {gva:#x} at {addr:#x} is outside guest memory",
                               addr, 8 if wide else 4) from None


def translate(mem, paging: Paging, gva: int) -> int:
    """The guest-physical address ``gva`` maps to (``mem`` reads guest-physical u32/u64)."""
    check_canonical(paging, gva)
    mode = paging.mode
    if mode == "none":
        return gva
    r64, r32 = mem.read_u64, mem.read_u32

    def missing(level: str) -> GuestMemoryError:
        return GuestMemoryError(f"{gva:#x} is not mapped (no {level} entry)", gva, 1)

    if mode == "32-bit":
        pde = _entry(r64, r32, (paging.cr3 & 0xFFFF_F000) + ((gva >> 22) & 0x3FF) * 4, False, gva)
        if not pde & PRESENT:
            raise missing("page-directory")
        if pde & PAGE_SIZE_BIT and paging.cr4 & CR4_PSE:
            high = ((pde >> 13) & 0xFF) << 32           # PSE-36 bits
            return high | (pde & 0xFFC0_0000) | (gva & 0x3F_FFFF)
        pte = _entry(r64, r32, (pde & 0xFFFF_F000) + ((gva >> 12) & 0x3FF) * 4, False, gva)
        if not pte & PRESENT:
            raise missing("page-table")
        return (pte & 0xFFFF_F000) | (gva & 0xFFF)
    if mode == "pae":
        table = paging.cr3 & 0xFFFF_FFE0
        levels = [(30, 0x3, "pdpt")]
    else:
        table = paging.cr3 & ADDR_MASK
        levels = [(39, 0x1FF, "pml4"), (30, 0x1FF, "pdpt")]
        if mode == "5-level":
            levels.insert(0, (48, 0x1FF, "pml5"))
    levels += [(21, 0x1FF, "page-directory"), (12, 0x1FF, "page-table")]
    for shift, mask, name in levels:
        e = _entry(r64, r32, table + ((gva >> shift) & mask) * 8, True, gva)
        if not e & PRESENT:
            raise missing(name)
        large = shift in (21, 30) and e & PAGE_SIZE_BIT and not (mode == "pae" and shift == 30)
        if large:
            size = 1 << shift
            return (e & ADDR_MASK & ~(size - 1)) | (gva & (size - 1))
        table = e & ADDR_MASK
    return table | (gva & 0xFFF)
