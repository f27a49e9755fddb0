"""The machine layer with real guests: loading, port I/O, guest memory, overlays, balloon,
pause/resume, shutdown detection and reset."""

from __future__ import annotations

import queue
import struct
import subprocess
import time

import pytest

from xend_lite.errors import GuestMemoryError, InvalidArgument, LoaderError
from xend_lite.kvm import Kvm, Regs
from xend_lite.machine.console import ConsoleSink
from xend_lite.machine.loader import (HVM_START_MAGIC, MEMMAP_ENTRY, START_INFO, BootCpu,
                                      flat32_sregs, load_image)
from xend_lite.machine.machine import Machine
from xend_lite.machine.backing import PAGE_SIZE, Backing

pytestmark = pytest.mark.kvm
MiB = 1 << 20


@pytest.fixture
def kvm():
    with Kvm() as k:
        yield k


@pytest.fixture
def machine(kvm):
    m = Machine(kvm, 64 * MiB, 1, ConsoleSink())
    yield m
    m.close()


class Probe:
    """Drives tests/machine/guests/probe32.S: read or write the dword at 0x500000."""

    def __init__(self, m: Machine):
        self.cmd: queue.Queue[int] = queue.Queue()
        self.arg = 0
        self.results: queue.Queue[int] = queue.Queue()
        m.exits.register_io_in(0x511, self._next)
        m.exits.register_io_in(0x512, lambda r, ex: self.arg.to_bytes(4, "little"))
        m.exits.register_io_out(0x510, lambda r, ex: self.results.put(int.from_bytes(ex.data, "little")))

    def _next(self, r, ex) -> bytes:
        try:
            return self.cmd.get_nowait().to_bytes(4, "little")
        except queue.Empty:
            return bytes(4)

    def read(self) -> int:
        self.cmd.put(1)
        return self.results.get(timeout=10)

    def write(self, value: int) -> int:
        self.arg = value
        self.cmd.put(2)
        return self.results.get(timeout=10)


def test_elf64_pvh_long_mode_io_and_memory(machine, guest_image):
    seen = []
    machine.exits.register_io_out(0x500, lambda r, ex: seen.append(int.from_bytes(ex.data, "little")))
    machine.exits.register_io_in(0x501, lambda r, ex: (41).to_bytes(4, "little"))
    machine.exits.register_io_out(0x502, lambda r, ex: seen.append(int.from_bytes(ex.data, "little")))
    info = load_image(machine, guest_image("machine/guests/hello64.S"), "console=hvc0 quiet")
    assert info.pvh and info.elf_class == 64 and info.entry == 0x100000
    machine.start()
    status = machine.wait(15)
    assert status is not None and status.reason == "halted"
    assert seen == [info.start_info, 42]
    assert machine.console.text() == "hello from long mode\n"
    assert machine.mem.read_u64(0x200000) == 0x1122334455667788


def test_elf32_pvh_start_info(machine, guest_image):
    seen = {}
    machine.exits.register_io_out(0x500, lambda r, ex: seen.__setitem__("si", int.from_bytes(ex.data, "little")))
    machine.exits.register_io_out(0x503, lambda r, ex: seen.__setitem__("magic", int.from_bytes(ex.data, "little")))
    info = load_image(machine, guest_image("machine/guests/hello32.S", bits=32), "root=/dev/xvda1")
    assert info.elf_class == 32
    machine.start()
    assert machine.wait(15).reason == "halted"
    assert seen == {"si": info.start_info, "magic": HVM_START_MAGIC}
    # The start_info as the PVH ABI lays it out: command line and memory map.
    f = START_INFO.unpack(machine.mem.read(info.start_info, START_INFO.size))
    magic, version, _flags, nr_modules, _ml, cmdline_pa, _rsdp, memmap_pa, memmap_n, _r = f
    assert (magic, version, nr_modules) == (HVM_START_MAGIC, 1, 0)
    assert machine.mem.read(cmdline_pa, 16) == b"root=/dev/xvda1\0"
    entries = [MEMMAP_ENTRY.unpack(machine.mem.read(memmap_pa + i * MEMMAP_ENTRY.size, MEMMAP_ENTRY.size))
               for i in range(memmap_n)]
    assert entries == [(0, 64 * MiB, 1, 0)]
    assert "hello from 32-bit protected mode" in machine.console.text()


