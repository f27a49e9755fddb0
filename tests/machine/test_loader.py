"""The boot loader: ELF32/ELF64 with and without the PVH note, flat binaries, the
hvm_start_info it builds (checked against Xen's header), and hostile images."""

from __future__ import annotations

import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xend_lite.errors import LoaderError
from xend_lite.machine import loader
from xend_lite.machine.loader import (HVM_START_MAGIC, MEMMAP_ENTRY, START_INFO, load_elf,
                                      load_image, parse_elf)
from xend_lite.machine.backing import Backing
from xend_lite.machine.memmap import MemoryMap, RamRegion
from xend_lite.machine.guestmem import GuestMemory

from .conftest import MIB, FakeSink

GIB = 1 << 30
PVH_MARK, ELF_MARK = 0x9F9F9F9F, 0xE0E0E0E0
CMDLINE = "console=hvc0 loglevel=8"


class BootReport:
    """Collects what guests/boot.S reports on ports 0x5e0.. ."""

    PORTS = {0x5E0: "entry", 0x5E1: "ebx", 0x5E2: "magic", 0x5E3: "cmdline4", 0x5E4: "mode"}

    def __init__(self, m):
        self.values: dict[str, list[int]] = {}
        for port, name in self.PORTS.items():
            m.exits.register_io_out(port, lambda r, ex, n=name: self.values.setdefault(n, []).append(
                int.from_bytes(ex.data, "little")))


def _boot(make_machine, image: bytes, memory: int = 64 * MIB, **load):
    m = make_machine(memory, irqchip=False)
    report = BootReport(m)
    info = load_image(m, image, CMDLINE, **load)
    m.start()
    status = m.wait(10)
    assert status is not None and status.reason == "halted", status
    return m, info, report.values


def _start_info(m, gpa: int) -> dict:
    fields = ("magic", "version", "flags", "nr_modules", "modlist_paddr", "cmdline_paddr",
              "rsdp_paddr", "memmap_paddr", "memmap_entries", "reserved")
    return dict(zip(fields, START_INFO.unpack(m.mem.read(gpa, START_INFO.size))))


def _memmap(m, si: dict) -> list[tuple[int, int, int, int]]:
    return [MEMMAP_ENTRY.unpack(m.mem.read(si["memmap_paddr"] + i * MEMMAP_ENTRY.size, MEMMAP_ENTRY.size))
            for i in range(si["memmap_entries"])]


def _cmdline(m, si: dict) -> bytes:
    raw = m.mem.read(si["cmdline_paddr"], 4096)
    return raw[:raw.index(b"\0")]


# -- booting real guests ---------------------------------------------------------------

@pytest.mark.kvm
@pytest.mark.parametrize("bits", [32, 64])
def test_pvh_elf_starts_at_the_note_with_start_info(make_machine, guests, bits):
    image = guests.image("boot.S", bits=bits)
    m, info, seen = _boot(make_machine, image)
    assert info.pvh and info.elf_class == bits
    assert info.entry == guests.symbol("boot.S", "pvh_start", bits=bits)
    assert info.entry != parse_elf(image)[1]  # the note wins over e_entry
    assert seen["entry"] == [PVH_MARK]
    assert seen["ebx"] == [info.start_info]
    assert seen["cmdline4"] == [int.from_bytes(CMDLINE[:4].encode(), "little")]
    if bits == 64:
        assert seen["mode"] == [64]
        assert seen["magic"] == [HVM_START_MAGIC, HVM_START_MAGIC]  # from EBX, then from RBX
    else:
        assert seen["magic"] == [HVM_START_MAGIC]
        assert "mode" not in seen

    si = _start_info(m, info.start_info)
    assert si["magic"] == HVM_START_MAGIC and si["version"] == 1
    assert si["nr_modules"] == 0 and si["reserved"] == 0 and si["rsdp_paddr"] == 0
    assert _cmdline(m, si) == CMDLINE.encode()
    assert _memmap(m, si) == [(0, 64 * MIB, loader.E820_RAM, 0)]


@pytest.mark.kvm
def test_elf_without_pvh_note_uses_e_entry(make_machine, guests):
    image = guests.image("boot.S", bits=32, defines={"NO_PVH": 1})
    m, info, seen = _boot(make_machine, image)
    assert not info.pvh and info.start_info is None
    assert info.entry == parse_elf(image)[1] == guests.symbol("boot.S", "_start", bits=32,
                                                             defines={"NO_PVH": 1})
    assert seen["entry"] == [ELF_MARK] and seen["ebx"] == [0]
    assert "magic" not in seen


@pytest.mark.kvm
def test_flat_binary_runs_from_its_first_byte(make_machine, guests):
    flat = guests.flat("boot.S", bits=32, defines={"NO_PVH": 1})
    assert flat[:4] != b"\x7fELF"
    m, info, seen = _boot(make_machine, flat, flat_gpa=0x100000)
    assert info.entry == 0x100000 and info.elf_class is None
    assert seen["entry"] == [PVH_MARK]
    assert seen["ebx"] == [info.start_info] and seen["magic"] == [HVM_START_MAGIC]


