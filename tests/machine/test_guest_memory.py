"""Guest memory seen from both sides, with the guest reading through overlays, holes and
ballooned pages (guests/memprobe32.S, driven step by step through ports)."""

from __future__ import annotations

import os

import queue

import pytest

from xend_lite.kvm import exits
from xend_lite.machine.loader import load_image
from xend_lite.machine.backing import PAGE_SIZE, Backing

pytestmark = pytest.mark.kvm

P = 0x400000        # a RAM page the probe reads (and overlays hide)
Q = 0x500000        # a RAM page that gets ballooned out
H = 0xD000_0000     # beyond the 64 MiB of RAM: a hole
DEFINES = {"P": hex(P), "Q": hex(Q), "H": hex(H)}
FIELDS = ("p", "p_sum", "p16", "h", "h16", "q", "q16")
WRITE_P, WRITE_H, WRITE_Q = 2, 4, 8
ONES = 0xFFFF_FFFF


def _u32s(data: bytes) -> list[int]:
    return [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]


class MemProbe:
    """Host side of memprobe32.S: hand the guest one command, collect its report."""

    def __init__(self, machine):
        self.m = machine
        self._cmds: queue.Queue[int] = queue.Queue()
        self._reports: queue.Queue[dict] = queue.Queue()
        self._values: list[int] = []
        self.mmio_writes: list[exits.MmioWrite] = []
        self.step = 0
        machine.exits.register_io_in(0x511, self._next)
        machine.exits.register_io_out(0x510, lambda r, ex: self._values.append(int.from_bytes(ex.data, "little")))
        machine.exits.register_io_out(0x512, self._done)
        machine.exits.register_exit(exits.MmioWrite, self._mmio_write)

    def _next(self, _r, _ex) -> bytes:
        try:
            return self._cmds.get_nowait().to_bytes(4, "little")
        except queue.Empty:
            return bytes(4)

    def _done(self, _r, _ex) -> None:
        self._reports.put(dict(zip(FIELDS, self._values, strict=True)))
        self._values = []

    def _mmio_write(self, _r, ex) -> bool:
        self.mmio_writes.append(ex)
        return True

    def round(self, flags: int = 0) -> tuple[int, dict]:
        """One command (a fresh step number in the high bits) and the report it produced."""
        self.step += 1
        cmd = (self.step << 8) | flags | 1
        self._cmds.put(cmd)
        return cmd, self._reports.get(timeout=10)

    def stop(self) -> None:
        self._cmds.put(ONES)


@pytest.fixture
def probe(make_machine, guests):
    m = make_machine(irqchip=False)
    p = MemProbe(m)
    load_image(m, guests.image("memprobe32.S", bits=32, defines=DEFINES))
    pattern = b"".join((0xA0000000 + i).to_bytes(4, "little") for i in range(PAGE_SIZE // 4))
    m.mem.write(P, pattern)
    m.mem.write(Q, pattern)
    m.start()
    yield p
    p.stop()


def test_host_writes_reach_the_guest_and_guest_writes_reach_the_host(probe):
    m = probe.m
    cmd, rep = probe.round(WRITE_P)
    assert rep["p"] == 0xA0000000                       # host -> guest
    assert m.mem.read_u32(P + 16) == cmd == rep["p16"]   # guest -> host
    assert rep["p_sum"] == sum(_u32s(m.mem.read(P, PAGE_SIZE))) & ONES
    m.mem.write_u32(P, 0x12345678)                       # host changes it while running
    _, rep = probe.round()
    assert rep["p"] == 0x12345678


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "slot-split"])
def test_overlay_hides_ram_and_ram_comes_back_intact(probe, in_place, monkeypatch):
    m = probe.m
    monkeypatch.setattr(m.memmap, "remap_overlays", in_place)
    ram_page = m.mem.read(P, PAGE_SIZE)
    _, rep = probe.round()
    assert rep["p"] == 0xA0000000 and rep["p_sum"] == sum(_u32s(ram_page)) & ONES

    page = Backing.anonymous("test", PAGE_SIZE)
    try:
        page.view[:] = b"\x4f" * PAGE_SIZE
        m.change_memory(lambda mm: mm.map_overlay("test", page, P))
        cmd, rep = probe.round(WRITE_P)              # the write lands in the overlay
        assert rep["p"] == 0x4F4F4F4F and rep["p16"] == cmd
        assert rep["p_sum"] == sum(_u32s(bytes(page.view))) & ONES
        assert int.from_bytes(page.view[16:20], "little") == cmd
        assert os.pread(m.ram.fd, PAGE_SIZE, P) == ram_page      # RAM beneath untouched
        assert m.mem.read_u32(P + 16) == cmd                    # host helpers honour it too

        m.change_memory(lambda mm: mm.unmap_overlay("test"))
        _, rep = probe.round()
        assert rep["p"] == 0xA0000000 and rep["p16"] == 0xA0000004
        assert rep["p_sum"] == sum(_u32s(ram_page)) & ONES
        assert m.mem.read(P, PAGE_SIZE) == ram_page
    finally:
        m.stop()
        page.close()


def test_overlay_moves_between_ram_pages(probe):
    m = probe.m
    page = Backing.anonymous("test", PAGE_SIZE)
    try:
        page.view[:] = b"\x4f" * PAGE_SIZE
        m.change_memory(lambda mm: mm.map_overlay("test", page, Q))
        _, rep = probe.round()
        assert rep["q"] == 0x4F4F4F4F and rep["p"] == 0xA0000000
        m.change_memory(lambda mm: mm.map_overlay("test", page, P))  # moves: Q is RAM again
        _, rep = probe.round()
        assert rep["p"] == 0x4F4F4F4F and rep["q"] == 0xA0000000
    finally:
        m.stop()
        page.close()


def test_overlay_over_a_hole(probe):
    m = probe.m
    cmd, rep = probe.round(WRITE_H)
    assert rep["h"] == ONES and rep["h16"] == ONES          # unbacked: MMIO, answered with ones
    assert exits.MmioWrite(H + 16, cmd.to_bytes(4, "little")) in probe.mmio_writes

    page = Backing.anonymous("hole", PAGE_SIZE)
    try:
        page.view[:4] = b"\x11\x22\x33\x44"
        m.change_memory(lambda mm: mm.map_overlay("hole", page, H))
        seen = len(probe.mmio_writes)
        cmd, rep = probe.round(WRITE_H)
        assert rep["h"] == 0x44332211 and rep["h16"] == cmd
        assert int.from_bytes(page.view[16:20], "little") == cmd
        assert len(probe.mmio_writes) == seen                 # no MMIO while it is mapped

        m.change_memory(lambda mm: mm.unmap_overlay("hole"))
        _, rep = probe.round()
        assert rep["h"] == ONES
    finally:
        m.stop()
        page.close()


def test_ballooned_page_is_unbacked_then_returns_zeroed(probe):
    m = probe.m
    _, rep = probe.round()
    assert rep["q"] == 0xA0000000
    m.change_memory(lambda mm: mm.remove_ram_page(Q // PAGE_SIZE))
    cmd, rep = probe.round(WRITE_Q)
    assert rep["q"] == ONES and rep["q16"] == ONES
    assert exits.MmioWrite(Q + 16, cmd.to_bytes(4, "little")) in probe.mmio_writes
    assert not m.mem.is_backed(Q)

    m.change_memory(lambda mm: mm.restore_ram_page(Q // PAGE_SIZE))
    _, rep = probe.round()
    assert rep["q"] == 0 and rep["q16"] == 0
    assert m.mem.read(Q, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert rep["p"] == 0xA0000000  # the neighbours never moved
