"""The ACPI tables a PVH guest reads to find its processors, built here and laid in a page
that the memory map reports reserved.

A PVH guest gets the RSDP's address in hvm_start_info.rsdp_paddr. What the tables say is
only what the machine serves (layouts from the ACPI specification, 6.x):

- RSDP (revision 2) -> XSDT -> FADT and MADT;
- FADT (revision 6): a hardware-reduced platform (no SCI, no PM timer, no fixed-feature
  registers), no 8042, no VGA, no CMOS RTC (none of these are emulated); the sleep control
  and status registers and the reset register are I/O ports the machine serves (``PORTS``);
  X_DSDT points at the DSDT;
- MADT: one enabled local APIC per vCPU (ACPI processor UID and APIC ID = the vCPU's index,
  which is what KVM gives each in-kernel LAPIC), the LAPIC at 0xFEE00000, and nothing else:
  no IOAPIC and no 8259 pair is offered to the guest (Xen's PVH offers none either);
- DSDT: the \\_S5 package, so the guest can ask for soft-off through the sleep control
  register.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

if TYPE_CHECKING:
    from xend_lite.kvm import exits
    from xend_lite.machine.machine import Machine
    from xend_lite.machine.vcpu import VcpuRunner

ACPI_GPA = 0xE0000            # in the ISA BIOS range, which PVH Linux keeps reserved too
ACPI_SIZE = 0x1000
OEM_ID = b"XENDLT"
OEM_TABLE_ID = b"XENDLITE"
CREATOR_ID = b"XNDL"
LAPIC_BASE = 0xFEE00000

# FADT boot architecture and feature flags (ACPI 6.x, 5.2.9)
IAPC_VGA_NOT_PRESENT, IAPC_CMOS_RTC_NOT_PRESENT = 1 << 2, 1 << 5
FADT_WBINVD, FADT_PROC_C1, FADT_RESET_REG_SUP, FADT_HW_REDUCED = 1 << 0, 1 << 2, 1 << 10, 1 << 20
GAS_SYSTEM_IO = 1
SLP_EN = 1 << 5              # sleep control register: SLP_TYP in bits 2-4, SLP_EN bit 5
S5_SLP_TYP = 5
RESET_VALUE = 1


class AcpiPorts(Frozen):
    """The I/O ports behind the FADT's sleep control, sleep status and reset registers."""

    __slots__ = ("sleep_control", "sleep_status", "reset")
    sleep_control: int
    sleep_status: int
    reset: int

    def __init__(self, sleep_control: int = 0x604, sleep_status: int = 0x605, reset: int = 0x606):
        _set(self, "sleep_control", sleep_control)
        _set(self, "sleep_status", sleep_status)
        _set(self, "reset", reset)


