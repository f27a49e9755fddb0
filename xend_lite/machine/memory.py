"""Guest memory: backings, the flat memory map with overlay pages, and bounds-checked access.

The memory map is a flat view of guest-physical space: RAM regions, overlay pages that lie
above RAM (or above nothing), and RAM pages taken out by ballooning. From that view it
computes the KVM memory slots, splitting RAM around every overlay and every ballooned page,
and applies only the difference. Callers change the map with every vCPU paused
(Machine.update_memory); a failed apply restores the previous slots before it raises.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
from dataclasses import dataclass
from typing import Protocol

from xend_lite.errors import GuestMemoryError, InvalidArgument, NotFound
from xend_lite.machine.native import buffer_address, map_shared_fixed, punch_hole

PAGE_SIZE = 4096
PAGE_SHIFT = 12
INVALID_GPA = (1 << 64) - 1
# Low RAM ends here; RAM beyond it continues at 4 GiB (the hole holds the TSS and the
# identity-map page KVM needs, and is where a PC keeps its MMIO).
LOW_RAM_TOP = 0xC000_0000
HIGH_RAM_BASE = 0x1_0000_0000


_thread = threading.local()


def mark_vcpu_thread() -> None:
    """Called by each vCPU thread: its guest-memory accesses never race a RAM swap (a swap
    waits until every vCPU is parked), so they take no lock and never wait for one."""
    _thread.vcpu = True


def on_vcpu_thread() -> bool:
    return getattr(_thread, "vcpu", False)


class Backing:
    """Page-aligned host memory that can back guest-physical pages.

    ``anonymous`` memory is a memfd mapped MAP_SHARED (so untouched pages stay holes and a
    snapshot can find the data cheaply); ``from_file`` maps a file MAP_PRIVATE, so a restored
    guest never writes into its snapshot.
    """

    def __init__(self, name: str, fd: int, size: int, offset: int = 0, private: bool = False,
                 owns_fd: bool = True):
        if size <= 0 or size % PAGE_SIZE or offset % mmap.PAGESIZE:
            raise InvalidArgument(f"backing {name}: size and offset must be page multiples")
        self.name = name
        self.fd = fd
        self.size = size
        self.offset = offset
        self.private = private
        self._owns_fd = owns_fd
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        self.map = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self.view = memoryview(self.map)
        self.addr = buffer_address(self.map)

    @classmethod
    def anonymous(cls, name: str, size: int) -> Backing:
        fd = os.memfd_create(f"xend-lite:{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(name, fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_file(cls, name: str, fd: int, offset: int, size: int) -> Backing:
        return cls(name, fd, size, offset=offset, private=True, owns_fd=False)

    def zero(self, offset: int = 0, length: int | None = None) -> None:
        """Zero a range; for memfd backings the pages are released (they read back as zero)."""
        length = self.size - offset if length is None else length
        if not self.private:
            try:
                fallocate_punch(self.fd, self.offset + offset, length)
                return
            except OSError:
                pass
        self.view[offset:offset + length] = bytes(length)

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
            self.map.close()
            if self._owns_fd:
                os.close(self.fd)


def fallocate_punch(fd: int, offset: int, length: int) -> None:
    """Punch a hole (release pages, reads give zeros)."""
    punch_hole(fd, offset, length)


@dataclass(frozen=True, slots=True)
class RamRegion:
    gpa: int
    size: int
    backing: Backing
    offset: int  # into the backing

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True, slots=True)
class Segment:
    """One contiguous, backed stretch of guest-physical space (one KVM slot)."""

    gpa: int
    size: int
    backing: Backing
    offset: int
    kind: str  # "ram" | "overlay"
    name: str

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_addr(self) -> int:
        return self.backing.addr + self.offset


class SlotSink(Protocol):
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None: ...


class MemoryMap:
    """The flat view and the KVM slots it implies."""

    def __init__(self, sink: SlotSink, ram: list[RamRegion], phys_bits: int = 39,
                 reserved: list[tuple[int, int, str]] | None = None, remap_overlays: bool = False):
        self._sink = sink
        # An overlay over shared-memfd RAM can be mapped in place (MAP_FIXED over the RAM
        # page's host address) instead of splitting KVM slots around it: ~10x cheaper, and
        # the RAM beneath stays untouched in its memfd. Elsewhere (holes, private RAM) the
        # slots are split.
        self.remap_overlays = remap_overlays
        self._remapped: dict[str, tuple[int, Backing, int, int]] = {}  # name -> (host, ov, fd, off)
        self.ram = sorted(ram, key=lambda r: r.gpa)
        self.phys_bits = phys_bits
        self.reserved = list(reserved or [])  # (gpa, size, name): RAM a guest must not use
        self._overlays: dict[str, tuple[int, Backing]] = {}
        self._ballooned: set[int] = set()
        self._slots: dict[tuple[int, int, int], int] = {}  # (gpa, size, host_addr) -> slot
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._lock = threading.Lock()
        # Held by other threads while they touch guest memory, and by whoever replaces the
        # RAM backing (restore, moving RAM off a snapshot) or reads it in bulk (a save).
        self.access_lock = threading.RLock()
        self.segments: tuple[Segment, ...] = ()
        self._starts: list[int] = []
        self.generation = 0
        self.apply()

    # -- the view ------------------------------------------------------------------------

    @property
    def ram_bytes(self) -> int:
        return sum(r.size for r in self.ram)

    @property
    def ballooned_pages(self) -> int:
        return len(self._ballooned)

    def max_gpa(self) -> int:
        return (1 << self.phys_bits) - 1

    def overlay_gpa(self, name: str) -> int | None:
        o = self._overlays.get(name)
        return None if o is None else o[0]

    def overlays(self) -> dict[str, int]:
        return {n: g for n, (g, _) in self._overlays.items()}

    def ram_region_at(self, gpa: int) -> RamRegion | None:
        for r in self.ram:
            if r.gpa <= gpa < r.end:
                return r
        return None

    def is_ram_page(self, gfn: int) -> bool:
        """True when the frame is guest RAM that has not been ballooned out (an overlay may
        lie over it: ballooning then takes out the RAM beneath, the overlay stays)."""
        return gfn not in self._ballooned and self.ram_region_at(gfn << PAGE_SHIFT) is not None

    def _remap_target(self, gpa: int) -> tuple[int, int, int] | None:
        """(host address, RAM fd, RAM file offset) when an overlay at gpa can be mapped in
        place, else None."""
        if not self.remap_overlays or (gpa >> PAGE_SHIFT) in self._ballooned:
            return None
        r = self.ram_region_at(gpa)
        if r is None or r.backing.private or r.backing.fd < 0:
            return None
        off = r.offset + gpa - r.gpa
        return r.backing.addr + off, r.backing.fd, r.backing.offset + off

    def is_ballooned(self, gfn: int) -> bool:
        return gfn in self._ballooned

    def regions(self) -> list[dict]:
        """Every backed stretch, in address order, plus reserved ranges."""
        out = [{"gpa": s.gpa, "size": s.size, "kind": s.kind, "name": s.name} for s in self.segments]
        out += [{"gpa": g, "size": n, "kind": "reserved", "name": name} for g, n, name in self.reserved]
        return sorted(out, key=lambda d: (d["gpa"], d["kind"] != "reserved"))

    def _compute(self, for_slots: bool = False) -> list[Segment]:
        """The flat view; with for_slots, what KVM's slots must hold (overlays mapped in
        place live inside their RAM slot)."""
        overlays = {n: o for n, o in self._overlays.items()
                    if not (for_slots and self._remap_target(o[0]) is not None)}
        cuts = {g for g, _ in overlays.values()}
        cuts |= {gfn << PAGE_SHIFT for gfn in self._ballooned}
        cut_list = sorted(cuts)
        segs: list[Segment] = []
        for r in self.ram:
            pos = r.gpa
            i = bisect.bisect_left(cut_list, r.gpa)
            while i < len(cut_list) and cut_list[i] < r.end:
                c = cut_list[i]
                if c > pos:
                    segs.append(Segment(pos, c - pos, r.backing, r.offset + pos - r.gpa, "ram", r.backing.name))
                pos = c + PAGE_SIZE
                i += 1
            if pos < r.end:
                segs.append(Segment(pos, r.end - pos, r.backing, r.offset + pos - r.gpa, "ram", r.backing.name))
        for name, (gpa, backing) in overlays.items():
            segs.append(Segment(gpa, PAGE_SIZE, backing, 0, "overlay", name))
        segs.sort(key=lambda s: s.gpa)
        return segs

    # -- changes (callers hold every vCPU paused) ----------------------------------------

    def check_gpa(self, gpa: int) -> None:
        if not isinstance(gpa, int) or isinstance(gpa, bool):
            raise InvalidArgument("gpa must be an integer")
        if gpa % PAGE_SIZE:
            raise InvalidArgument(f"gpa {gpa:#x} is not page aligned")
        if gpa < 0 or gpa + PAGE_SIZE - 1 > self.max_gpa():
            raise InvalidArgument(
                f"gpa {gpa:#x} is beyond the guest's {self.phys_bits}-bit physical address space")

    def map_overlay(self, name: str, backing: Backing, gpa: int) -> None:
        """Lay ``backing`` (one page) at ``gpa``; mapping a page again moves it."""
        self.check_gpa(gpa)
        if backing.size != PAGE_SIZE:
            raise InvalidArgument("an overlay is exactly one page")
        for other, (g, _) in self._overlays.items():
            if g == gpa and other != name:
                raise InvalidArgument(f"gpa {gpa:#x} already holds overlay {other}")
        old = self._overlays.get(name)
        self._overlays[name] = (gpa, backing)
        try:
            self.apply()
        except BaseException:
            if old is None:
                del self._overlays[name]
            else:
                self._overlays[name] = old
            raise

    def unmap_overlay(self, name: str) -> None:
        old = self._overlays.pop(name, None)
        if old is None:
            return
        try:
            self.apply()
        except BaseException:
            self._overlays[name] = old
            raise

    def remove_ram_page(self, gfn: int) -> None:
        """Take a RAM frame out of the guest's map (ballooning out)."""
        if not self.is_ram_page(gfn):
            raise NotFound(f"frame {gfn:#x} is not populated RAM")
        self._ballooned.add(gfn)
        try:
            self.apply()
        except BaseException:
            self._ballooned.discard(gfn)
            raise
        r = self.ram_region_at(gfn << PAGE_SHIFT)
        r.backing.zero(r.offset + (gfn << PAGE_SHIFT) - r.gpa, PAGE_SIZE)

    def restore_ram_page(self, gfn: int) -> None:
        """Put a ballooned-out frame back, zeroed."""
        if gfn not in self._ballooned:
            raise NotFound(f"frame {gfn:#x} is not ballooned out")
        self._ballooned.discard(gfn)
        try:
            self.apply()
        except BaseException:
            self._ballooned.add(gfn)
            raise

    def balloon(self, take_out: list[int], put_back: list[int]) -> None:
        """Take RAM frames out and put ballooned frames back in one change (one slot update).
        Every frame must be in the right state; nothing changes when one is not."""
        out, back = list(dict.fromkeys(take_out)), list(dict.fromkeys(put_back))
        for gfn in out:
            if not self.is_ram_page(gfn):
                raise NotFound(f"frame {gfn:#x} is not populated RAM")
        for gfn in back:
            if gfn not in self._ballooned:
                raise NotFound(f"frame {gfn:#x} is not ballooned out")
        before = set(self._ballooned)
        self._ballooned.update(out)
        self._ballooned.difference_update(back)
        try:
            self.apply()
        except BaseException:
            self._ballooned = before
            raise
        for gfn in out + back:
            r = self.ram_region_at(gfn << PAGE_SHIFT)
            r.backing.zero(r.offset + (gfn << PAGE_SHIFT) - r.gpa, PAGE_SIZE)

    def replace(self, ram: list[RamRegion] | None = None,
                overlays: dict[str, tuple[int, Backing]] | None = None,
                ballooned: list[int] | None = None) -> None:
        """Swap in new RAM regions, overlays and ballooned frames (those given) and apply
        them as one change; on failure the old view is put back."""
        before = (self.ram, dict(self._overlays), set(self._ballooned))
        if ram is not None:
            self.ram = sorted(ram, key=lambda r: r.gpa)
        if overlays is not None:
            for gpa, backing in overlays.values():
                self.check_gpa(gpa)
                if backing.size != PAGE_SIZE:
                    raise InvalidArgument("an overlay is exactly one page")
            self._overlays = dict(overlays)
        if ballooned is not None:
            self._ballooned = set(ballooned)
        try:
            self.apply()
        except BaseException:
            self.ram, self._overlays, self._ballooned = before
            self.apply()
            raise

    def ballooned(self) -> list[int]:
        return sorted(self._ballooned)

    def set_ballooned(self, gfns: list[int]) -> None:
        self._ballooned = set(gfns)
        self.apply()

    def clear(self) -> None:
        """Unmap every overlay and put back every ballooned page (a reset)."""
        self._overlays.clear()
        self._ballooned.clear()
        self.apply()

    def apply(self) -> None:
        """Make KVM's slots match the view, changing only what differs."""
        with self._lock:
            segs = self._compute()
            slot_segs = self._compute(for_slots=True) if self.remap_overlays else segs
            want = {(s.gpa, s.size, s.host_addr): s for s in slot_segs}
            removed = [k for k in self._slots if k not in want]
            added = [k for k in want if k not in self._slots]
            done_remove: list[tuple[tuple[int, int, int], int]] = []
            done_add: list[tuple[int, int, int]] = []
            try:
                for key in removed:
                    slot = self._slots[key]
                    self._sink.set_user_memory_region(slot, key[0], 0, key[2])
                    done_remove.append((key, slot))
                    del self._slots[key]
                    self._free_slots.append(slot)
                for key in added:
                    slot = self._take_slot()
                    try:
                        self._sink.set_user_memory_region(slot, key[0], key[1], key[2])
                    except BaseException:
                        self._free_slots.append(slot)
                        raise
                    self._slots[key] = slot
                    done_add.append(key)
                self._apply_remaps()
            except BaseException:
                self._rollback(done_remove, done_add)
                raise
            self.segments = tuple(segs)
            self._starts = [s.gpa for s in segs]
            self.generation += 1

    def _apply_remaps(self) -> None:
        """Make the in-place overlay mappings match the view: RAM back where an overlay
        left, the overlay page where one arrived. Undone as a whole if a mapping fails."""
        want: dict[str, tuple[int, Backing, int, int]] = {}
        for name, (gpa, ov) in self._overlays.items():
            t = self._remap_target(gpa)
            if t is not None:
                want[name] = (t[0], ov, t[1], t[2])
        gone = [(n, v) for n, v in self._remapped.items() if want.get(n) != v]
        new = [(n, v) for n, v in want.items() if self._remapped.get(n) != v]
        done: list[tuple[str, str, tuple]] = []
        try:
            for name, (host, _ov, fd, off) in gone:
                map_shared_fixed(host, PAGE_SIZE, fd, off)
                done.append(("gone", name, self._remapped.pop(name)))
            for name, (host, ov, fd, off) in new:
                map_shared_fixed(host, PAGE_SIZE, ov.fd, ov.offset)
                self._remapped[name] = (host, ov, fd, off)
                done.append(("new", name, (host, ov, fd, off)))
        except OSError:
            for kind, name, (host, ov, fd, off) in reversed(done):
                if kind == "new":
                    map_shared_fixed(host, PAGE_SIZE, fd, off)
                    self._remapped.pop(name, None)
                else:
                    map_shared_fixed(host, PAGE_SIZE, ov.fd, ov.offset)
                    self._remapped[name] = (host, ov, fd, off)
            raise

    def forget_remaps(self) -> None:
        """The RAM mapping that held in-place overlays is going away (RAM replaced)."""
        self._remapped.clear()

    def _rollback(self, done_remove, done_add) -> None:
        for key in done_add:
            slot = self._slots.pop(key)
            self._sink.set_user_memory_region(slot, key[0], 0, key[2])
            self._free_slots.append(slot)
        for key, _slot in done_remove:
            slot = self._take_slot()
            self._sink.set_user_memory_region(slot, key[0], key[1], key[2])
            self._slots[key] = slot

    def _take_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        self._next_slot += 1
        return self._next_slot - 1

    def slot_count(self) -> int:
        return len(self._slots)

    # -- lookup --------------------------------------------------------------------------

    def find(self, gpa: int) -> Segment | None:
        starts = self._starts
        i = bisect.bisect_right(starts, gpa) - 1
        if i < 0:
            return None
        s = self.segments[i]
        return s if gpa < s.end else None


