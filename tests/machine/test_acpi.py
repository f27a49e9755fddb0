"""The ACPI tables (machine/acpi.py): well formed, naming only what the machine serves, found
through hvm_start_info, and the sleep and reset registers they name end the run."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from xend_lite.machine import acpi
from xend_lite.machine.loader import START_INFO, START_INFO_GPA, e820_map

BASE = 0xE0000


def tables(nr_vcpus: int = 2) -> tuple[bytes, dict[bytes, bytes]]:
    blob, rsdp_at = acpi.build(BASE, nr_vcpus)
    assert rsdp_at == BASE and blob[:8] == b"RSD PTR "
    xsdt_at = struct.unpack_from("<Q", blob, 24)[0]
    out = {}
    xsdt = blob[xsdt_at - BASE:]
    xsdt = xsdt[:struct.unpack_from("<I", xsdt, 4)[0]]
    out[b"XSDT"] = xsdt
    for (ptr,) in struct.iter_unpack("<Q", xsdt[36:]):
        t = blob[ptr - BASE:]
        t = t[:struct.unpack_from("<I", t, 4)[0]]
        out[t[:4]] = t
    dsdt_at = struct.unpack_from("<Q", out[b"FACP"], 140)[0]
    t = blob[dsdt_at - BASE:]
    out[b"DSDT"] = t[:struct.unpack_from("<I", t, 4)[0]]
    return blob, out


def test_every_checksum_and_pointer():
    blob, t = tables()
    assert sum(blob[:20]) % 256 == 0 and sum(blob[:36]) % 256 == 0       # RSDP, both sums
    assert set(t) == {b"XSDT", b"FACP", b"APIC", b"DSDT"}
    for sig, raw in t.items():
        assert sum(raw) % 256 == 0, sig
    assert struct.unpack_from("<I", t[b"FACP"], 40)[0] == struct.unpack_from("<Q", t[b"FACP"], 140)[0]


@pytest.mark.parametrize("n", [1, 2, 8])
def test_madt_one_enabled_lapic_per_vcpu_and_nothing_else(n):
    _, t = tables(n)
    madt = t[b"APIC"]
    lapic_base, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_base == 0xFEE00000 and flags == 0             # no 8259 pair offered
    entries = [struct.unpack_from("<BBBBI", madt, off) for off in range(44, len(madt), 8)]
    assert entries == [(0, 8, i, i, 1) for i in range(n)]      # UID = APIC ID = vCPU index


def test_fadt_says_hardware_reduced_with_our_ports():
    _, t = tables()
    f = t[b"FACP"]
    assert f[8] == 6 and len(f) == 276
    assert struct.unpack_from("<I", f, 112)[0] & acpi.FADT_HW_REDUCED
    boot = struct.unpack_from("<H", f, 109)[0]
    assert boot & acpi.IAPC_CMOS_RTC_NOT_PRESENT and boot & acpi.IAPC_VGA_NOT_PRESENT
    assert not boot & 0x3                                        # no legacy devices, no 8042
    gas = lambda off: struct.unpack_from("<BBBBQ", f, off)       # noqa: E731
    assert gas(244) == (1, 8, 0, 1, acpi.PORTS.sleep_control)
    assert gas(256) == (1, 8, 0, 1, acpi.PORTS.sleep_status)
    assert gas(116) == (1, 8, 0, 1, acpi.PORTS.reset) and f[128] == acpi.RESET_VALUE
    for off in (56, 64, 76):                                     # PM1a/PM1a_CNT/PM timer: none
        assert struct.unpack_from("<I", f, off)[0] == 0
    assert b"_S5_" in t[b"DSDT"]


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_reads_every_table(tmp_path):
    _, t = tables()
    for sig, raw in t.items():
        path = tmp_path / f"{sig.decode().lower()}.dat"
        path.write_bytes(raw)
        proc = subprocess.run(["iasl", "-d", str(path)], capture_output=True, text=True, cwd=tmp_path)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "Incorrect checksum" not in text, text


@pytest.mark.kvm
@pytest.mark.parametrize("port,value,reason", [
    (acpi.PORTS.sleep_control, acpi.SLP_EN | acpi.S5_SLP_TYP << 2, "poweroff"),
    (acpi.PORTS.reset, acpi.RESET_VALUE, "reboot"),
])
def test_installed_tables_found_and_registers_served(make_machine, guests, port, value, reason):
    from xend_lite.machine.loader import load_image

    m = make_machine(32 << 20)
    assert acpi.install(m) == acpi.ACPI_GPA
    load_image(m, guests.image("hello64.S"))
    si = START_INFO.unpack(m.mem.read(START_INFO_GPA, START_INFO.size))
    assert si[6] == acpi.ACPI_GPA                               # rsdp_paddr
    assert (acpi.ACPI_GPA, acpi.ACPI_SIZE, 2) in e820_map(m)    # reserved in the e820
    assert m.mem.read(acpi.ACPI_GPA, 8) == b"RSD PTR "
    # a write the register does not take changes nothing; the right one ends the run
    from xend_lite.kvm import exits

    class R:
        index = 0
    m.exits.io_out[port](R(), exits.IoOut(port, 1, 1, bytes([0x00])))
    assert m.status is None
    m.exits.io_out[port](R(), exits.IoOut(port, 1, 1, bytes([value])))
    assert m.status is not None and m.status.reason == reason
