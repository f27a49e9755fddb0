"""The initrd: loaded page-aligned after the image, described in hvm_start_info's modlist
(checked against Xen's header), read back by a guest, and refused clearly where it cannot go."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from xend_lite.errors import LoaderError
from xend_lite.machine import loader
from xend_lite.machine.loader import MODLIST_ENTRY, START_INFO, load_elf, load_flat, load_image
from xend_lite.machine.backing import PAGE_SIZE

from .conftest import MIB
from .test_loader import FakeMachine

PORTS = {0x5F0: "nr_modules", 0x5F1: "modlist", 0x5F2: "paddr", 0x5F3: "size",
         0x5F4: "hash", 0x5F5: "high"}


def guest_hash(data: bytes) -> int:
    h = 0
    for b in data:
        h = (h * 31 + b) & 0xFFFFFFFF
    return h


def _run_probe(make_machine, guests, initrd: bytes | None, memory: int = 64 * MIB):
    m = make_machine(memory, irqchip=False)
    seen: dict[str, int] = {}
    for port, name in PORTS.items():
        m.exits.register_io_out(port, lambda r, ex, n=name: seen.__setitem__(
            n, int.from_bytes(ex.data, "little")))
    info = load_image(m, guests.image("modlist32.S", bits=32), "", initrd=initrd)
    m.start()
    status = m.wait(60)
    assert status is not None and status.reason == "halted", status
    return m, info, seen


@pytest.mark.kvm
def test_guest_reads_the_initrd_through_the_modlist(make_machine, guests):
    data = random.Random(7).randbytes(5 * PAGE_SIZE + 123)   # not a whole number of pages
    m, info, seen = _run_probe(make_machine, guests, data)
    assert seen["nr_modules"] == 1
    assert seen["modlist"] == loader.MODLIST_GPA
    assert seen["paddr"] == info.initrd.gpa and seen["size"] == len(data)
    assert seen["high"] == 0                       # no high halves, no module command line
    assert seen["hash"] == guest_hash(data)
    assert info.initrd.gpa % PAGE_SIZE == 0 and info.initrd.gpa >= info.image_end
    assert info.initrd.gpa - info.image_end < PAGE_SIZE   # right after the image
    assert m.mem.read(info.initrd.gpa, len(data)) == data


@pytest.mark.kvm
def test_no_initrd_means_no_modules(make_machine, guests):
    _m, info, seen = _run_probe(make_machine, guests, None)
    assert seen == {"nr_modules": 0} and info.initrd is None


def test_modlist_entry_layout_matches_xens_header(tmp_path):
    if not os.path.exists("/usr/include/xen/arch-x86/hvm/start_info.h"):
        pytest.skip("libxen-dev is not installed")
    fields = ("paddr", "size", "cmdline_paddr", "reserved")
    src = tmp_path / "modlist.c"
    src.write_text("\n".join([
        "#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>",
        "#include <xen/arch-x86/hvm/start_info.h>", "int main(void) {",
        'printf("%zu\\n", sizeof(struct hvm_modlist_entry));',
        *(f'printf("%zu\\n", offsetof(struct hvm_modlist_entry, {f}));' for f in fields),
        'printf("%zu %zu\\n", offsetof(struct hvm_start_info, nr_modules), '
        'offsetof(struct hvm_start_info, modlist_paddr));',
        "return 0; }"]) + "\n")
    exe = tmp_path / "modlist"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = [int(x) for x in subprocess.check_output([str(exe)]).split()]
    assert out[0] == MODLIST_ENTRY.size
    assert out[1:5] == [0, 8, 16, 24]
    assert out[5:7] == [12, 16]   # START_INFO's 4th and 5th fields
    assert loader.MODLIST_GPA % 8 == 0
    assert loader.START_INFO_GPA + START_INFO.size <= loader.MODLIST_GPA


# -- placement, without KVM ---------------------------------------------------------------

@pytest.fixture
def fake():
    m = FakeMachine(8 * MIB)
    yield m
    m.close()


def _start_info(m, gpa):
    return START_INFO.unpack(m.mem.read(gpa, START_INFO.size))


def test_initrd_goes_after_the_image_and_is_described(fake, guests):
    image = guests.image("boot.S", bits=64)
    data = b"initrd!" * 1000
    info = load_elf(fake, image, "", data)
    si = _start_info(fake, info.start_info)
    assert si[3] == 1 and si[4] == loader.MODLIST_GPA
    entry = MODLIST_ENTRY.unpack(fake.mem.read(loader.MODLIST_GPA, MODLIST_ENTRY.size))
    assert entry == (info.initrd.gpa, len(data), 0, 0)
    assert info.initrd.gpa == (info.image_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    assert fake.mem.read(info.initrd.gpa, len(data)) == data


def test_initrd_skips_reserved_pages(fake, guests):
    image = guests.image("boot.S", bits=64)
    end = load_elf(fake, image).image_end
    hole = (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    fake.memmap.reserved.append((hole + PAGE_SIZE, 2 * PAGE_SIZE, "special"))
    info = load_elf(fake, image, "", bytes(2 * PAGE_SIZE))   # needs two pages: the first gap has one
    assert info.initrd.gpa == hole + 3 * PAGE_SIZE
    small = load_elf(fake, image, "", bytes(PAGE_SIZE))       # one page fits before the range
    assert small.initrd.gpa == hole


def test_flat_image_takes_an_initrd(fake):
    info = load_flat(fake, b"\x90" * 100, 0x100000, "", b"abc")
    assert info.initrd.gpa == 0x101000 and info.initrd.filesz == 3
    assert _start_info(fake, info.start_info)[3] == 1


@pytest.mark.parametrize("size,message", [
    (0, "initrd is empty"),
    (8 * MIB, "does not fit in guest RAM below 4 GiB"),
])
def test_initrd_that_cannot_go_anywhere(fake, guests, size, message):
    with pytest.raises(LoaderError, match=message):
        load_elf(fake, guests.image("boot.S", bits=64), "", bytes(size))


def test_initrd_fills_ram_to_the_last_page(fake, guests):
    image = guests.image("boot.S", bits=64)
    end = load_elf(fake, image).image_end
    room = 8 * MIB - ((end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
    assert load_elf(fake, image, "", bytes(room)).initrd.gpa + room == 8 * MIB
    with pytest.raises(LoaderError, match="does not fit"):
        load_elf(fake, image, "", bytes(room + 1))


def test_initrd_only_below_4g(guests):
    from xend_lite.machine.backing import Backing
    from xend_lite.machine.memmap import MemoryMap, RamRegion
    from xend_lite.machine.guestmem import GuestMemory

    from .conftest import FakeSink

    # 2 MiB of RAM at 0 and 64 MiB at 4 GiB: the initrd fits only above 4 GiB, so it fits nowhere
    low, high = Backing.anonymous("low", 2 * MIB), Backing.anonymous("high", 64 * MIB)
    try:
        m = FakeMachine.__new__(FakeMachine)
        m.memory_bytes = (1 << 32) + 64 * MIB
        m.memmap = MemoryMap(FakeSink(), [RamRegion(0, 2 * MIB, low, 0),
                                          RamRegion(1 << 32, 64 * MIB, high, 0)])
        m.mem = GuestMemory(m.memmap)
        with pytest.raises(LoaderError, match="below 4 GiB"):
            load_elf(m, guests.image("boot.S", bits=32), "", bytes(4 * MIB))
    finally:
        low.close()
        high.close()


def test_initrd_needs_a_pvh_entry(fake, guests):
    image = guests.image("boot.S", bits=32, defines={"NO_PVH": 1})
    with pytest.raises(LoaderError, match="needs a PVH entry"):
        load_elf(fake, image, "", b"x")
