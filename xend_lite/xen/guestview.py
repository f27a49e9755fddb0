"""Guest-virtual memory for one hypercall, as Xen's copy_from_guest / copy_to_guest see it.

Hypercall pointers are linear addresses in the calling vCPU's current paging. With paging off
they are physical (truncated to 32 bits outside long mode); with paging on each page is
translated with KVM_TRANSLATE, never assuming an identity map. Every access then goes through
the bounds-checked guest-physical helpers: an unmapped page, a non-canonical address, a range
past the end of memory or a length that makes no sense raises XenError(EFAULT).
"""

from __future__ import annotations

from xend_lite.errors import GuestMemoryError
from xend_lite.kvm import KvmError
from xend_lite.xen.xenabi import Layout
from xend_lite.machine.backing import PAGE_SIZE
from xend_lite.machine.guestmem import GuestMemory
from xend_lite.xen.errors import fault

CR0_PG = 1 << 31
MAX_COPY = 1 << 24  # one copy never exceeds 16 MiB; callers chunk larger transfers
_U64 = (1 << 64) - 1


class GuestView:
    __slots__ = ("mem", "vcpu", "long_mode", "paging", "_tlb")

    def __init__(self, mem: GuestMemory, vcpu, long_mode: bool, paging: bool):
        self.mem = mem
        self.vcpu = vcpu
        self.long_mode = long_mode
        self.paging = paging
        self._tlb: dict[int, int] = {}

    @classmethod
    def for_vcpu(cls, mem: GuestMemory, vcpu, long_mode: bool) -> GuestView:
        return cls(mem, vcpu, long_mode, bool(vcpu.synced_cr0() & CR0_PG))

    def _gpa_page(self, page: int) -> int:
        gpa = self._tlb.get(page)
        if gpa is not None:
            return gpa
        if not self.paging:
            gpa = page
        else:
            try:
                t = self.vcpu.translate(page)
            except KvmError as exc:
                raise fault(f"cannot translate {page:#x}") from exc
            if not t.valid or t.physical_address == _U64:
                raise fault(f"guest address {page:#x} is not mapped")
            gpa = t.physical_address & ~(PAGE_SIZE - 1)
        self._tlb[page] = gpa
        return gpa

    def _pieces(self, gva: int, length: int):
        if not isinstance(gva, int) or not isinstance(length, int) or length < 0 or length > MAX_COPY:
            raise fault("bad guest buffer")
        if self.long_mode:
            if gva < 0 or gva + max(length, 1) - 1 > _U64:
                raise fault("guest address out of range")
            if length:
                for a in (gva, gva + length - 1):
                    top = a >> 47
                    if top not in (0, 0x1FFFF):
                        raise fault(f"non-canonical guest address {a:#x}")
        else:
            if gva < 0 or gva + length > 1 << 32:
                raise fault("guest address past 4 GiB in 32-bit mode")
        pos, end = gva, gva + length
        while pos < end:
            page = pos & ~(PAGE_SIZE - 1)
            n = min(end, page + PAGE_SIZE) - pos
            yield self._gpa_page(page) + (pos - page), n
            pos += n

    def physical(self, gva: int, length: int) -> list[tuple[int, int]]:
        """Where ``length`` bytes at ``gva`` are now: (guest-physical address, bytes) pieces."""
        pieces = list(self._pieces(gva, length))
        for gpa, n in pieces:
            if not self.mem.is_backed(gpa, n):
                raise fault(f"guest-physical {gpa:#x} is not memory")
        return pieces

    def read(self, gva: int, length: int) -> bytes:
        out = bytearray()
        try:
            for gpa, n in self._pieces(gva, length):
                out += self.mem.read(gpa, n)
        except GuestMemoryError as exc:
            raise fault(str(exc)) from exc
        return bytes(out)

    def write(self, gva: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(bytes(data))
        pieces = list(self._pieces(gva, len(data)))  # translate every page before writing any
        try:
            for gpa, _n in pieces:
                if not self.mem.is_backed(gpa, _n):
                    raise fault(f"guest-physical {gpa:#x} is not memory")
            pos = 0
            for gpa, n in pieces:
                self.mem.write(gpa, data[pos:pos + n])
                pos += n
        except GuestMemoryError as exc:
            raise fault(str(exc)) from exc

    def read_uint(self, gva: int, size: int) -> int:
        return int.from_bytes(self.read(gva, size), "little")

    def write_uint(self, gva: int, size: int, value: int) -> None:
        self.write(gva, (value & ((1 << (size * 8)) - 1)).to_bytes(size, "little"))

    def read_struct(self, lay: Layout, gva: int) -> dict[str, int]:
        return lay.unpack(self.read(gva, lay.size))

    def write_fields(self, lay: Layout, gva: int, values: dict[str, int]) -> None:
        """Write only the named fields (as copy_field_to_guest does)."""
        for name, v in values.items():
            f = lay.fields[name]
            self.write(gva + f.offset, (int(v) & ((1 << (f.size * 8)) - 1)).to_bytes(f.size, "little"))
