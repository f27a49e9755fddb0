"""Each vCPU's runstate area (VCPUOP_register_runstate_memory_area): where the guest reads how
long the vCPU has been running, runnable, blocked and offline (Linux takes its steal time
from it, and BUGs when the registration fails).

The area's guest-virtual address is translated when it is registered and kept as
guest-physical pieces (Linux gives a per-CPU address that stays mapped). An update that
finds a piece no longer memory (ballooned out, an overlay page moved away) is skipped, as
Xen skips a copy to the guest that faults. A vCPU is running
from its registration on, blocked while it waits in SCHEDOP_block or SCHEDOP_poll, and
running again when it wakes; it is never runnable or offline here (each vCPU has its own
host thread), so its steal time is 0. Each rewrite sets XEN_RUNSTATE_UPDATE in
state_entry_time first and clears it last, as Xen does for a guest that asked for the flag
and harmlessly for one that did not.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from xend_lite.errors import GuestMemoryError, InvalidArgument
from xend_lite.record import Record
from xend_lite.xen.abi import guest_layout
from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.machine.guestmem import GuestMemory
    from xend_lite.xen.hypercall import Call
    from xend_lite.xen.timekeeping import Clock

RUNSTATE_UPDATE = 1 << 63
U64 = (1 << 64) - 1


class Area(Record):
    __slots__ = ("pieces", "long_mode", "state", "entry", "times")

    def __init__(self, pieces: list[tuple[int, int]], long_mode: bool, state: int = 0,
                 entry: int = 0, times: list[int] | None = None):
        self.pieces = pieces                # (gpa, bytes) where the struct lies
        self.long_mode = long_mode
        self.state = state
        self.entry = entry                  # system time the state began
        self.times = [0, 0, 0, 0] if times is None else times


class Runstates:
    def __init__(self, mem: GuestMemory, clock: Clock):
        self.mem = mem
        self.clock = clock
        self.areas: dict[int, Area] = {}
        self._lock = threading.Lock()

    def register(self, c: Call, vcpuid: int, arg: int) -> int:
        addr = c.view.read_uint(arg, c.ulong)
        if addr == 0:                       # a null handle: no more updates
            with self._lock:
                self.areas.pop(vcpuid, None)
            return 0
        lay = guest_layout("vcpu_runstate_info", c.long_mode)
        pieces = c.view.physical(addr, lay.size)
        now = self.clock.now()
        with self._lock:
            old = self.areas.get(vcpuid)
            area = Area(pieces, c.long_mode, X.RUNSTATE_running, now,
                        old.times if old is not None else [0, 0, 0, 0])
            self.areas[vcpuid] = area
            self._write(area)
        return 0

    def set_state(self, vcpuid: int, state: int) -> None:
        """The vCPU changes state now (its time in the old state is added up)."""
        with self._lock:
            area = self.areas.get(vcpuid)
            if area is None or area.state == state:
                return
            now = self.clock.now()
            if now > area.entry:
                area.times[area.state] += now - area.entry
            area.state, area.entry = state, now
            try:
                self._write(area)
            except GuestMemoryError:
                # the guest ballooned out the area's frame or moved the overlay page it lay
                # in: Xen's copy to the guest fails the same way and the update is skipped.
                # The times go on adding up; the area is written again once memory is back.
                pass

    def _write(self, a: Area) -> None:
        lay = guest_layout("vcpu_runstate_info", a.long_mode)
        entry_at = lay.offset("state_entry_time")
        buf = bytearray(lay.size)
        buf[0:4] = a.state.to_bytes(4, "little")
        buf[entry_at:entry_at + 8] = a.entry.to_bytes(8, "little")
        t = lay.offset("time")
        for i, v in enumerate(a.times):
            buf[t + 8 * i:t + 8 * i + 8] = (v & U64).to_bytes(8, "little")
        flagged = bytearray(buf)
        flagged[entry_at:entry_at + 8] = ((a.entry | RUNSTATE_UPDATE) & U64).to_bytes(8, "little")
        self._put(a, entry_at, flagged[entry_at:entry_at + 8])
        self._put(a, 0, flagged)
        self._put(a, entry_at, buf[entry_at:entry_at + 8])

    def _put(self, a: Area, offset: int, data: bytes | bytearray) -> None:
        """Write ``data`` at ``offset`` in the struct, across its pieces."""
        pos = 0
        for gpa, n in a.pieces:
            lo, hi = max(offset, pos), min(offset + len(data), pos + n)
            if lo < hi:
                self.mem.write(gpa + lo - pos, bytes(data[lo - offset:hi - offset]))
            pos += n

    # -- saved state -----------------------------------------------------------------------

    def to_state(self) -> dict[str, list]:
        with self._lock:
            return {str(k): [[list(p) for p in a.pieces], a.long_mode, a.state, a.entry,
                             list(a.times)] for k, a in self.areas.items()}

    def parse_state(self, st: dict[str, list], nr_vcpus: int) -> dict[int, Area]:
        """The saved areas, checked (InvalidArgument for one that does not fit)."""
        areas = {}
        for k, v in st.items():
            if not isinstance(v, list) or len(v) != 5:
                raise InvalidArgument(f"xen state: runstate of vcpu {k} malformed")
            pieces, long_mode, state, entry, times = v
            if not k.isdigit() or int(k) >= nr_vcpus or not 0 <= state <= 3 or len(times) != 4:
                raise InvalidArgument(f"xen state: runstate of vcpu {k} malformed")
            ps = [(int(g), int(n)) for g, n in pieces]
            if sum(n for _g, n in ps) != guest_layout("vcpu_runstate_info", bool(long_mode)).size \
                    or not all(self.mem.is_backed(g, n) for g, n in ps):
                raise InvalidArgument(f"xen state: runstate area of vcpu {k} is not guest memory")
            areas[int(k)] = Area(ps, bool(long_mode), state, entry, [int(t) for t in times])
        return areas

    def from_state(self, st: dict[str, list], nr_vcpus: int) -> None:
        areas = self.parse_state(st, nr_vcpus)
        with self._lock:
            self.areas = areas

    def reset(self) -> None:
        with self._lock:
            self.areas.clear()
