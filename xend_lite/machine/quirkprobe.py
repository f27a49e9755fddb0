"""Which of the quirks (machine.quirks) this host has, found by running each instruction in a
tiny 64-bit guest with the quirk handling turned off: the guest either gets the CPU's result
from KVM itself, or KVM gives up with an emulation failure on exactly that instruction.

The guest is laid out by hand (no toolchain needed): identity-mapped 2 MiB page open to
both rings, a GDT with 64-bit code and data segments for ring 0 and ring 3, an IDT whose gate
3 leads to a handler that reports and returns, and the probe's code, which reports on port
``REPORT`` when it gets past the instruction and halts with interrupts off. A probe of ring 3
(a host limit with ``user`` code) has its ring-0 code enter ring 3 with IOPL 3, so that the
user code may report too.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from xend_lite.kvm import Dtable, Kvm, KvmError, Regs, Segment, Sregs
from xend_lite.machine.machine import BootCpu, Machine
from xend_lite.machine.quirks import QUIRKS

T = TypeVar("T")
REPORT = 0xF0
PML4, PDPT, PD, GDT, IDT, CODE, HANDLER, OPERAND, STACK = (
    0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000, 0x8000, 0x9000)
USER, USER_STACK, SYSCALL_ENTRY = 0xA000, 0xB000, 0xC000
KERNEL_CS, USER_DS, USER_CS = 0x08, 0x18 | 3, 0x20 | 3
MSR_STAR, MSR_LSTAR = 0xC0000081, 0xC0000082
TAIL = bytes([0xB0, 0x02, 0xE6, REPORT, 0xF4])          # mov $2, %al; out %al, $REPORT; hlt
PROBES = {
    "int3-cpl0": (bytes([0xCC]) + TAIL, [1, 2]),          # the #BP handler reports 1 first
    "fwait": (bytes([0x9B]) + TAIL, [2]),
    "ldmxcsr": (bytes([0x0F, 0xAE, 0x14, 0x25]) + struct.pack("<I", OPERAND) + TAIL, [2]),
}
# Host limits: instructions this kind of host's KVM may not run for a guest, which xend-lite
# does not carry out itself (no exact, bounded emulation of them exists here). Probed so that
# --check names them; a guest stops with an internal error at the first one it runs.
class Limit(NamedTuple):
    what: str
    code: bytes                 # ring-0 code; reports 2 (runs) or stops on the instruction
    user: bytes = b""           # ring-3 code the ring-0 code enters, if any
    stop_report: int = -1       # a report that says the instruction went wrong, if any
    effect: str = "a guest stops at the first one"


def _wrmsr(index: int, value: int) -> bytes:
    return (b"\xB9" + struct.pack("<I", index) + b"\xB8" + struct.pack("<I", value & 0xFFFFFFFF)
            + b"\xBA" + struct.pack("<I", value >> 32) + b"\x0F\x30")


def _enter_ring3(rip: int, rsp: int) -> bytes:
    """push the iretq frame (SS, RSP, RFLAGS with IOPL 3, CS, RIP) and iretq"""
    return (bytes([0x6A, USER_DS, 0x68]) + struct.pack("<I", rsp) + b"\x68" + struct.pack("<I", 0x3002)
            + bytes([0x6A, USER_CS, 0x68]) + struct.pack("<I", rip) + b"\x48\xCF")


# The SYSCALL entry: in ring 0 (CS is STAR's kernel selector) it reports 2 and halts; still in
# ring 3 it reports 3 and stops (mov %cs, %eax; cmp $KERNEL_CS, %eax; jne 1f; TAIL; 1: report 3; ud2).
SYSCALL_ENTRY_CODE = (bytes([0x8C, 0xC8, 0x83, 0xF8, KERNEL_CS, 0x75, len(TAIL)]) + TAIL
                      + bytes([0xB0, 0x03, 0xE6, REPORT, 0x0F, 0x0B]))

LIMITS = {
    "sse-cpl0": Limit("SSE instructions at CPL 0 (pxor %xmm0, %xmm0)", bytes([0x66, 0x0F, 0xEF, 0xC0]) + TAIL),
    # SYSCALL from ring 3 must enter ring 0 at LSTAR with STAR's CS; a host that leaves the
    # guest in ring 3 there gives a guest no system calls (Linux's processes die on the first)
    "syscall-cpl3": Limit("SYSCALL from CPL 3 into CPL 0",
                          _wrmsr(MSR_STAR, KERNEL_CS << 32) + _wrmsr(MSR_LSTAR, SYSCALL_ENTRY)
                          + _enter_ring3(USER, USER_STACK),
                          user=b"\x0F\x05", stop_report=3,
                          effect="a guest's processes make no system call (Linux's init dies on "
                                 "its first)"),
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
    s.gdt, s.idt = Dtable(GDT, 5 * 8 - 1), Dtable(IDT, 4 * 16 - 1)
    s.cr0 = 0x80000033          # PG, NE, ET, MP, PE
    s.cr3, s.cr4, s.efer = PML4, 0x620, 0x501      # PAE, OSFXSR, OSXMMEXCPT; SCE, LME, LMA
    return s


def _lay_out(m: Machine, code: bytes, user: bytes = b"") -> None:
    w = m.mem.write
    w(PML4, struct.pack("<Q", PDPT | 7))
    w(PDPT, struct.pack("<Q", PD | 7))
    w(PD, struct.pack("<Q", 0x87))                   # one 2 MiB page at 0, user-accessible
    w(GDT, struct.pack("<5Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF,   # ring 0 code, data
                       0x00CFF2000000FFFF, 0x00AFFA000000FFFF))            # ring 3 data, code
    gate = struct.pack("<HHBBHII", HANDLER & 0xFFFF, 8, 0, 0x8E, HANDLER >> 16, 0, 0)
    w(IDT + 3 * 16, gate)
    w(CODE, code)
    w(HANDLER, HANDLER_CODE)
    w(OPERAND, struct.pack("<I", MXCSR_VALUE))
    w(USER, user)
    w(SYSCALL_ENTRY, SYSCALL_ENTRY_CODE)


def probe(kvm: Kvm, name: str, timeout: float = 5.0) -> ProbeResult:
    """Run the probe for quirk ``name`` in a machine of its own."""
    code, expect = PROBES[name]
    return _run(kvm, name, code, expect, QUIRKS[name].instruction, timeout)


def probe_limit(kvm: Kvm, name: str, timeout: float = 5.0) -> ProbeResult:
    """Run the probe for host limit ``name``: applies means this KVM cannot run it."""
    lim = LIMITS[name]
    return _run(kvm, name, lim.code, [2], lim.what, timeout, lim.user, lim.stop_report)


@contextmanager
def _started(kvm: Kvm, code: bytes, user: bytes, on_report: Callable[[int], object]) -> Iterator[Machine]:
    """A probe machine running ``code`` in ring 0 (and ``user`` in ring 3, if its code goes
    there), each value reported on REPORT given to ``on_report``; closed on leaving."""
    m = Machine(kvm, 2 << 20, vcpus=1, irqchip=False, quirks=False)
    try:
        m.exits.register_io_out(REPORT, lambda _r, ex: on_report(ex.data[0]))
        _lay_out(m, code, user)
        m.set_boot_cpu(0, BootCpu(Regs(rip=CODE, rsp=STACK, rflags=2), _sregs()))
        m.start()
        yield m
    finally:
        m.close()


def _run(kvm: Kvm, name: str, code: bytes, expect: list[int], what: str,
         timeout: float, user: bytes = b"", stop_report: int = -1) -> ProbeResult:
    seen: list[int] = []
    with _started(kvm, code, user, seen.append) as m:
        status = m.wait(timeout)
    if status is not None and status.reason == "halted" and seen == expect:
        return ProbeResult(name, False, f"this KVM runs {what} itself")
    if status is not None and status.reason == "internal-error" and not seen \
            and f"(bytes {(user or code)[0]:02x}" in status.detail:
        return ProbeResult(name, True, f"this KVM cannot emulate {what}")
    if seen == [stop_report]:
        return ProbeResult(name, True, f"this KVM does not carry out {what}")
    return ProbeResult(name, None, f"the {what} probe ended as {status!r} after reports {seen}")


def probe_all(kvm_path: str = "/dev/kvm", quiet: bool = False) -> list[ProbeResult]:
    """Every quirk's probe, then every host limit's; a host where no VM can be made gives
    no results. ``quiet`` keeps
    the probe machines' own log lines (a guest stopped ...) out of a one-shot report."""
    return _with_kvm(kvm_path, quiet, [], lambda kvm: [probe(kvm, name) for name in PROBES]
                     + [probe_limit(kvm, name) for name in LIMITS])