def test_start_info_layout_matches_xen_header(tmp_path):
    src = tmp_path / "si.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n"
        "#include <xen/arch-x86/hvm/start_info.h>\n"
        "int main(void){printf(\"%zu %zu %zu %zu %zu\\n\", sizeof(struct hvm_start_info),"
        "offsetof(struct hvm_start_info, cmdline_paddr), offsetof(struct hvm_start_info, memmap_paddr),"
        "offsetof(struct hvm_start_info, memmap_entries), sizeof(struct hvm_memmap_table_entry));}\n")
    exe = tmp_path / "si"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    size, cmd_off, mm_off, mm_n_off, entry = map(int, subprocess.check_output([str(exe)]).split())
    assert size == START_INFO.size and entry == MEMMAP_ENTRY.size
    assert (cmd_off, mm_off, mm_n_off) == (24, 40, 48)  # the struct format's field positions
    assert struct.calcsize("<IIIIQQ") == 32 and struct.calcsize("<IIIIQQQQ") == 48


def test_overlay_hides_ram_and_ram_reappears_intact(machine, guest_image):
    probe = Probe(machine)
    load_image(machine, guest_image("machine/guests/probe32.S", bits=32))
    machine.mem.write_u32(0x500000, 0xAAAA5555)
    machine.start()
    assert probe.read() == 0xAAAA5555
    page = Backing.anonymous("overlay", PAGE_SIZE)
    page.view[0:4] = (0x0BE5EED0).to_bytes(4, "little")
    machine.change_memory(lambda mm: mm.map_overlay("test", page, 0x500000))
    assert probe.read() == 0x0BE5EED0
    assert probe.write(0x12345678) == 0x12345678          # the guest writes the overlay...
    assert page.view[0:4].tobytes() == (0x12345678).to_bytes(4, "little")
    assert machine.mem.read_u32(0x500000) == 0x12345678    # the host's view honours it too
    machine.change_memory(lambda mm: mm.map_overlay("test", page, 0x600000))  # move
    assert probe.read() == 0xAAAA5555                       # ...not the RAM beneath
    machine.change_memory(lambda mm: mm.unmap_overlay("test"))
    assert probe.read() == 0xAAAA5555
    assert machine.memmap.overlays() == {}


def test_overlay_over_a_hole_and_bad_addresses(machine):
    page = Backing.anonymous("hole", PAGE_SIZE)
    beyond = 0x1_0000_0000 + 16 * PAGE_SIZE  # past the end of RAM
    machine.change_memory(lambda mm: mm.map_overlay("h", page, beyond))
    machine.mem.write_u32(beyond + 8, 7)
    assert page.view[8] == 7
    with pytest.raises(GuestMemoryError):
        machine.mem.read(beyond + PAGE_SIZE, 1)
    for bad in (0x500001, -PAGE_SIZE, 1 << machine.phys_bits):
        with pytest.raises(InvalidArgument):
            machine.change_memory(lambda mm, bad=bad: mm.map_overlay("h", page, bad))
    assert machine.memmap.overlay_gpa("h") == beyond  # failures left the mapping alone
    machine.change_memory(lambda mm: mm.map_overlay("h", page, 0))  # address 0 is valid
    assert machine.memmap.overlay_gpa("h") == 0


def test_balloon_out_page_is_unbacked_and_comes_back_zeroed(machine, guest_image):
    probe = Probe(machine)
    load_image(machine, guest_image("machine/guests/probe32.S", bits=32))
    machine.mem.write_u32(0x500000, 99)
    gfn = 0x500000 // PAGE_SIZE
    machine.memmap.remove_ram_page(gfn)
    assert not machine.memmap.is_ram_page(gfn)
    with pytest.raises(GuestMemoryError):
        machine.mem.read_u32(0x500000)
    mmio = []
    from xend_lite.kvm import exits

    def on_mmio(r, ex):
        mmio.append(ex)
        r.vcpu.complete_mmio_read(b"\xee" * ex.length)
        return True

    machine.exits.register_exit(exits.MmioRead, on_mmio)
    machine.start()
    assert probe.read() == 0xEEEEEEEE and mmio[0].addr == 0x500000
    with pytest.raises(Exception):
        machine.memmap.remove_ram_page(gfn)  # already out
    machine.change_memory(lambda mm: mm.restore_ram_page(gfn))
    assert probe.read() == 0


