"""Which of the quirks (machine.quirks) this host has, found by running each instruction in a
tiny 64-bit guest with the quirk handling turned off: the guest either gets the CPU's result
from KVM itself, or KVM gives up with an emulation failure on exactly that instruction.

The guest is laid out by hand (no toolchain needed): identity-mapped 2 MiB page, a GDT with
a 64-bit code and a data segment, an IDT whose gate 3 leads to a handler that reports and
returns, and the probe's code, which reports on port ``REPORT`` when it gets past the
instruction and halts with interrupts off.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from xend_lite.kvm import Dtable, Kvm, KvmError, Regs, Segment, Sregs
from xend_lite.machine.machine import BootCpu, Machine
from xend_lite.machine.quirks import QUIRKS

REPORT = 0xF0
PML4, PDPT, PD, GDT, IDT, CODE, HANDLER, OPERAND, STACK = (
    0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000, 0x8000, 0x9000)
TAIL = bytes([0xB0, 0x02, 0xE6, REPORT, 0xF4])          # mov $2, %al; out %al, $REPORT; hlt
PROBES = {
    "int3-cpl0": (bytes([0xCC]) + TAIL, [1, 2]),          # the #BP handler reports 1 first
    "fwait": (bytes([0x9B]) + TAIL, [2]),
    "ldmxcsr": (bytes([0x0F, 0xAE, 0x14, 0x25]) + struct.pack("<I", OPERAND) + TAIL, [2]),
}
# Host limits: instructions this kind of host's KVM may not run for a guest, which xend-lite
# does not carry out itself (no exact, bounded emulation of them exists here). Probed so that
# --check names them; a guest stops with an internal error at the first one it runs.
LIMITS = {
    "sse-cpl0": ("SSE instructions at CPL 0 (pxor %xmm0, %xmm0)", bytes([0x66, 0x0F, 0xEF, 0xC0]) + TAIL),
}
HANDLER_CODE = bytes([0xB0, 0x01, 0xE6, REPORT, 0x48, 0xCF])   # mov $1, %al; out; iretq
MXCSR_VALUE = 0x1F80


@dataclass(frozen=True)
class ProbeResult:
    name: str
    applies: bool | None      # None: the probe could not tell
    detail: str


def _sregs() -> Sregs:
    s = Sregs()
    s.cs = Segment(base=0, limit=0xFFFFFFFF, selector=8, type=0xB, present=1, dpl=0, db=0, s=1,
                   l=1, g=1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=0x3, present=1,
                                 dpl=0, db=1, s=1, g=1))
    s.tr = Segment(base=0, limit=0x67, selector=0, type=0xB, present=1, s=0)
    s.ldt = Segment(base=0, limit=0xFFFF, selector=0, type=0x2, present=1, s=0, unusable=1)
    s.gdt, s.idt = Dtable(GDT, 23), Dtable(IDT, 4 * 16 - 1)
    s.cr0 = 0x80000033          # PG, NE, ET, MP, PE
    s.cr3, s.cr4, s.efer = PML4, 0x620, 0x500      # PAE, OSFXSR, OSXMMEXCPT; LME, LMA
    return s


def _lay_out(m: Machine, code: bytes) -> None:
    w = m.mem.write
    w(PML4, struct.pack("<Q", PDPT | 3))
    w(PDPT, struct.pack("<Q", PD | 3))
    w(PD, struct.pack("<Q", 0x83))                   # one 2 MiB page at 0
    w(GDT, struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
    gate = struct.pack("<HHBBHII", HANDLER & 0xFFFF, 8, 0, 0x8E, HANDLER >> 16, 0, 0)
    w(IDT + 3 * 16, gate)
    w(CODE, code)
    w(HANDLER, HANDLER_CODE)
    w(OPERAND, struct.pack("<I", MXCSR_VALUE))


def probe(kvm: Kvm, name: str, timeout: float = 5.0) -> ProbeResult:
    """Run the probe for quirk ``name`` in a machine of its own."""
    code, expect = PROBES[name]
    return _run(kvm, name, code, expect, QUIRKS[name].instruction, timeout)


def probe_limit(kvm: Kvm, name: str, timeout: float = 5.0) -> ProbeResult:
    """Run the probe for host limit ``name``: applies means this KVM cannot run it."""
    what, code = LIMITS[name]
    return _run(kvm, name, code, [2], what, timeout)


def _run(kvm: Kvm, name: str, code: bytes, expect: list[int], what: str,
         timeout: float) -> ProbeResult:
    m = Machine(kvm, 2 << 20, vcpus=1, irqchip=False, quirks=False)
    seen: list[int] = []
    try:
        m.exits.register_io_out(REPORT, lambda _r, ex: seen.append(ex.data[0]))
        _lay_out(m, code)
        m.set_boot_cpu(0, BootCpu(Regs(rip=CODE, rsp=STACK, rflags=2), _sregs()))
        m.start()
        status = m.wait(timeout)
    finally:
        m.close()
    if status is not None and status.reason == "halted" and seen == expect:
        return ProbeResult(name, False, f"this KVM runs {what} itself")
    if status is not None and status.reason == "internal-error" and not seen \
            and f"(bytes {code[0]:02x}" in status.detail:
        return ProbeResult(name, True, f"this KVM cannot emulate {what}")
    return ProbeResult(name, None, f"the {what} probe ended as {status!r} after reports {seen}")


def probe_all(kvm_path: str = "/dev/kvm", quiet: bool = False) -> list[ProbeResult]:
    """Every quirk's probe, then every host limit's; a host where no VM can be made gives
    no results. ``quiet`` keeps
    the probe machines' own log lines (a guest stopped ...) out of a one-shot report."""
    try:
        kvm = Kvm(kvm_path)
    except KvmError:
        return []
    machine_log = logging.getLogger("xend_lite.machine")
    was = machine_log.disabled
    machine_log.disabled = quiet or was
    try:
        return [probe(kvm, name) for name in PROBES] + [probe_limit(kvm, name) for name in LIMITS]
    finally:
        machine_log.disabled = was
        kvm.close()