def ring_speeds(kvm_path: str = "/dev/kvm", quiet: bool = False) -> dict[int, float | None]:
    """ring_speed for ring 0 and ring 3 (empty where no VM can be made); ``quiet`` as in
    probe_all."""
    return _with_kvm(kvm_path, quiet, {}, lambda kvm: {ring: ring_speed(kvm, ring) for ring in (0, 3)})


def _with_kvm(kvm_path: str, quiet: bool, none: T, run: Callable[[Kvm], T]) -> T:
    """``run`` with the KVM device open (``none`` if it cannot be), the probe machines' log
    lines kept out when ``quiet``."""
    try:
        kvm = Kvm(kvm_path)
    except KvmError:
        return none
    machine_log = logging.getLogger("xend_lite.machine")
    was = machine_log.disabled
    machine_log.disabled = quiet or was
    try:
        return run(kvm)
    finally:
        machine_log.disabled = was
        kvm.close()


#: iterations of the timed loop in each ring: enough for ~50 ms where ring 0 is emulated
SPEED_LOOPS = {0: 100_000, 3: 10_000_000}


def ring_speed(kvm: Kvm, ring: int, timeout: float = 10.0) -> float | None:
    """Nanoseconds per iteration of a two-instruction loop (dec %rcx; jnz) that the guest
    runs at CPL ``ring`` (0 or 3), timed between the reports before and after it, so the
    machine's start is not counted; None if the loop did not finish."""
    import time

    n = SPEED_LOOPS[ring]
    report = bytes([0xB0, 0x01, 0xE6, REPORT])                    # mov $1, %al; out %al, $REPORT
    loop = report + b"\x48\xB9" + struct.pack("<Q", n) + b"\x48\xFF\xC9\x75\xFB" + report \
        + b"\xEB\xFE"                                              # movabs n, %rcx; 1: dec; jnz 1b; jmp .
    stamps: list[float] = []
    code, user = (loop, b"") if ring == 0 else (_enter_ring3(USER, USER_STACK), loop)
    with _started(kvm, code, user, lambda _v: stamps.append(time.perf_counter())) as m:
        deadline = time.monotonic() + timeout
        while len(stamps) < 2 and m.status is None and time.monotonic() < deadline:
            time.sleep(0.002)
    if len(stamps) < 2:
        return None
    return (stamps[1] - stamps[0]) / n * 1e9