@pytest.mark.kvm
def test_loaded_segments_and_bss_are_in_guest_memory(make_machine, guests):
    image = guests.image("boot.S", bits=64)
    m = make_machine()
    m.mem.write(0x100000, b"\xaa" * (2 * MIB))  # stale bytes where the image and bss go
    info = load_image(m, image)
    _bits, _entry, phdrs = parse_elf(image)
    for p in (p for p in phdrs if p.type == loader.PT_LOAD):
        assert m.mem.read(p.paddr, p.filesz) == image[p.offset:p.offset + p.filesz]
        assert m.mem.read(p.paddr + p.filesz, p.memsz - p.filesz) == bytes(p.memsz - p.filesz)
    assert info.image_end == max(p.paddr + p.memsz for p in phdrs if p.type == loader.PT_LOAD)


@pytest.mark.kvm
def test_memory_map_with_high_ram_and_reserved_ranges(make_machine, guests):
    m = make_machine(3 * GIB + 64 * MIB)  # 3 GiB below the hole, 64 MiB above 4 GiB
    m.memmap.reserved.append((0xA0000, 0x60000, "legacy"))
    info = load_image(m, guests.image("boot.S", bits=32), "x")
    si = _start_info(m, info.start_info)
    assert _memmap(m, si) == [
        (0, 0xA0000, loader.E820_RAM, 0),
        (0xA0000, 0x60000, loader.E820_RESERVED, 0),
        (0x100000, 3 * GIB - 0x100000, loader.E820_RAM, 0),
        (4 * GIB, 64 * MIB, loader.E820_RAM, 0),
    ]
    assert _cmdline(m, si) == b"x"


# -- the start_info layout against Xen's header -----------------------------------------

START_INFO_FIELDS = ("magic", "version", "flags", "nr_modules", "modlist_paddr", "cmdline_paddr",
                     "rsdp_paddr", "memmap_paddr", "memmap_entries", "reserved")
MEMMAP_FIELDS = ("addr", "size", "type", "reserved")


def _offsets(fmt: str) -> list[int]:
    out, pos = [], 0
    for code in fmt.lstrip("<"):
        out.append(pos)
        pos += struct.calcsize("<" + code)
    return out


def test_start_info_layout_matches_xens_header(tmp_path):
    header = "/usr/include/xen/arch-x86/hvm/start_info.h"
    import os

    if not os.path.exists(header):
        pytest.skip("libxen-dev is not installed")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <stdint.h>',
             '#include <xen/arch-x86/hvm/start_info.h>', 'int main(void) {',
             'printf("%zu %zu\\n", sizeof(struct hvm_start_info), sizeof(struct hvm_memmap_table_entry));']
    lines += [f'printf("%zu\\n", offsetof(struct hvm_start_info, {f}));' for f in START_INFO_FIELDS]
    lines += [f'printf("%zu\\n", offsetof(struct hvm_memmap_table_entry, {f}));' for f in MEMMAP_FIELDS]
    lines += ['printf("%u\\n", (unsigned)XEN_HVM_START_MAGIC_VALUE);', 'return 0; }']
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = [int(x) for x in subprocess.check_output([str(exe)]).split()]
    assert out[:2] == [START_INFO.size, MEMMAP_ENTRY.size]
    assert out[2:12] == _offsets(START_INFO.format)
    assert out[12:16] == _offsets(MEMMAP_ENTRY.format)
    assert out[16] == HVM_START_MAGIC


# -- hostile images (no KVM: a fake machine over real memory) -----------------------------

class FakeMachine:
    """What the loader touches: guest memory, its size, the memory map and the RSDP."""

    def __init__(self, memory: int = 4 * MIB):
        self.backing = Backing.anonymous("ram", memory)
        self.memory_bytes = memory
        self.memmap = MemoryMap(FakeSink(), [RamRegion(0, memory, self.backing, 0)])
        self.mem = GuestMemory(self.memmap)
        self.acpi_rsdp = 0

    def close(self):
        self.backing.close()


@pytest.fixture
def fake():
    m = FakeMachine()
    yield m
    m.close()


@pytest.fixture(scope="module")
def elf64(guests) -> bytes:
    return guests.image("boot.S", bits=64)


@pytest.fixture(scope="module")
def elf32(guests) -> bytes:
    return guests.image("boot.S", bits=32)


