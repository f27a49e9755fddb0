"""The hostile tables themselves, without a guest: no planted struct may lead the daemon to
a frame or an area it must keep off. Those are the fuzz guest's own pages (fuzzguest.OWN:
its image with code, GDT, page tables and stack, the hypercall page and the table), and the
zones the host and the checks rely on: SCRATCH, GUARD and STRUCTS, up to BALLOON. A
decrease_reservation extent that reaches the guest's own pages balloons out the running
guest, as Xen would; one in GUARD or STRUCTS breaks the guard check or the host's next
planting. Either way the fuzz test then fails on the guest or zone it broke, not on the
daemon.

An extent is 2**extent_order frames from its first, so a first frame below the image is not
enough: the whole extent must stay clear. And the daemon, like Xen, reads nr_extents
entries, stopping only at a frame that cannot be RAM: every entry up to that one must be
planted by the same table, since what lies past the list is whatever an earlier table left.
"""

from __future__ import annotations

import random
import struct

import pytest

from xend_lite.xen.abi import guest_layout
from xend_lite.xen.xenabi import X

from .fuzzguest import ALIAS, BALLOON, GUARD, OWN, RAM_END, STRUCTS, U32
from .hostile import HC, PAGE, RandomPick, TableMaker

KEEP_OFF = range(OWN[0] // PAGE, BALLOON[0] // PAGE)       # frames no table may reach
RESERVATIONS = (X.XENMEM_increase_reservation, X.XENMEM_decrease_reservation,
                X.XENMEM_populate_physmap)


class Planted:
    """Stands in for the guest: keeps what the TableMaker plants, maps no overlay."""

    def __init__(self, bits: int):
        self.bits = bits
        self.writes: dict[int, bytes] = {}
        self.mem = self
        self.machine = self
        self.memmap = self

    def write(self, gpa: int, data: bytes) -> None:
        self.writes[gpa] = bytes(data)

    def overlays(self) -> dict:
        return {}

    def gpa(self, ptr: int) -> int:
        return ptr - ALIAS if self.bits == 64 and ALIAS <= ptr < ALIAS + RAM_END else ptr

    def struct_at(self, ptr: int) -> bytes | None:
        """The bytes planted at a guest pointer (plain or through the 64-bit alias)."""
        return self.writes.get(self.gpa(ptr))

    def read(self, ptr: int, n: int) -> bytes | None:
        """n bytes at a pointer when this table planted all of them, else None."""
        gpa = self.gpa(ptr)
        for at, data in self.writes.items():
            if at <= gpa and gpa + n <= at + len(data):
                return data[gpa - at:gpa - at + n]
        return None


def fields(data: bytes, name: str, long_mode: bool) -> dict[str, int]:
    lay = guest_layout(name, long_mode)
    return {k: int.from_bytes(data[f.offset:f.offset + f.size], "little") for k, f in lay.fields.items()}


def reaches(first: int, order: int) -> bool:
    last = first + (1 << min(order, 64)) - 1
    return first < KEEP_OFF.stop and last >= KEEP_OFF.start


def extents_read(g: Planted, r: dict[str, int]) -> list[str]:
    """What is wrong with the extents the daemon would read for reservation ``r``."""
    step = 8 if g.bits == 64 else 4
    found = []
    for i in range(min(r["nr_extents"], 1 << 16)):
        at = r["extent_start"] + i * step
        if g.gpa(at) >= RAM_END:
            break                                    # faults: nothing more is read
        raw = g.read(at, step)
        if raw is None:
            found.append(f"extent {i} read from memory the table did not plant")
            break
        first = int.from_bytes(raw, "little")
        if first >= RAM_END // PAGE:
            break                                    # not RAM: the daemon, as Xen, stops
        if reaches(first, r["extent_order"]):
            found.append(f"extent {first:#x} order {r['extent_order']}")
    return found


def kept_off_named(g: Planted, call: tuple) -> list[str]:
    """Every frame or area to keep off that a planted struct of ``call`` leads to."""
    long_mode = g.bits == 64
    nr, word, arg = call[0], call[1], call[2]
    found = []
    if nr == HC["memory_op"]:
        sub, data = word & 63, g.struct_at(arg)
        if data is None:
            return []
        if sub in RESERVATIONS:
            found += extents_read(g, fields(data, "xen_memory_reservation", long_mode))
        elif sub == X.XENMEM_add_to_physmap:
            gpfn = fields(data, "xen_add_to_physmap", long_mode)["gpfn"]
            if gpfn in KEEP_OFF:
                found.append(f"add_to_physmap at {gpfn:#x}")
        elif sub == X.XENMEM_remove_from_physmap:
            gpfn = fields(data, "xen_remove_from_physmap", long_mode)["gpfn"]
            if gpfn in KEEP_OFF:
                found.append(f"remove_from_physmap of {gpfn:#x}")
    elif nr == HC["vcpu_op"] and word == X.VCPUOP_register_vcpu_info:
        data = g.struct_at(call[3])
        if data is not None:
            mfn = fields(data, "vcpu_register_vcpu_info", long_mode)["mfn"]
            if mfn in KEEP_OFF:
                found.append(f"vcpu_info in {mfn:#x}")
    elif nr == HC["vcpu_op"] and word == X.VCPUOP_register_runstate_memory_area:
        data = g.struct_at(call[3])
        if data is not None:
            gpa = g.gpa(int.from_bytes(data, "little"))
            if OWN[0] - 64 < gpa < OWN[1] or GUARD[0] - 64 < gpa < STRUCTS[1]:
                found.append(f"runstate area at {gpa:#x}")
    return found


@pytest.mark.parametrize("bits", [64, 32])
def test_no_table_leads_to_frames_kept_off(bits):
    named, reservations, areas = [], 0, 0
    for seed in range(12):
        g = Planted(bits)
        maker = TableMaker(g, RandomPick(random.Random(seed)))
        for call in maker.table(500):
            reservations += call[0] == HC["memory_op"] and call[1] & 63 in RESERVATIONS
            areas += (call[0] == HC["vcpu_op"] and call[1] == X.VCPUOP_register_runstate_memory_area
                      and g.struct_at(call[3]) is not None)
            named += [f"seed {seed}: {call[:3]} {what}" for what in kept_off_named(g, call)]
    assert reservations > 100 and areas > 10, "too few drawn to say anything"
    assert not named, named[:5]


@pytest.mark.parametrize("order, named", [(9, ["extent 0x2 order 9"]), (0, []), (U32, ["extent 0x2 order 4294967295"])])
def test_the_check_sees_an_extent_that_runs_into_the_image(order, named):
    """The check above, against a planted decrease_reservation whose first frame (2) lies
    below the image: one frame is clear of it, 2 MiB (order 9) runs over it."""
    g = Planted(64)
    g.write(STRUCTS[0] + 0x100, struct.pack("<Q", 2))
    lay = guest_layout("xen_memory_reservation", True)
    buf = bytearray(lay.size)
    for k, v in (("extent_start", STRUCTS[0] + 0x100), ("nr_extents", 1), ("extent_order", order),
                 ("domid", X.DOMID_SELF)):
        f = lay.fields[k]
        buf[f.offset:f.offset + f.size] = v.to_bytes(f.size, "little")
    g.write(STRUCTS[0], bytes(buf))
    call = (HC["memory_op"], X.XENMEM_decrease_reservation, ALIAS + STRUCTS[0], 0, 0, 0)
    assert kept_off_named(g, call) == named


@pytest.mark.parametrize("addr, named", [(ALIAS + 0x10BFE0, ["runstate area at 0x10bfe0"]),
                                         (0x400000, [])])
def test_the_check_sees_a_runstate_area_over_the_guest(addr, named):
    """An area handle planted over the guest's stack is named; one in SCRATCH is not."""
    g = Planted(64)
    g.write(STRUCTS[0], struct.pack("<Q", addr))
    call = (HC["vcpu_op"], X.VCPUOP_register_runstate_memory_area, 0, STRUCTS[0], 0, 0)
    assert kept_off_named(g, call) == named


@pytest.mark.parametrize("listed, named", [
    ([0x2054, 0x2298], ["extent 2 read from memory the table did not plant"]),
    ([0x2054, 0x2298, (1 << 64) - 1], [])])
def test_the_check_follows_the_daemon_past_the_listed_extents(listed, named):
    """nr_extents 16 with two frames listed: the daemon reads on into whatever lies after the
    list, unless a frame that cannot be RAM ends it."""
    g = Planted(64)
    g.write(STRUCTS[0] + 0x100, b"".join(struct.pack("<Q", f) for f in listed))
    lay = guest_layout("xen_memory_reservation", True)
    buf = bytearray(lay.size)
    for k, v in (("extent_start", STRUCTS[0] + 0x100), ("nr_extents", 16), ("extent_order", 1),
                 ("domid", X.DOMID_SELF)):
        f = lay.fields[k]
        buf[f.offset:f.offset + f.size] = v.to_bytes(f.size, "little")
    g.write(STRUCTS[0], bytes(buf))
    call = (HC["memory_op"], 2 << 6 | X.XENMEM_decrease_reservation, STRUCTS[0], 0, 0, 0)
    assert kept_off_named(g, call) == named