class GuestMemory:
    """Bounds-checked access to guest-physical memory, honouring overlays and holes.

    Every guest address and length is checked: an access that touches an unbacked byte,
    wraps, or is absurdly long raises GuestMemoryError and changes nothing.
    """

    MAX_ACCESS = 1 << 30

    def __init__(self, memmap: MemoryMap):
        self.map = memmap

    def _pieces(self, gpa: int, length: int):
        if not isinstance(gpa, int) or not isinstance(length, int):
            raise GuestMemoryError("address and length must be integers", 0, 0)
        if gpa < 0 or length < 0 or length > self.MAX_ACCESS or gpa + length > (1 << 64):
            raise GuestMemoryError(f"bad guest access {gpa:#x}+{length:#x}", gpa, length)
        pieces = []
        pos, end = gpa, gpa + length
        while pos < end:
            seg = self.map.find(pos)
            if seg is None:
                raise GuestMemoryError(f"guest-physical {pos:#x} is not backed", gpa, length)
            n = min(end, seg.end) - pos
            off = seg.offset + pos - seg.gpa
            pieces.append((seg.backing, off, n))
            pos += n
        return pieces

    def read(self, gpa: int, length: int) -> bytes:
        if not on_vcpu_thread():
            with self.map.access_lock:
                return self._read(gpa, length)
        return self._read(gpa, length)

    def _read(self, gpa: int, length: int) -> bytes:
        fast = isinstance(gpa, int) and isinstance(length, int) and 0 < length <= self.MAX_ACCESS
        seg = self.map.find(gpa) if fast else None
        if seg is not None and gpa + length <= seg.end:
            off = seg.offset + gpa - seg.gpa
            return seg.backing.map[off:off + length]
        out = bytearray()
        for backing, off, n in self._pieces(gpa, length):
            out += backing.view[off:off + n]
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        if not on_vcpu_thread():
            with self.map.access_lock:
                return self._write(gpa, data)
        return self._write(gpa, data)

    def _write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        pieces = self._pieces(gpa, length)  # all checked before anything is written
        pos = 0
        for backing, off, n in pieces:
            backing.view[off:off + n] = data[pos:pos + n]
            pos += n

    def read_u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 2), "little")

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u8(self, gpa: int, v: int) -> None:
        self.write(gpa, (v & 0xFF).to_bytes(1, "little"))

    def write_u16(self, gpa: int, v: int) -> None:
        self.write(gpa, (v & 0xFFFF).to_bytes(2, "little"))

    def write_u32(self, gpa: int, v: int) -> None:
        self.write(gpa, (v & 0xFFFFFFFF).to_bytes(4, "little"))

    def write_u64(self, gpa: int, v: int) -> None:
        self.write(gpa, (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def is_backed(self, gpa: int, length: int = 1) -> bool:
        try:
            self._pieces(gpa, length)
        except GuestMemoryError:
            return False
        return True