def _put(image: bytes, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(image)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def _phdr(image: bytes, p_type: int) -> int:
    """File offset of the first program header of ``p_type`` (ELF64)."""
    phoff, = struct.unpack_from("<Q", image, 32)
    phnum, = struct.unpack_from("<H", image, 56)
    for i in range(phnum):
        if struct.unpack_from("<I", image, phoff + 56 * i)[0] == p_type:
            return phoff + 56 * i
    raise AssertionError(p_type)


def _note_desc(image: bytes) -> int:
    ph = _phdr(image, loader.PT_NOTE)
    return struct.unpack_from("<Q", image, ph + 8)[0]


MALFORMED = {
    "bad magic": (lambda e: b"\x7fELG" + e[4:], "bad magic"),
    "too short": (lambda e: e[:40], "bad magic"),
    "big endian": (lambda e: _put(e, 5, "<B", 2), "little-endian"),
    "class 3": (lambda e: _put(e, 4, "<B", 3), "unknown ELF class 3"),
    "arm": (lambda e: _put(e, 18, "<H", 40), "not an x86 image"),
    "relocatable": (lambda e: _put(e, 16, "<H", 1), "not an executable"),
    "phentsize": (lambda e: _put(e, 54, "<H", 32), "bad program header table"),
    "no phdrs": (lambda e: _put(e, 56, "<H", 0), "bad program header table"),
    "phoff past end": (lambda e: _put(e, 32, "<Q", len(e)), "past the end"),
    "segment past end": (lambda e: _put(e, _phdr(e, 1) + 32, "<Q", 1 << 40), "past the end"),
    "filesz > memsz": (lambda e: _put(e, _phdr(e, 1) + 40, "<Q", 1), "filesz > memsz"),
    "below low memory": (lambda e: _put(e, _phdr(e, 1) + 24, "<Q", 0x1000), "does not fit"),
    "beyond RAM": (lambda e: _put(e, _phdr(e, 1) + 24, "<Q", 0x3FF000), "does not fit"),
    "no load segment": (lambda e: _put(e, _phdr(e, 1), "<I", 6), "no loadable segments"),
    "note name size": (lambda e: _put(e, _note_desc(e), "<I", 1 << 20), "malformed ELF note"),
    "pvh note size": (lambda e: _put(e, _note_desc(e) + 4, "<I", 2), "bad size"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_elf_is_rejected_clearly(fake, elf64, case):
    mutate, message = MALFORMED[case]
    bad = mutate(elf64)
    with pytest.raises(LoaderError, match=message) as info:
        load_elf(fake, bad)
    assert str(info.value).startswith("guest image: ")


def test_entry_beyond_4g_is_rejected(fake, guests):
    image = guests.image("boot.S", bits=64, defines={"NO_PVH": 1})
    with pytest.raises(LoaderError, match="not reachable from 32-bit"):
        load_elf(fake, _put(image, 24, "<Q", 1 << 33))


def test_elf32_header_truncations(fake, elf32):
    with pytest.raises(LoaderError):
        load_elf(fake, elf32[:51])
    phoff, = struct.unpack_from("<I", elf32, 28)
    with pytest.raises(LoaderError, match="past the end"):
        load_elf(fake, elf32[:phoff + 8])


@pytest.mark.parametrize("cmdline,message", [("x" * 4096, "command line"), ("a\0b", "NUL")])
def test_bad_command_lines(fake, elf64, cmdline, message):
    with pytest.raises(LoaderError, match=message):
        load_elf(fake, elf64, cmdline)


def test_longest_command_line_fits(fake, elf64):
    info = load_elf(fake, elf64, "y" * loader.MAX_CMDLINE)
    assert fake.mem.read(loader.CMDLINE_GPA + loader.MAX_CMDLINE, 1) == b"\0"
    assert info.start_info == loader.START_INFO_GPA


@pytest.mark.parametrize("image,gpa,message", [
    (b"", 0x100000, "empty image"),
    (b"\x90" * 16, 0x2000, "does not fit"),               # over the boot structures
    (b"\x90" * 16, 4 * MIB - 8, "does not fit"),          # runs off the end of RAM
    (b"\x90" * 16, 1 << 40, "does not fit"),
])
def test_bad_flat_images(fake, image, gpa, message):
    with pytest.raises(LoaderError, match=message):
        loader.load_flat(fake, image, gpa)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_random_bytes_only_raise_loader_error(fake, data):
    for image in (data, b"\x7fELF\x02\x01" + data, b"\x7fELF\x01\x01" + data):
        try:
            load_elf(fake, image)
        except LoaderError:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8),
       which=st.sampled_from([32, 64]), cut=st.integers(0, 1 << 16))
def test_mutated_images_only_raise_loader_error(fake, elf32, elf64, edits, which, cut):
    image = bytearray(elf32 if which == 32 else elf64)
    for off, value in edits:
        if off < len(image):
            image[off] = value
    image = bytes(image[:max(cut, 64)])
    try:
        info = load_elf(fake, image)
    except LoaderError:
        return
    assert 0 <= info.entry < 1 << 32
    for seg in info.segments:
        assert loader.LOW_RESERVED_END <= seg.gpa and seg.gpa + seg.memsz <= fake.memory_bytes
