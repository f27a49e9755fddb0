"""The memory map's view: the segments it is made of (one backed stretch of guest-physical
space each, sorted by address, with a parallel list of their start addresses for lookup),
and the two splices an overlay laid in place needs, each giving exactly what computing the
view afresh would."""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, NamedTuple

from xend_lite.machine.backing import PAGE_SIZE, Backing

if TYPE_CHECKING:
    from xend_lite.machine.memmap import RamRegion


class Segment(NamedTuple):
    """One contiguous, backed stretch of guest-physical space (one KVM slot). A named tuple,
    not a frozen dataclass: views are rebuilt on every change of the map, and a tuple is
    built about three times faster."""

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


def splice_out(starts: list[int], segs: list[Segment], gpa: int, r: RamRegion | None) -> bool:
    """Take the overlay at ``gpa`` (over RAM region ``r``, not ballooned) out of a view: it
    and the RAM runs either side of it within the region become one run. False (the lists
    untouched) when the view does not hold such an overlay there."""
    i = bisect.bisect_left(starts, gpa)
    if i == len(segs) or segs[i].gpa != gpa or segs[i].kind != "overlay" or r is None:
        return False
    lo, hi, start, end = i, i + 1, gpa, gpa + PAGE_SIZE
    if i > 0:
        left = segs[i - 1]
        if left.kind == "ram" and left.end == gpa and left.gpa >= r.gpa:
            lo, start = i - 1, left.gpa
    if hi < len(segs):
        right = segs[hi]
        if right.kind == "ram" and right.gpa == end and right.end <= r.end:
            hi, end = hi + 1, right.end
    segs[lo:hi] = [Segment(start, end - start, r.backing, r.offset + start - r.gpa, "ram",
                           r.backing.name)]
    starts[lo:hi] = [start]
    return True


def splice_in(starts: list[int], segs: list[Segment], name: str, backing: Backing,
              gpa: int) -> bool:
    """Lay an overlay at ``gpa`` into a view, cutting the RAM run that holds it. False (the
    lists untouched) when no RAM run holds ``gpa``."""
    i = bisect.bisect_right(starts, gpa) - 1
    if i < 0 or segs[i].kind != "ram" or segs[i].end <= gpa:
        return False
    s = segs[i]
    cut = []
    if gpa > s.gpa:
        cut.append(Segment(s.gpa, gpa - s.gpa, s.backing, s.offset, "ram", s.name))
    cut.append(Segment(gpa, PAGE_SIZE, backing, 0, "overlay", name))
    end = gpa + PAGE_SIZE
    if s.end > end:
        cut.append(Segment(end, s.end - end, s.backing, s.offset + end - s.gpa, "ram", s.name))
    segs[i:i + 1] = cut
    starts[i:i + 1] = [c.gpa for c in cut]
    return True
