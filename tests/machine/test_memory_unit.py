"""MemoryMap and GuestMemory with a fake slot sink: no /dev/kvm needed.

The map is checked through what KVM would be told (the sink's live slots) and through what
Python reads with GuestMemory, including failure rollback and every bounds check."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xend_lite.errors import GuestMemoryError, InvalidArgument, NotFound
from xend_lite.machine.backing import PAGE_SIZE, Backing
from xend_lite.machine import memmap
from xend_lite.machine.memmap import MemoryMap, RamRegion
from xend_lite.machine.guestmem import GuestMemory

from .conftest import FakeSink

KIB = 1024
LOW = 256 * KIB          # RAM [0, 256K)
HIGH = 1024 * KIB        # RAM [1M, 1M + 256K): a hole lies between
HOLE = 512 * KIB


@pytest.fixture
def ram():
    b = Backing.anonymous("ram", 512 * KIB)
    yield b
    b.close()


@pytest.fixture
def page():
    b = Backing.anonymous("ov", PAGE_SIZE)
    b.view[:] = b"O" * PAGE_SIZE
    yield b
    b.close()


def _regions(ram):
    return [RamRegion(0, LOW, ram, 0), RamRegion(HIGH, 256 * KIB, ram, LOW)]


@pytest.fixture
def mm(ram, fake_sink):
    return MemoryMap(fake_sink, _regions(ram), phys_bits=36)


def _fill_ram(ram):
    for off in range(0, ram.size, PAGE_SIZE):
        ram.view[off:off + PAGE_SIZE] = (off // PAGE_SIZE).to_bytes(4, "little") * (PAGE_SIZE // 4)


# -- slots -----------------------------------------------------------------------------

def test_ram_regions_become_slots(mm, fake_sink, ram):
    assert fake_sink.view() == [(0, LOW, ram.addr), (HIGH, 256 * KIB, ram.addr + LOW)]
    assert mm.ram_bytes == 512 * KIB


def test_overlay_splits_ram_and_unmap_restores_the_slots(mm, fake_sink, ram, page):
    before = fake_sink.view()
    mm.map_overlay("p", page, 0x10000)
    assert fake_sink.view() == [(0, 0x10000, ram.addr), (0x10000, PAGE_SIZE, page.addr),
                                (0x11000, LOW - 0x11000, ram.addr + 0x11000),
                                (HIGH, 256 * KIB, ram.addr + LOW)]
    assert mm.overlays() == {"p": 0x10000}
    mm.unmap_overlay("p")
    assert fake_sink.view() == before
    assert mm.overlays() == {}


def test_apply_touches_only_what_changed(mm, fake_sink, page):
    calls = fake_sink.calls
    mm.map_overlay("p", page, HIGH)  # at the start of the high region: delete 1, add 2
    assert fake_sink.calls - calls == 3
    calls = fake_sink.calls
    mm.apply()
    assert fake_sink.calls == calls


def _ram_slots(sink, ram):
    return tuple(s for s in sink.view() if ram.addr <= s[2] < ram.addr + ram.size)


@pytest.mark.parametrize("in_place", [True, False])
def test_slot_ram_is_the_ram_kvm_holds_and_is_told_only_when_that_changes(ram, page, in_place):
    """slot_ram (what the C event-channel code translates guest addresses with) is the RAM
    in KVM's slots after every change. Its listeners hear of every change of it and of
    nothing else: an overlay laid in place over RAM moves without one."""
    sink = FakeSink()
    mm = MemoryMap(sink, _regions(ram), phys_bits=36, remap_overlays=in_place)
    heard = []
    mm.ram_listeners.append(lambda: heard.append(mm.slot_ram))
    steps = [lambda: mm.map_overlay("p", page, 0x2000), lambda: mm.map_overlay("p", page, 0x5000),
             lambda: mm.map_overlay("p", page, HOLE), lambda: mm.map_overlay("p", page, HIGH),
             lambda: mm.balloon([3], []), lambda: mm.unmap_overlay("p"),
             lambda: mm.balloon([], [3]), mm.clear]
    for step in steps:
        before = mm.slot_ram
        step()
        assert mm.slot_ram == _ram_slots(sink, ram)
        changed = mm.slot_ram != before
        assert heard == ([mm.slot_ram] if changed else []), step
        heard.clear()
    assert mm.slot_ram == ((0, LOW, ram.addr), (HIGH, 256 * KIB, ram.addr + LOW))


def test_overlay_at_address_zero_is_valid(mm, fake_sink, page, ram):
    mm.map_overlay("p", page, 0)
    assert (0, PAGE_SIZE, page.addr) in fake_sink.view()
    assert GuestMemory(mm).read(0, 1) == b"O"


def test_mapping_again_moves_the_page(mm, page):
    mm.map_overlay("p", page, 0x2000)
    mm.map_overlay("p", page, 0x5000)
    assert mm.overlays() == {"p": 0x5000}
    mem = GuestMemory(mm)
    assert mem.read(0x5000, 1) == b"O"
    assert mem.read(0x2000, 1) != b"O"


def test_two_overlays_cannot_share_an_address(mm, page):
    other = Backing.anonymous("other", PAGE_SIZE)
    try:
        mm.map_overlay("p", page, 0x2000)
        with pytest.raises(InvalidArgument, match="already holds overlay p"):
            mm.map_overlay("q", other, 0x2000)
        assert mm.overlays() == {"p": 0x2000}
    finally:
        other.close()


@pytest.mark.parametrize("gpa,msg", [
    (0x2001, "not page aligned"),
    (-PAGE_SIZE, "beyond"),
    (1 << 36, "beyond"),
    ((1 << 64) - PAGE_SIZE, "beyond"),
])
def test_bad_overlay_addresses(mm, page, gpa, msg):
    with pytest.raises(InvalidArgument, match=msg):
        mm.map_overlay("p", page, gpa)
    assert mm.overlays() == {}


def test_overlay_address_must_be_an_int(mm, page):
    with pytest.raises(InvalidArgument):
        mm.map_overlay("p", page, True)
    with pytest.raises(InvalidArgument):
        mm.map_overlay("p", page, 4096.0)


def test_overlay_must_be_one_page(mm):
    big = Backing.anonymous("big", 2 * PAGE_SIZE)
    try:
        with pytest.raises(InvalidArgument, match="one page"):
            mm.map_overlay("big", big, 0x2000)
    finally:
        big.close()


def test_overlay_over_a_hole(mm, fake_sink, page):
    mem = GuestMemory(mm)
    assert not mem.is_backed(HOLE)
    mm.map_overlay("p", page, HOLE)
    assert (HOLE, PAGE_SIZE, page.addr) in fake_sink.view()
    assert mem.read(HOLE, 4) == b"OOOO"
    mem.write(HOLE + 8, b"xy")
    assert bytes(page.view[8:10]) == b"xy"
    mm.unmap_overlay("p")
    assert not mem.is_backed(HOLE)
    assert len(fake_sink.view()) == 2


def test_overlay_hides_ram_which_comes_back_intact(mm, ram, page):
    _fill_ram(ram)
    mem = GuestMemory(mm)
    original = mem.read(0x3000, PAGE_SIZE)
    mm.map_overlay("p", page, 0x3000)
    assert mem.read(0x3000, PAGE_SIZE) == b"O" * PAGE_SIZE
    mem.write(0x3000, b"written through the overlay")
    assert bytes(page.view[:7]) == b"written"
    mm.unmap_overlay("p")
    assert mem.read(0x3000, PAGE_SIZE) == original


def test_unmapping_an_unknown_overlay_is_a_no_op(mm, fake_sink):
    calls = fake_sink.calls
    mm.unmap_overlay("nothing")
    assert fake_sink.calls == calls


# -- rollback --------------------------------------------------------------------------

@pytest.mark.parametrize("fail_at", range(4))
def test_failed_map_leaves_the_old_slots(ram, page, fail_at):
    sink = FakeSink()
    mm = MemoryMap(sink, _regions(ram), phys_bits=36)
    before, segs, gen = sink.view(), mm.segments, mm.generation
    sink.fail_at = sink.calls + fail_at  # the map makes 4 calls: delete 1, add 3
    with pytest.raises(OSError, match="fake sink refused"):
        mm.map_overlay("p", page, 0x10000)
    assert sink.view() == before
    assert mm.segments == segs and mm.generation == gen
    assert mm.overlays() == {}
    sink.fail_at = None
    mm.map_overlay("p", page, 0x10000)  # the map still works afterwards
    assert mm.overlays() == {"p": 0x10000}


@pytest.mark.parametrize("fail_at", range(6))
def test_failed_move_keeps_the_overlay_where_it_was(ram, page, fail_at):
    sink = FakeSink()
    mm = MemoryMap(sink, _regions(ram), phys_bits=36)
    mm.map_overlay("p", page, 0x10000)
    before = sink.view()
    sink.fail_at = sink.calls + fail_at
    with pytest.raises(OSError):
        mm.map_overlay("p", page, 0x20000)
    assert sink.view() == before
    assert mm.overlays() == {"p": 0x10000}
    assert GuestMemory(mm).read(0x10000, 1) == b"O"


@pytest.mark.parametrize("fail_at", range(4))
def test_failed_unmap_keeps_the_overlay(ram, page, fail_at):
    sink = FakeSink()
    mm = MemoryMap(sink, _regions(ram), phys_bits=36)
    mm.map_overlay("p", page, 0x10000)
    before = sink.view()
    sink.fail_at = sink.calls + fail_at
    with pytest.raises(OSError):
        mm.unmap_overlay("p")
    assert sink.view() == before
    assert mm.overlays() == {"p": 0x10000}


class FlakyMmap:
    """map_shared_fixed that refuses its call number ``fail_at`` (counted from 0)."""

    def __init__(self, fail_at: int):
        self.fail_at, self.calls, self.real = fail_at, 0, memmap.map_shared_fixed

    def __call__(self, *args: int) -> None:
        self.calls += 1
        if self.calls == self.fail_at + 1:
            raise OSError(errno.ENOMEM, "mmap refused")
        self.real(*args)


@pytest.mark.parametrize("op, fail_at", [("move", 0), ("move", 1), ("unmap", 0), ("map", 0)])
def test_failed_change_in_place_keeps_the_overlay_where_it_was(ram, page, op, fail_at, monkeypatch):
    """A move laid in place maps the RAM page back, then the overlay at its new place; a
    failure at either step leaves the overlay, the view and the host mappings as they were."""
    mm = MemoryMap(FakeSink(), _regions(ram), phys_bits=36, remap_overlays=True)
    _fill_ram(ram)
    old, new = 0x10000, 0x20000
    try:
        if op != "map":
            mm.map_overlay("p", page, old)
        before = (mm.overlays(), mm.segments, mm.generation)
        monkeypatch.setattr(memmap, "map_shared_fixed", FlakyMmap(fail_at))
        with pytest.raises(OSError, match="mmap refused"):
            if op == "unmap":
                mm.unmap_overlay("p")
            else:
                mm.map_overlay("p", page, new)
        monkeypatch.undo()
        assert (mm.overlays(), mm.segments, mm.generation) == before
        laid = b"O" if op != "map" else (old // PAGE_SIZE).to_bytes(1, "little")
        assert bytes(ram.view[old:old + 1]) == laid
        assert bytes(ram.view[new:new + 4]) == (new // PAGE_SIZE).to_bytes(4, "little")
        mm.map_overlay("p", page, new)       # and the map still works afterwards
        assert bytes(ram.view[new:new + 1]) == b"O"
        assert bytes(ram.view[old:old + 4]) == (old // PAGE_SIZE).to_bytes(4, "little")
    finally:
        mm.clear()


def test_failed_balloon_keeps_the_page(ram):
    sink = FakeSink()
    mm = MemoryMap(sink, _regions(ram), phys_bits=36)
    _fill_ram(ram)
    before = sink.view()
    sink.fail_at = sink.calls + 1
    with pytest.raises(OSError):
        mm.remove_ram_page(5)
    assert sink.view() == before and not mm.is_ballooned(5)
    assert GuestMemory(mm).read_u32(5 * PAGE_SIZE) == 5  # not zeroed either


# -- ballooning ------------------------------------------------------------------------

def test_balloon_out_and_back_zeroed(mm, ram, fake_sink):
    _fill_ram(ram)
    mem = GuestMemory(mm)
    mm.remove_ram_page(7)
    assert mm.is_ballooned(7) and not mm.is_ram_page(7) and mm.ballooned_pages == 1
    assert not any(g <= 7 * PAGE_SIZE < g + n for g, n, _ in fake_sink.view())
    with pytest.raises(GuestMemoryError):
        mem.read(7 * PAGE_SIZE, 1)
    assert mem.read_u32(6 * PAGE_SIZE) == 6 and mem.read_u32(8 * PAGE_SIZE) == 8
    with pytest.raises(NotFound):
        mm.remove_ram_page(7)
    mm.restore_ram_page(7)
    assert mem.read(7 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
    with pytest.raises(NotFound):
        mm.restore_ram_page(7)


def test_balloon_refuses_holes(mm):
    with pytest.raises(NotFound):
        mm.remove_ram_page(HOLE // PAGE_SIZE)


def test_clear_undoes_overlays_and_balloon(mm, fake_sink, page):
    before = fake_sink.view()
    mm.map_overlay("p", page, 0x4000)
    mm.remove_ram_page(9)
    mm.clear()
    assert fake_sink.view() == before
    assert mm.overlays() == {} and mm.ballooned() == []


# -- GuestMemory bounds ----------------------------------------------------------------

@pytest.mark.parametrize("gpa,length", [
    (HOLE, 1),                         # unbacked
    (LOW - 2, 4),                      # runs off RAM into the hole
    ((1 << 64) - 4, 8),                # wraps at 2^64
    ((1 << 64) - 1, 2),
    (-1, 1),                           # negative address
    (0, -1),                           # negative length
    (0, GuestMemory.MAX_ACCESS + 1),   # absurdly long
    (1 << 64, 1),
])
def test_bad_reads_and_writes_raise(mm, gpa, length):
    mem = GuestMemory(mm)
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)
    if length >= 0 and length <= 4096:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, b"\x01" * length)
    assert not mem.is_backed(gpa, length)


def test_error_carries_address_and_length(mm):
    with pytest.raises(GuestMemoryError) as info:
        GuestMemory(mm).read(LOW - 2, 4)
    assert info.value.gpa == LOW - 2 and info.value.length == 4
    assert f"{LOW:#x}" in str(info.value)


def test_non_integer_arguments_are_rejected(mm):
    mem = GuestMemory(mm)
    with pytest.raises(GuestMemoryError):
        mem.read("0", 4)  # type: ignore[arg-type]
    with pytest.raises(GuestMemoryError):
        mem.read(0, 4.0)  # type: ignore[arg-type]


def test_a_write_that_fails_writes_nothing(mm, ram):
    mem = GuestMemory(mm)
    with pytest.raises(GuestMemoryError):
        mem.write(LOW - 4, b"ABCDEFGH")
    assert mem.read(LOW - 4, 4) == bytes(4)


def test_access_straddles_adjacent_segments(ram, fake_sink, page):
    # Two RAM regions back to back, and an overlay in the middle: one access spans all.
    mm = MemoryMap(fake_sink, [RamRegion(0, 64 * KIB, ram, 0), RamRegion(64 * KIB, 64 * KIB, ram, 64 * KIB)])
    mm.map_overlay("p", page, 60 * KIB)
    mem = GuestMemory(mm)
    data = bytes(range(256)) * 48  # 12 KiB from 56K to 68K: RAM, overlay, RAM, RAM
    mem.write(56 * KIB, data)
    assert mem.read(56 * KIB, len(data)) == data
    assert bytes(page.view[:PAGE_SIZE]) == data[4 * KIB:8 * KIB]
    assert bytes(ram.view[60 * KIB:64 * KIB]) == bytes(4 * KIB)  # beneath: untouched


def test_zero_length_access_is_fine_anywhere_valid(mm):
    mem = GuestMemory(mm)
    assert mem.read(HOLE, 0) == b""
    mem.write(HOLE, b"")


def test_typed_helpers_round_trip_and_mask(mm):
    mem = GuestMemory(mm)
    mem.write_u8(0x100, 0x1FF)
    mem.write_u16(0x102, 0xABCD)
    mem.write_u32(0x104, -1)
    mem.write_u64(0x108, 0x1122334455667788)
    assert mem.read_u8(0x100) == 0xFF
    assert mem.read_u16(0x102) == 0xABCD
    assert mem.read_u32(0x104) == 0xFFFFFFFF
    assert mem.read_u64(0x108) == 0x1122334455667788
    assert mem.read(0x108, 2) == b"\x88\x77"


# -- the model: any sequence of changes gives the view it should ------------------------

PAGES = (HIGH + 256 * KIB) // PAGE_SIZE + 4  # RAM, the hole and a little beyond
RAM_PAGES = set(range(LOW // PAGE_SIZE)) | set(range(HIGH // PAGE_SIZE, (HIGH + 256 * KIB) // PAGE_SIZE))

op = st.one_of(
    st.tuples(st.just("map"), st.sampled_from("abc"), st.integers(0, PAGES - 1)),
    st.tuples(st.just("unmap"), st.sampled_from("abc"), st.just(0)),
    st.tuples(st.just("balloon"), st.just(""), st.sampled_from(sorted(RAM_PAGES))),
    st.tuples(st.just("restore"), st.just(""), st.sampled_from(sorted(RAM_PAGES))),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=25))
def test_any_sequence_matches_the_model(ram, ops):
    sink = FakeSink()
    pages = {n: Backing.anonymous(n, PAGE_SIZE) for n in "abc"}
    try:
        for n, b in pages.items():
            b.view[:] = n.encode() * PAGE_SIZE
        mm = MemoryMap(sink, _regions(ram), phys_bits=36)
        _fill_ram(ram)
        mem = GuestMemory(mm)
        overlays: dict[str, int] = {}
        ballooned: set[int] = set()
        zeroed: set[int] = set()
        for kind, name, gfn in ops:
            if kind == "map":
                if any(g == gfn and o != name for o, g in overlays.items()):
                    with pytest.raises(InvalidArgument):
                        mm.map_overlay(name, pages[name], gfn * PAGE_SIZE)
                    continue
                mm.map_overlay(name, pages[name], gfn * PAGE_SIZE)
                overlays[name] = gfn
            elif kind == "unmap":
                mm.unmap_overlay(name)
                overlays.pop(name, None)
            elif kind == "balloon":
                if gfn in ballooned:
                    with pytest.raises(NotFound):
                        mm.remove_ram_page(gfn)
                    continue
                mm.remove_ram_page(gfn)
                ballooned.add(gfn)
                zeroed.add(gfn)
            else:
                if gfn not in ballooned:
                    with pytest.raises(NotFound):
                        mm.restore_ram_page(gfn)
                    continue
                mm.restore_ram_page(gfn)
                ballooned.discard(gfn)
        assert mm.overlays() == {n: g * PAGE_SIZE for n, g in overlays.items()}
        by_gfn = {g: n for n, g in overlays.items()}
        # What KVM was told: page by page, the host address each guest frame resolves to.
        told: dict[int, int] = {}
        for g, size, host in sink.view():
            for i in range(size // PAGE_SIZE):
                told[g // PAGE_SIZE + i] = host + i * PAGE_SIZE
        for gfn in range(PAGES):
            if gfn in by_gfn:
                want = pages[by_gfn[gfn]].addr
            elif gfn in RAM_PAGES and gfn not in ballooned:
                off = gfn * PAGE_SIZE if gfn * PAGE_SIZE < LOW else LOW + gfn * PAGE_SIZE - HIGH
                want = ram.addr + off
            else:
                want = None
            assert told.get(gfn) == want, f"frame {gfn:#x}"
            if want is None:
                assert not mem.is_backed(gfn * PAGE_SIZE)
            elif gfn in by_gfn:
                assert mem.read(gfn * PAGE_SIZE, 1) == by_gfn[gfn].encode()
            else:
                ram_off = gfn if gfn * PAGE_SIZE < LOW else (LOW + gfn * PAGE_SIZE - HIGH) // PAGE_SIZE
                expect = 0 if gfn in zeroed else ram_off
                assert mem.read_u32(gfn * PAGE_SIZE) == expect
    finally:
        for b in pages.values():
            b.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=25))
def test_changes_laid_in_place_give_the_view_a_full_recompute_gives(ram, ops):
    """Over shared RAM an overlay is laid in place and the view spliced around it: after
    any sequence the view is exactly what computing it afresh gives, each RAM page's host
    address shows the overlay laid there or the RAM, and the RAM beneath is untouched (ballooning aside)."""
    sink = FakeSink()
    pages = {n: Backing.anonymous(n, PAGE_SIZE) for n in "abc"}
    maps: list[MemoryMap] = []
    try:
        for n, b in pages.items():
            b.view[:] = n.encode() * PAGE_SIZE
        mm = MemoryMap(sink, _regions(ram), phys_bits=36, remap_overlays=True)
        _fill_ram(ram)
        maps.append(mm)
        mem = GuestMemory(mm)
        slots = sink.view()
        zeroed: set[int] = set()
        for kind, name, gfn in ops:
            ram_now = {g for g in RAM_PAGES if not mm.is_ballooned(g)}
            was = mm.overlay_gpa(name)
            in_place = (was is None or was // PAGE_SIZE in ram_now) and (
                kind == "unmap" or (kind == "map" and gfn in ram_now))
            try:
                if kind == "map":
                    mm.map_overlay(name, pages[name], gfn * PAGE_SIZE)
                elif kind == "unmap":
                    mm.unmap_overlay(name)
                elif kind == "balloon":
                    mm.remove_ram_page(gfn)
                    zeroed.add(gfn)
                else:
                    mm.restore_ram_page(gfn)
            except (InvalidArgument, NotFound):
                pass
            assert mm.segments == tuple(mm._compute())
            if in_place:
                assert sink.view() == slots, "a change over shared RAM touched KVM's slots"
            slots = sink.view()
        by_gfn = {g // PAGE_SIZE: n for n, g in mm.overlays().items()}
        for gfn in sorted(RAM_PAGES):
            off = gfn * PAGE_SIZE if gfn * PAGE_SIZE < LOW else LOW + gfn * PAGE_SIZE - HIGH
            beneath = os.pread(ram.fd, 4, off)
            if gfn in by_gfn and not mm.is_ballooned(gfn):
                assert bytes(ram.view[off:off + 1]) == by_gfn[gfn].encode()     # laid in place
                assert mem.read(gfn * PAGE_SIZE, 1) == by_gfn[gfn].encode()
            else:
                assert bytes(ram.view[off:off + 4]) == beneath
            assert beneath == (0 if gfn in zeroed else off // PAGE_SIZE).to_bytes(4, "little")
    finally:
        for m in maps:
            m.clear()       # the RAM fixture outlives the example: put its pages back
        for b in pages.values():
            b.close()
