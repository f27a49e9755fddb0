"""1000 map/move/unmap cycles from the host while two vCPUs hammer the page and the RAM
around and beneath it: no lost write, no crash, RAM beneath intact."""

from __future__ import annotations

import struct
import time

import pytest

from xend_lite.machine.loader import boot_cpu
from xend_lite.vmm.domain import Domain
from xend_lite.vmm.spec import DomainSpec

pytestmark = pytest.mark.kvm

OVL, OVL2 = 0x800000, 0x810000
COUNTS, ERRORS = 0x300000, 0x300100


def hammer_domain(guest_image, tmp_path) -> Domain:
    """hammer32.S on two vCPUs (each told its index in RSI), built but not started."""
    img = tmp_path / "hammer32.elf"
    img.write_bytes(guest_image("xen/guests/hammer32.S", bits=32))
    d = Domain(DomainSpec(image=str(img), memory_mib=64, vcpus=2))
    try:
        for i in range(2):
            bc = boot_cpu(d.machine, d.boot, i)
            d.machine.set_boot_cpu(i, bc.replace(regs=bc.regs.replace(rsi=i)))
    except BaseException:
        d.close()
        raise
    return d


def run_cycles(guest_image, tmp_path, cycles: int) -> None:
    d = hammer_domain(guest_image, tmp_path)
    try:
        m = d.machine
        beneath = bytes((i * 7) & 0xFF for i in range(0x800))
        m.mem.write(OVL, beneath)
        m.mem.write(OVL2, beneath)
        d.start()
        ov = d.overlay
        time.sleep(0.05)
        seen = []
        for _ in range(cycles):
            d.overlay_map("shared_info", OVL)
            d.overlay_map("shared_info", OVL2)
            d.overlay_unmap("shared_info")
            time.sleep(0.0005)      # let the vCPUs run between cycles, not only between ops
            seen.append(struct.unpack("<QQ", m.mem.read(COUNTS, 16)))
        assert m.status is None, m.status
        d.pause()
        counts = struct.unpack("<II", m.mem.read(COUNTS, 4) + m.mem.read(COUNTS + 8, 4))
        errors = struct.unpack("<II", m.mem.read(ERRORS, 4) + m.mem.read(ERRORS + 8, 4))
        assert errors == (0, 0), f"lost writes: {errors}"
        assert all(c > 1000 for c in counts), counts
        for i in range(2):
            below = struct.unpack("<I", m.mem.read(OVL - 0x1000 + 0x800 + 8 * i, 4))[0]
            assert below in (counts[i], counts[i] + 1)   # the pause may fall between the two
        # both vCPUs kept running across the cycles
        firsts = [s[0] & 0xFFFFFFFF for s in seen[:5]]
        lasts = [s[0] & 0xFFFFFFFF for s in seen[-5:]]
        assert lasts[-1] > firsts[0]
        assert m.mem.read(OVL, 0x800) == beneath and m.mem.read(OVL2, 0x800) == beneath
        assert ov.gpa("shared_info") is None and d.overlay.list()[0]["gpa"] is None
    finally:
        d.close()


def test_1000_cycles_under_two_hammering_vcpus(guest_image, tmp_path):
    run_cycles(guest_image, tmp_path, 1000)
