"""memory_op: the guest's physical memory as Xen describes and changes it: the overlay pages
it maps (XENMEM_add_to_physmap), frames it gives back and takes again (ballooning), and its
memory map and sizes.

Every change of the memory map is a VM-wide change: the handler asks the VM owner to make it
(``runner.ask_owner``) and waits.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Callable

from xend_lite.errors import XendLiteError
from xend_lite.machine.backing import INVALID_GPA, PAGE_SHIFT
from xend_lite.xen.errors import XenError, inval
from xend_lite.xen.hvm import self_domain
from xend_lite.xen.overlay import SHARED_INFO, grant_page
from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.machine.machine import Machine
    from xend_lite.xen.grant import GrantOps
    from xend_lite.xen.hypercall import Call
    from xend_lite.xen.overlay import OverlayDevice

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
MEMOP_EXTENT_SHIFT = 6
MEMOP_CMD_MASK = (1 << MEMOP_EXTENT_SHIFT) - 1
MAX_EXTENT_ORDER = 9
MAX_GFN = 1 << 52
BALLOON_BUDGET = 4096    # frames per call; the guest gets the count done and asks again
E820MAX = 1024           # the most entries Xen keeps for a domain's memory map
E820_ENTRY = struct.Struct("<QQI")     # struct e820entry (packed): addr, size, type

#: (call, page, gpa) -> None: map, move or unmap an overlay page for the guest
MapOverlay = Callable[["Call", str, int], None]
E820 = Callable[[], "list[tuple[int, int, int]]"]


class MemoryOps:
    def __init__(self, domid: int, machine: Machine, overlay: OverlayDevice, grants: GrantOps,
                 map_overlay: MapOverlay, e820: E820):
        self.domid = domid
        self.machine = machine
        self.overlay = overlay
        self.grants = grants
        self._map_overlay = map_overlay
        self._e820 = e820
        # the map the guest gave itself with XENMEM_set_memory_map, answered from then on
        self.guest_map: list[tuple[int, int, int]] | None = None

    def max_ram_gfn(self) -> int:
        return max(r.end for r in self.machine.memmap.ram) // (1 << PAGE_SHIFT) - 1

    def memory_op(self, c: Call, cmd_word: int, arg: int) -> int:
        cmd = cmd_word & MEMOP_CMD_MASK
        start = cmd_word >> MEMOP_EXTENT_SHIFT
        if cmd in (X.XENMEM_increase_reservation, X.XENMEM_decrease_reservation,
                   X.XENMEM_populate_physmap):
            return self._reservation(c, cmd, start, arg)
        if cmd == X.XENMEM_add_to_physmap:
            if start > 0xFFFF:
                raise XenError(X.XEN_EDOM, "continuation out of range")
            return self._add_to_physmap(c, arg)
        if cmd == X.XENMEM_remove_from_physmap:
            return self._remove_from_physmap(c, arg)
        if cmd == X.XENMEM_memory_map:
            return self._memory_map(c, arg)
        if cmd == X.XENMEM_set_memory_map:
            return self._set_memory_map(c, arg)
        if cmd == X.XENMEM_maximum_ram_page:
            return self.max_ram_gfn() + 1
        if cmd in (X.XENMEM_current_reservation, X.XENMEM_maximum_reservation,
                   X.XENMEM_maximum_gpfn):
            self_domain(c.view.read_uint(arg, 2), self.domid)
            mm = self.machine.memmap
            if cmd == X.XENMEM_current_reservation:
                return (mm.ram_bytes >> PAGE_SHIFT) - mm.ballooned_pages
            if cmd == X.XENMEM_maximum_reservation:
                return mm.ram_bytes >> PAGE_SHIFT
            return self.max_ram_gfn()
        if cmd == X.XENMEM_machine_memory_map:
            raise XenError(X.XEN_EPERM, "for the control domain only")
        raise XenError(X.XEN_ENOSYS, "unknown memory_op sub-op")

    def _add_to_physmap(self, c: Call, arg: int) -> int:
        xatp = c.read("xen_add_to_physmap", arg)
        space = xatp["space"]
        if space == X.XENMAPSPACE_gmfn_foreign:
            raise XenError(X.XEN_ENOSYS, "foreign mappings need add_to_physmap_batch")
        self_domain(xatp["domid"], self.domid)
        ov = self.overlay
        idx, gpfn = xatp["idx"], xatp["gpfn"]
        if space == X.XENMAPSPACE_shared_info:
            if idx != 0:
                raise inval("shared_info has index 0 only")
            page = SHARED_INFO
        elif space == X.XENMAPSPACE_grant_table:
            if idx & X.XENMAPIDX_grant_table_status:
                raise inval("grant status frames exist only in grant table v2")
            if idx >= ov.grant_frames:
                raise inval(f"grant frame {idx} beyond {ov.grant_frames}")
            page = grant_page(idx)
        elif space in (X.XENMAPSPACE_gmfn, X.XENMAPSPACE_gmfn_range, X.XENMAPSPACE_dev_mmio):
            raise XenError(X.XEN_ENOSYS, "moving guest frames is not offered")
        else:
            raise inval("unknown map space")
        all_ones = U64 if c.long_mode else U32
        gpa = INVALID_GPA if gpfn == all_ones else gpfn << PAGE_SHIFT
        if gpa != INVALID_GPA:
            try:
                self.machine.memmap.check_gpa(gpa)
            except XendLiteError as exc:
                raise inval(str(exc)) from exc
            holder = ov.page_at(gpa)
            if holder is not None and holder != page:
                raise inval(f"frame holds {holder}")
        try:
            self._map_overlay(c, page, gpa)
        except XendLiteError as exc:
            raise inval(str(exc)) from exc
        if space == X.XENMAPSPACE_grant_table:
            self.grants.frames_in_use = max(self.grants.frames_in_use, idx + 1)
        return 0

    def _remove_from_physmap(self, c: Call, arg: int) -> int:
        xrfp = c.read("xen_remove_from_physmap", arg)
        self_domain(xrfp["domid"], self.domid)
        gfn = xrfp["gpfn"]
        page = self.overlay.page_at(gfn << PAGE_SHIFT) if gfn < MAX_GFN else None
        if page is not None:
            self._map_overlay(c, page, INVALID_GPA)
            return 0
        if gfn >= MAX_GFN or not self.machine.memmap.is_ram_page(gfn):
            raise inval("nothing at that frame")
        c.runner.ask_owner(self.machine.change_memory, lambda m: m.balloon([gfn], []))
        return 0

    def _memory_map(self, c: Call, arg: int) -> int:
        lay = c.lay("xen_memory_map")
        mmap_ = c.view.read_struct(lay, arg)
        entries = self._e820() if self.guest_map is None else self.guest_map
        if not entries:
            raise XenError(X.XEN_ENOSYS, "the domain's memory map is empty")
        n = min(mmap_["nr_entries"], len(entries))
        buf = b"".join(E820_ENTRY.pack(a, s, t) for a, s, t in entries[:n])
        if n:
            c.view.write(mmap_["buffer"], buf)
        c.view.write_fields(lay, arg, {"nr_entries": n})
        return 0

    def _set_memory_map(self, c: Call, arg: int) -> int:
        """A domain may replace the memory map XENMEM_memory_map gives it (Xen lets a domain
        do this to itself; GRUB does, after reserving the pages it mapped). Nothing else
        changes: it is the answer to later XENMEM_memory_map calls, and no more."""
        # struct xen_foreign_memory_map: domid_t, then a struct xen_memory_map aligned as
        # its pointer is (at 8 in 64-bit mode, at 4 in 32-bit mode)
        domid = c.view.read_uint(arg, 2)
        m = c.view.read_struct(c.lay("xen_memory_map"), arg + c.ulong)
        n = m["nr_entries"]
        if n > E820MAX:
            raise inval(f"more than {E820MAX} memory map entries")
        self_domain(domid, self.domid)
        raw = c.view.read(m["buffer"], n * E820_ENTRY.size) if n else b""
        self.guest_map = [E820_ENTRY.unpack_from(raw, i * E820_ENTRY.size) for i in range(n)]
        return 0

    def _reservation(self, c: Call, cmd: int, start: int, arg: int) -> int:
        # Xen answers every refusal here with the number of extents done so far.
        try:
            r = c.read("xen_memory_reservation", arg)
        except XenError:
            return start
        nr, order, handle = r["nr_extents"], r["extent_order"], r["extent_start"]
        if nr > U32 >> MEMOP_EXTENT_SHIFT or start >= nr:
            return start
        if r["domid"] not in (X.DOMID_SELF, self.domid) or order > MAX_EXTENT_ORDER:
            return start
        mm = self.machine.memmap
        step = c.ulong
        done = start
        take: list[int] = []
        back: list[int] = []
        pending: set[int] = set()
        while done < nr and len(take) + len(back) < BALLOON_BUDGET:
            try:
                gfn = c.view.read_uint(handle + done * step, step)
            except XenError:
                break
            frames = [gfn + i for i in range(1 << order)]
            if cmd == X.XENMEM_decrease_reservation:
                if not all(mm.is_ram_page(f) and f not in pending for f in frames):
                    break
                take += frames
            else:
                if not all(mm.is_ballooned(f) and f not in pending for f in frames):
                    break
                back += frames
            pending.update(frames)
            done += 1
        if take or back:
            try:
                c.runner.ask_owner(self.machine.change_memory, lambda m: m.balloon(take, back))
            except XendLiteError:
                return start
        return done
