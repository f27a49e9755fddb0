"""An overlay over shared RAM is swapped under the running guest (no vCPU pauses): once a
map, move or unmap returns, every guest write lands in the backing now mapped, never in the
one just taken away, and the RAM beneath keeps exactly what the guest wrote before."""

from __future__ import annotations

import os
import struct
import time

import pytest

from tests.xen.test_overlay_stress import hammer_domain

pytestmark = pytest.mark.kvm

OVL, OVL2 = 0x800000, 0x810000
SLOT = 0x800                     # vCPU 0's slot inside the page (hammer32.S: INSIDE)
COUNTS = 0x300000


@pytest.fixture
def hammering(guest_image, tmp_path):
    d = hammer_domain(guest_image, tmp_path)
    try:
        yield d
    finally:
        d.close()


def _u32(fd: int, off: int) -> int:
    return struct.unpack("<I", os.pread(fd, 4, off))[0]


def _settle_until_moves(read, before: int, timeout: float = 2.0) -> int:
    """Wait until the guest's writes show in a backing (it keeps counting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = read()
        if v != before:
            return v
        time.sleep(0.0002)
    return read()


def test_no_write_lands_in_the_backing_just_taken_away(hammering):
    d = hammering
    m = d.machine
    pauses = []
    before_slot_change = m.memmap._before_slot_change
    m.memmap._before_slot_change = lambda: (pauses.append(1), before_slot_change())[1]
    ram_fd, ram_off = m.ram.fd, m.ram.offset
    page = d.overlay.pages["shared_info"]
    ram = lambda gpa: _u32(ram_fd, ram_off + gpa + SLOT)    # noqa: E731 - RAM beneath
    ovl = lambda: _u32(page.fd, page.offset + SLOT)          # noqa: E731 - the overlay page
    beneath = bytes((i * 11) & 0xFF for i in range(SLOT))
    m.mem.write(OVL, beneath)
    d.start()
    time.sleep(0.02)
    for _ in range(100):
        d.overlay_map("shared_info", OVL)
        frozen = ram(OVL)                    # the guest writes the overlay page from now on
        moving = _settle_until_moves(ovl, ovl())
        assert moving > frozen               # later writes, in the guest's order
        assert ram(OVL) == frozen, "a guest write reached the RAM beneath a mapped overlay"

        d.overlay_map("shared_info", OVL2)   # moved away: the guest writes RAM at OVL again
        frozen_ovl = ovl()
        later = _settle_until_moves(lambda: ram(OVL), ram(OVL))
        assert later > frozen_ovl
        assert ovl() == frozen_ovl, "a guest write reached the overlay page after it moved"

        d.overlay_unmap("shared_info")
        assert ovl() == frozen_ovl
    assert m.status is None, m.status
    assert pauses == [], "a change laid in place paused the vCPUs"
    d.pause()
    assert m.mem.read(OVL, SLOT) == beneath       # the part the guest never writes
    count = struct.unpack("<I", m.mem.read(COUNTS, 4))[0]
    assert ram(OVL) in (count, count + 1)         # the last write, after the last unmap


def test_a_change_over_a_hole_still_takes_the_vcpus_out(hammering):
    """The other path: no RAM beneath, so KVM's slots change and the vCPUs step out."""
    d = hammering
    m = d.machine
    pauses = []
    before_slot_change = m.memmap._before_slot_change
    m.memmap._before_slot_change = lambda: (pauses.append(1), before_slot_change())[1]
    d.start()
    hole = 1 << 32   # above the 64 MiB of RAM, below the physical address limit
    d.overlay_map("shared_info", hole)
    d.overlay_unmap("shared_info")
    assert len(pauses) == 2
    assert m.status is None, m.status