PORTS = AcpiPorts()


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with it) sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def _table(sig: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header, then ``body``, checksummed."""
    length = 36 + len(body)
    head = struct.pack("<4sIBB6s8sI4sI", sig, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                       CREATOR_ID, 1)
    raw = bytearray(head + body)
    raw[9] = checksum(bytes(raw))
    return bytes(raw)


def _gas(port: int, width_bits: int = 8) -> bytes:
    """A Generic Address Structure naming an I/O port (byte access)."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, width_bits, 0, 1, port)


def madt(nr_vcpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_BASE, 0)       # no PCAT_COMPAT: no 8259 pair offered
    for i in range(nr_vcpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)
    return _table(b"APIC", 5, body)


def dsdt() -> bytes:
    # Name (_S5, Package (4) { 5, 5, 0, 0 }): NameOp, "_S5_", PackageOp, PkgLength 8,
    # NumElements 4, BytePrefix 5, BytePrefix 5, ZeroOp, ZeroOp
    aml = bytes([0x08]) + b"_S5_" + bytes([0x12, 0x08, 0x04, 0x0A, S5_SLP_TYP, 0x0A,
                                          S5_SLP_TYP, 0x00, 0x00])
    return _table(b"DSDT", 2, aml)


def fadt(dsdt_gpa: int, ports: AcpiPorts = PORTS) -> bytes:
    """FADT revision 6 (276 bytes): a hardware-reduced platform."""
    body = bytearray(276 - 36)

    def put(offset: int, fmt: str, *values: object) -> None:
        struct.pack_into(fmt, body, offset - 36, *values)

    put(36, "<II", 0, dsdt_gpa)                     # FIRMWARE_CTRL, DSDT
    put(109, "<H", IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT)   # no 8042 bit: absent
    put(112, "<I", FADT_WBINVD | FADT_PROC_C1 | FADT_RESET_REG_SUP | FADT_HW_REDUCED)
    put(116, "<12sB", _gas(ports.reset), RESET_VALUE)
    put(129, "<HB", 0, 1)                           # ARM boot arch, FADT minor version 1
    put(140, "<Q", dsdt_gpa)                        # X_DSDT
    put(244, "<12s12s", _gas(ports.sleep_control), _gas(ports.sleep_status))
    put(268, "<8s", b"XendLite")                    # hypervisor vendor identity
    return _table(b"FACP", 6, bytes(body))


def build(base: int, nr_vcpus: int, ports: AcpiPorts = PORTS) -> tuple[bytes, int]:
    """Every table laid out from guest-physical ``base``: (the bytes, the RSDP's address)."""
    if not 1 <= nr_vcpus <= 255:
        raise ValueError("the MADT's local APIC entries hold 1 to 255 vCPUs")
    parts: list[bytes] = []
    pos = base

    def place(blob: bytes) -> int:
        nonlocal pos
        at = pos
        parts.append(blob + bytes(-len(blob) % 16))
        pos += len(parts[-1])
        return at

    rsdp_at = pos
    pos += 48                                       # the RSDP (36 bytes), padded
    dsdt_at = place(dsdt())
    fadt_at = place(fadt(dsdt_at, ports))
    madt_at = place(madt(nr_vcpus))
    xsdt_at = place(_table(b"XSDT", 1, struct.pack("<QQ", fadt_at, madt_at)))
    first = struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 2, 0)
    first = first[:8] + bytes([checksum(first)]) + first[9:]
    rsdp = bytearray(first + struct.pack("<IQB3s", 36, xsdt_at, 0, b"\0\0\0"))
    rsdp[32] = checksum(bytes(rsdp))
    out = bytes(rsdp) + bytes(48 - len(rsdp)) + b"".join(parts)
    if len(out) > ACPI_SIZE:
        raise ValueError("the ACPI tables do not fit their page")
    return out, rsdp_at


def install(machine: Machine, ports: AcpiPorts = PORTS) -> int:
    """Lay the tables for the machine's vCPUs in their reserved page, serve the ports they
    name, and return the RSDP's address (kept in ``machine.acpi_rsdp`` for the loader).
    Again after a reset (which clears RAM): the page and the ports are set up once."""
    reserve(machine, ports)
    blob, rsdp = build(ACPI_GPA, len(machine.runners), ports)
    machine.mem.write(ACPI_GPA, blob.ljust(ACPI_SIZE, b"\0"))
    machine.acpi_rsdp = rsdp
    return rsdp


def reserve(machine: Machine, ports: AcpiPorts = PORTS) -> None:
    """Reserve the tables' page and serve their ports, once, without writing the tables:
    for RAM that holds them already (a restored guest's)."""
    mm = machine.memmap
    if not any(name == "acpi" for _g, _n, name in mm.reserved):
        mm.reserved.append((ACPI_GPA, ACPI_SIZE, "acpi"))
        machine.exits.register_io_out(ports.sleep_control,
                                      lambda r, ex: _sleep_control(machine, r, ex))
        machine.exits.register_io_out(ports.reset, lambda r, ex: _reset(machine, r, ex))
        machine.exits.register_io_in(ports.sleep_status,
                                     lambda _r, ex: bytes(ex.size * ex.count))


def _sleep_control(machine: Machine, runner: VcpuRunner, ex: exits.IoOut) -> None:
    value = ex.data[0]
    if value & SLP_EN and (value >> 2) & 7 == S5_SLP_TYP:
        machine.request_shutdown("poweroff", 0, f"vcpu{runner.index}: ACPI sleep to S5")


def _reset(machine: Machine, runner: VcpuRunner, ex: exits.IoOut) -> None:
    if ex.data[0] == RESET_VALUE:
        machine.request_shutdown("reboot", 0, f"vcpu{runner.index}: ACPI reset register")