def test_pause_resume_two_spinning_vcpus(kvm):
    m = Machine(kvm, 32 * MiB, 2)
    try:
        # vCPU n: L: incl 0x300000+4n; jmp L
        for n in range(2):
            m.mem.write(0x100000 + 0x100 * n, bytes([0xFF, 0x05]) + (0x300000 + 4 * n).to_bytes(4, "little")
                        + bytes([0xEB, 0xF8]))
            m.set_boot_cpu(n, BootCpu(Regs(rip=0x100000 + 0x100 * n, rflags=2),
                                      flat32_sregs(m.runners[n].vcpu.get_sregs())))
        m.start()
        time.sleep(0.2)
        worst = 0.0
        for _ in range(50):
            t = time.perf_counter()
            m.pause()
            worst = max(worst, time.perf_counter() - t)
            a = (m.mem.read_u32(0x300000), m.mem.read_u32(0x300004))
            time.sleep(0.002)
            assert (m.mem.read_u32(0x300000), m.mem.read_u32(0x300004)) == a  # nothing moves
            m.resume()
        assert worst < 0.2, f"pausing took {worst * 1000:.1f} ms"
        a = (m.mem.read_u32(0x300000), m.mem.read_u32(0x300004))
        time.sleep(0.05)
        b = (m.mem.read_u32(0x300000), m.mem.read_u32(0x300004))
        assert b[0] > a[0] and b[1] > a[1]
        assert all(r.state == "running" for r in m.runners)
    finally:
        m.close()


def test_triple_fault_is_reported(machine):
    # lidt [idtr0]; ud2   with an empty IDT: #UD -> #GP -> #DF -> shutdown
    code = bytes([0x0F, 0x01, 0x1D]) + (0x100010).to_bytes(4, "little") + bytes([0x0F, 0x0B])
    load_image(machine, code.ljust(16, b"\x90") + bytes(6), flat_gpa=0x100000)
    machine.start()
    st = machine.wait(10)
    assert st is not None and st.reason == "triple-fault"


def test_halt_with_interrupts_off_does_not_hang(machine):
    load_image(machine, bytes([0xFA, 0xF4]), flat_gpa=0x100000)  # cli; hlt
    machine.start()
    st = machine.wait(10)
    assert st is not None and st.reason == "halted"


def test_console_ports(machine):
    # out 0xe9 'a'; out 0x12 'b'; mov dx,0x3f8; mov al,'c'; out dx,al; cli; hlt
    code = bytes([0xB0, 0x61, 0xE6, 0xE9, 0xB0, 0x62, 0xE6, 0x12, 0x66, 0xBA, 0xF8, 0x03, 0xB0, 0x63,
                  0xEE, 0xFA, 0xF4])
    load_image(machine, code, flat_gpa=0x100000)
    machine.start()
    machine.wait(10)
    assert machine.console.text() == "abc"


def test_reset_and_rearm_run_the_guest_again(machine, guest_image):
    img = guest_image("machine/guests/hello64.S")
    machine.exits.register_io_in(0x501, lambda r, ex: bytes(4))
    for _ in range(2):
        load_image(machine, img)
        machine.start()
        assert machine.wait(10).reason == "halted"
        assert machine.mem.read_u64(0x200000) == 0x1122334455667788
        machine.rearm()
        assert machine.mem.read_u64(0x200000) == 0  # RAM cleared
    assert machine.console.text().count("hello from long mode") == 2


def test_handler_exception_stops_vm_not_daemon(machine):
    load_image(machine, bytes([0xE6, 0x77, 0xEB, 0xFC]), flat_gpa=0x100000)  # out 0x77, al loop

    def bad(r, ex):
        raise RuntimeError("handler bug")

    machine.exits.register_io_out(0x77, bad)
    machine.start()
    st = machine.wait(10)
    assert st.reason == "internal-error" and "RuntimeError" in st.detail


def test_malformed_elf_rejected(machine):
    for bad, msg in ((b"", "bad magic"), (b"\x7fELF\x03\x01" + b"\x00" * 60, "ELF class"),
                     (b"\x7fELF\x02\x02" + b"\x00" * 60, "little-endian"),
                     (b"MZ" + b"\0" * 100, "bad magic")):
        with pytest.raises(LoaderError, match=msg):
            load_image(machine, bad)
    with pytest.raises(LoaderError, match="does not fit"):
        load_image(machine, b"\x90" * 16, flat_gpa=0x10_0000_0000)
