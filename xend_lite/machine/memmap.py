"""The flat memory map: RAM regions, overlay pages laid above RAM (or above nothing), and RAM
pages taken out by ballooning, and the KVM memory slots that view implies.

From the view it computes the slots, splitting RAM around every overlay and ballooned page
that cannot be laid in place, and applies only the difference; a failed apply restores the
previous slots before it raises. An overlay over shared-memfd RAM is laid in place instead
(the overlay's page mapped over the RAM page's host address): no slot changes, so no vCPU
needs to stop for it, and only that page's host mappings and its stretch of the view change.
Only the VM owner changes the map (see Machine.change_memory), which pauses the vCPUs first
when slots change.
"""

from __future__ import annotations

import bisect
from typing import Callable, Protocol

from xend_lite.errors import InvalidArgument, NotFound
from xend_lite.machine.backing import PAGE_SHIFT, PAGE_SIZE, Backing
from xend_lite.machine.native import map_shared_fixed
from xend_lite.machine.segments import Segment, splice_in, splice_out
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set


class RamRegion(Frozen):
    __slots__ = ("gpa", "size", "backing", "offset")
    gpa: int
    size: int
    backing: Backing
    offset: int  # into the backing

    def __init__(self, gpa: int, size: int, backing: Backing, offset: int):
        _set(self, "gpa", gpa)
        _set(self, "size", size)
        _set(self, "backing", backing)
        _set(self, "offset", offset)

    @property
    def end(self) -> int:
        return self.gpa + self.size


class SlotSink(Protocol):
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None: ...


class MemoryMap:
    """The flat view and the KVM slots it implies."""

    def __init__(self, sink: SlotSink, ram: list[RamRegion], phys_bits: int = 39,
                 reserved: list[tuple[int, int, str]] | None = None, remap_overlays: bool = False,
                 before_slot_change: Callable[[], None] | None = None):
        self._sink = sink
        # called once per change, right before the first slot is touched (the machine makes
        # sure no vCPU is in the guest then); a change laid in place never calls it
        self._before_slot_change = before_slot_change or (lambda: None)
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
        # (start addresses, segments), swapped as one value so a reader on another thread
        # never pairs one view's starts with another's segments
        self._view: tuple[list[int], tuple[Segment, ...]] = ([], ())
        self.generation = 0
        # plain RAM as KVM's slots hold it: (gpa, size, host address). An overlay laid in
        # place lies inside it (its host address maps the overlay page), so moving one does
        # not change it; the slots, a hole's overlay or ballooning do.
        self._slot_ram: tuple[tuple[int, int, int], ...] = ()
        # called (on the thread that changed it) after every change of slot_ram
        self.ram_listeners: list[Callable[[], None]] = []
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

    @property
    def slot_ram(self) -> tuple[tuple[int, int, int], ...]:
        """Guest RAM as KVM's slots hold it, (gpa, size, host address) in address order: a
        host access through it sees what the guest sees, an overlay laid in place included."""
        return self._slot_ram

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
        new_at = self._remap_target(gpa)
        old_at = None if old is None else self._remap_target(old[0])
        in_place = new_at is not None and (old is None or old_at is not None)
        if in_place and self._swap_in_place(name, old, old_at, (gpa, backing), new_at):
            return
        self._overlays[name] = (gpa, backing)
        try:
            self.apply(slots_unchanged=in_place)
        except BaseException:
            if old is None:
                del self._overlays[name]
            else:
                self._overlays[name] = old
            raise

    def unmap_overlay(self, name: str) -> None:
        old = self._overlays.get(name)
        if old is None:
            return
        old_at = self._remap_target(old[0])
        if old_at is not None and self._swap_in_place(name, old, old_at, None, None):
            return
        del self._overlays[name]
        try:
            self.apply(slots_unchanged=old_at is not None)
        except BaseException:
            self._overlays[name] = old
            raise

    # -- in place: one page's host mappings and a spliced view ---------------------------

    def _swap_in_place(self, name: str, old: tuple[int, Backing] | None,
                       old_at: tuple[int, int, int] | None, new: tuple[int, Backing] | None,
                       new_at: tuple[int, int, int] | None) -> bool:
        """Move one overlay laid in place (from ``old``, to ``new``; None: not mapped), by
        touching only its own host mappings: the RAM page back where it leaves, then the
        overlay page where it arrives, as apply() would in that order, and the view spliced
        around the page instead of recomputed. False (nothing done) when the page's
        recorded mapping is not what ``old`` says (the general path sorts that out)."""
        had = self._remapped.get(name)
        if old is None:
            if had is not None:
                return False
        elif had != (old_at[0], old[1], old_at[1], old_at[2]):
            return False
        elif new is not None and new[0] == old[0]:
            return False                        # mapped again where it is
        starts, segs = list(self._view[0]), list(self._view[1])
        if old is not None and not splice_out(starts, segs, old[0], self.ram_region_at(old[0])):
            return False
        if new is not None and not splice_in(starts, segs, name, new[1], new[0]):
            return False
        if old is not None:
            host, _ov, fd, off = had
            map_shared_fixed(host, PAGE_SIZE, fd, off)
        if new is not None:
            try:
                map_shared_fixed(new_at[0], PAGE_SIZE, new[1].fd, new[1].offset)
            except OSError:
                if old is not None:
                    map_shared_fixed(had[0], PAGE_SIZE, had[1].fd, had[1].offset)
                raise
            self._remapped[name] = (new_at[0], new[1], new_at[1], new_at[2])
            self._overlays[name] = new
        else:
            del self._remapped[name]
            del self._overlays[name]
        self._set_view(segs, starts)
        return True

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

    def apply(self, slots_unchanged: bool = False) -> None:
        """Make KVM's slots match the view, changing only what differs. ``slots_unchanged``:
        the caller knows the change lies wholly in place (an overlay arriving at or leaving
        shared RAM), so the slot computation is skipped."""
        if slots_unchanged:
            segs = self._compute()
            self._apply_remaps()
            self._set_view(segs)
            return
        segs, slot_segs, removed, added = self._slot_diff()
        if removed or added:
            self._before_slot_change()
            # the wait may have served another change of the map: take the diff again
            segs, slot_segs, removed, added = self._slot_diff()
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
        self._set_view(segs)
        slot_ram = tuple((s.gpa, s.size, s.host_addr) for s in slot_segs if s.kind == "ram")
        if slot_ram != self._slot_ram:
            self._slot_ram = slot_ram
            for fn in self.ram_listeners:
                fn()

    def _slot_diff(self) -> tuple[list[Segment], list[Segment], list[tuple[int, int, int]],
                                  list[tuple[int, int, int]]]:
        """The view's segments, the slots' segments, and the slots to remove and add to make
        KVM match them."""
        segs = self._compute()
        slot_segs = self._compute(for_slots=True) if self.remap_overlays else segs
        want = [(s.gpa, s.size, s.host_addr) for s in slot_segs]
        wanted = set(want)
        return (segs, slot_segs, [k for k in self._slots if k not in wanted],
                [k for k in want if k not in self._slots])

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

    def _set_view(self, segs: list[Segment], starts: list[int] | None = None) -> None:
        self._view = ([s.gpa for s in segs] if starts is None else starts, tuple(segs))
        self.generation += 1

    # -- lookup --------------------------------------------------------------------------

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self._view[1]

    def find(self, gpa: int) -> Segment | None:
        starts, segments = self._view
        i = bisect.bisect_right(starts, gpa) - 1
        if i < 0:
            return None
        s = segments[i]
        return s if gpa < s.end else None
