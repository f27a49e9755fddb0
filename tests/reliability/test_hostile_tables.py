"""The hostile tables themselves, without a guest: no planted struct may name a frame or an
area of the fuzz guest's own pages (fuzzguest.OWN: its image with code, GDT, page tables and
stack, the hypercall page and the table). A decrease_reservation extent that reaches them balloons out
the running guest, as Xen would, and the fuzz test then fails on the guest it broke, not on
the daemon. An extent is 2**extent_order frames from its first, so a first frame below the
image is not enough: the whole extent must stay clear.
"""

from __future__ import annotations

import random
import struct

import pytest

from xend_lite.xen.abi import guest_layout
from xend_lite.xen.xenabi import X

from .fuzzguest import ALIAS, OWN, STRUCTS, U32
from .hostile import HC, PAGE, RandomPick, TableMaker

OWN_FRAMES = range(OWN[0] // PAGE, OWN[1] // PAGE)
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

    def struct_at(self, ptr: int) -> bytes | None:
        """The bytes planted at a guest pointer (plain or through the 64-bit alias)."""
        gpa = ptr - ALIAS if self.bits == 64 and ALIAS <= ptr < ALIAS + STRUCTS[1] else ptr
        return self.writes.get(gpa)


def fields(data: bytes, name: str, long_mode: bool) -> dict[str, int]:
    lay = guest_layout(name, long_mode)
    return {k: int.from_bytes(data[f.offset:f.offset + f.size], "little") for k, f in lay.fields.items()}


def reaches_own(first: int, order: int) -> bool:
    last = first + (1 << min(order, 64)) - 1
    return first < OWN_FRAMES.stop and last >= OWN_FRAMES.start


def own_frames_named(g: Planted, call: tuple) -> list[str]:
    """Every frame of the guest's own pages that a planted struct of ``call`` names."""
    long_mode = g.bits == 64
    nr, word, arg = call[0], call[1], call[2]
    found = []
    if nr == HC["memory_op"]:
        sub, data = word & 63, g.struct_at(arg)
        if data is None:
            return []
        if sub in RESERVATIONS:
            r = fields(data, "xen_memory_reservation", long_mode)
            step = 8 if long_mode else 4
            extents = g.struct_at(r["extent_start"]) or b""
            for i in range(min(r["nr_extents"], len(extents) // step)):
                first = int.from_bytes(extents[i * step:(i + 1) * step], "little")
                if reaches_own(first, r["extent_order"]):
                    found.append(f"extent {first:#x} order {r['extent_order']}")
        elif sub == X.XENMEM_add_to_physmap:
            gpfn = fields(data, "xen_add_to_physmap", long_mode)["gpfn"]
            if gpfn in OWN_FRAMES:
                found.append(f"add_to_physmap at {gpfn:#x}")
        elif sub == X.XENMEM_remove_from_physmap:
            gpfn = fields(data, "xen_remove_from_physmap", long_mode)["gpfn"]
            if gpfn in OWN_FRAMES:
                found.append(f"remove_from_physmap of {gpfn:#x}")
    elif nr == HC["vcpu_op"] and word == X.VCPUOP_register_vcpu_info:
        data = g.struct_at(call[3])
        if data is not None:
            mfn = fields(data, "vcpu_register_vcpu_info", long_mode)["mfn"]
            if mfn in OWN_FRAMES:
                found.append(f"vcpu_info in {mfn:#x}")
    elif nr == HC["vcpu_op"] and word == X.VCPUOP_register_runstate_memory_area:
        data = g.struct_at(call[3])
        if data is not None:
            addr = int.from_bytes(data, "little")
            gpa = addr - ALIAS if long_mode and addr >= ALIAS else addr
            if OWN[0] - 64 < gpa < OWN[1]:
                found.append(f"runstate area at {addr:#x}")
    return found


@pytest.mark.parametrize("bits", [64, 32])
def test_no_table_names_the_guests_own_frames(bits):
    named, reservations, areas = [], 0, 0
    for seed in range(12):
        g = Planted(bits)
        maker = TableMaker(g, RandomPick(random.Random(seed)))
        for call in maker.table(500):
            reservations += call[0] == HC["memory_op"] and call[1] & 63 in RESERVATIONS
            areas += (call[0] == HC["vcpu_op"] and call[1] == X.VCPUOP_register_runstate_memory_area
                      and g.struct_at(call[3]) is not None)
            named += [f"seed {seed}: {call[:3]} {what}" for what in own_frames_named(g, call)]
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
    assert own_frames_named(g, call) == named


@pytest.mark.parametrize("addr, named", [(ALIAS + 0x10BFE0, ["runstate area at 0x800010bfe0"]),
                                         (0x400000, [])])
def test_the_check_sees_a_runstate_area_over_the_guest(addr, named):
    """An area handle planted over the guest's stack is named; one in SCRATCH is not."""
    g = Planted(64)
    g.write(STRUCTS[0], struct.pack("<Q", addr))
    call = (HC["vcpu_op"], X.VCPUOP_register_runstate_memory_area, 0, STRUCTS[0], 0, 0)
    assert own_frames_named(g, call) == named
