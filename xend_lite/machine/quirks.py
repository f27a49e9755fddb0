"""Instructions the host's KVM gives up on, recognised per exit and, where the result can be
exactly what the CPU would do, carried out here.

A KVM backend that runs the guest's privileged code through KVM's instruction emulator (a
nested, software one such as kvm-pvm) stops with KVM_EXIT_INTERNAL_ERROR, suberror
KVM_INTERNAL_ERROR_EMULATION, on instructions the emulator does not know; the exit carries
the instruction's bytes. Nothing here is assumed from the host's name: an exit is recognised
from its bytes and the vCPU's state, and handled only when every condition that would make
the CPU do something else (a fault, a single-step trap, another mode) is absent. Anything
else stays an internal error that ends the guest's run. ``quirkprobe`` finds out, with a
tiny guest, which of these a host has.

Handled:

- ``int3-cpl0``: int3 at CPL 0 in 64-bit mode. #BP is delivered through the guest's IDT the
  way the CPU delivers it (see :func:`deliver_bp`). Injecting it with KVM_SET_VCPU_EVENTS is
  not taken by such a backend, so the frame is built here.
- ``fwait``: with no unmasked x87 exception pending and not both CR0.MP and CR0.TS set, fwait
  does nothing: RIP steps over it.
- ``ldmxcsr``: the legacy-SSE ``ldmxcsr m32`` in 64-bit mode with SSE enabled (CR4.OSFXSR,
  not CR0.EM or CR0.TS): MXCSR is loaded from the operand, which is read through the
  vCPU's paging; a value with a bit outside MXCSR_MASK is where the CPU raises #GP.

Each is named in the log once per machine, the first time it is used.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import TYPE_CHECKING

from xend_lite.errors import GuestMemoryError
from xend_lite.kvm import KvmError, Regs, Segment, Sregs, exits
from xend_lite.machine.insn import Undecodable, decode_0f_mem
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

if TYPE_CHECKING:
    from xend_lite.kvm import Vcpu
    from xend_lite.machine.guestmem import GuestMemory
    from xend_lite.machine.vcpu import VcpuRunner

log = logging.getLogger("xend_lite.quirks")

PAGE = 4096
U64 = (1 << 64) - 1
CR0_MP, CR0_EM, CR0_TS, CR0_PG = 1 << 1, 1 << 2, 1 << 3, 1 << 31
CR4_OSFXSR = 1 << 9
EFER_LMA = 1 << 10
RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17
FSW_ES = 1 << 7                     # x87 status word: an unmasked exception is pending
BP_VECTOR = 3
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF
TSS64_IST1 = 0x24
INT3, FWAIT = 0xCC, 0x9B
LDMXCSR = b"\x0f\xae"


class Quirk(Frozen):
    __slots__ = ("name", "instruction", "handling")
    name: str
    instruction: str    # what the host cannot emulate
    handling: str       # what is done instead

    def __init__(self, name: str, instruction: str, handling: str):
        _set(self, "name", name)
        _set(self, "instruction", instruction)
        _set(self, "handling", handling)


QUIRKS = {q.name: q for q in (
    Quirk("int3-cpl0", "int3 at CPL 0", "#BP delivered through the guest's IDT"),
    Quirk("fwait", "fwait", "stepped over when no x87 exception is pending"),
    Quirk("ldmxcsr", "ldmxcsr", "MXCSR loaded from the operand"),
)}


class NotExact(Exception):
    """The CPU would do something other than the plain case here (a fault, another mode):
    the exit is left unhandled."""


class HostQuirks:
    """The machine's handler for emulation failures (the exit map's default path calls it)."""

    def __init__(self, mem: GuestMemory):
        self.mem = mem
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def handle(self, runner: VcpuRunner, ex: exits.InternalError) -> bool:
        """True when the exit was one of ours and the vCPU may run on."""
        if not ex.emulation_failure:
            return False
        v = runner.vcpu
        insn = ex.instruction_bytes()
        if not insn:
            return False
        try:
            if insn[0] == INT3:
                name = "int3-cpl0"
                deliver_bp(v, self.mem, v.synced_regs(), v.synced_sregs())
            elif insn[0] == FWAIT:
                name = "fwait"
                step_over_fwait(v, v.synced_regs(), v.synced_sregs())
            elif is_ldmxcsr(insn):
                name = "ldmxcsr"
                load_mxcsr(v, self.mem, insn, v.synced_regs(), v.synced_sregs())
            else:
                return False
        except NotExact as exc:
            log.warning("vcpu%d: %s at rip %#x left to fail: %s", runner.index,
                        QUIRKS[name].instruction, v.synced_rip(), exc)
            return False
        with self._lock:
            self.counts[name] += 1
            first = self.counts[name] == 1
        if first:
            q = QUIRKS[name]
            log.info("host quirk %s: this KVM cannot emulate %s (vcpu%d); %s, as the CPU does "
                     "(logged once)", q.name, q.instruction, runner.index, q.handling)
        return True


# -- the instructions --------------------------------------------------------------------

def step_over_fwait(v: Vcpu, regs: Regs, sregs: Sregs) -> None:
    """fwait with nothing to raise: the CPU only moves on."""
    if sregs.cr0 & CR0_MP and sregs.cr0 & CR0_TS:
        raise NotExact("CR0.MP and CR0.TS are set: the CPU raises #NM")
    if regs.rflags & RFLAGS_TF:
        raise NotExact("single-stepping: the CPU raises #DB after it")
    try:
        fsw, _mxcsr = v.fpu_status()
    except KvmError as exc:
        raise NotExact(f"cannot read the x87 state: {exc}") from None
    if fsw & FSW_ES:
        raise NotExact("an unmasked x87 exception is pending: the CPU raises #MF")
    regs.rip = _next_ip(regs.rip, 1, sregs)
    regs.rflags &= ~RFLAGS_RF
    v.set_synced_regs(regs)


def is_ldmxcsr(insn: bytes) -> bool:
    """0F AE /2 with a memory operand, after any prefixes and REX (checked in full later)."""
    try:
        op = decode_0f_mem(insn, Regs(), 0)
    except Undecodable:
        return False
    return op.opcode == LDMXCSR and op.reg == 2


def load_mxcsr(v: Vcpu, mem: GuestMemory, insn: bytes, regs: Regs, sregs: Sregs) -> None:
    """ldmxcsr m32, as the CPU runs it in 64-bit mode."""
    if not (sregs.efer & EFER_LMA and sregs.cs.l):
        raise NotExact("not in 64-bit mode")
    try:
        op = decode_0f_mem(insn, regs, regs.rip)
    except Undecodable as exc:
        raise NotExact(str(exc)) from None
    if set(op.prefixes) & {0xF0, 0xF2, 0xF3, 0x66}:
        raise NotExact("a lock, rep or operand-size prefix: another instruction, or #UD")
    if sregs.cr0 & CR0_EM or not sregs.cr4 & CR4_OSFXSR:
        raise NotExact("SSE is off (CR0.EM set or CR4.OSFXSR clear): the CPU raises #UD")
    if sregs.cr0 & CR0_TS:
        raise NotExact("CR0.TS is set: the CPU raises #NM")
    if regs.rflags & RFLAGS_TF:
        raise NotExact("single-stepping")
    base = {"fs": sregs.fs.base, "gs": sregs.gs.base}.get(op.segment or "", 0)
    addr = (base + op.address) & U64
    value = int.from_bytes(Linear(v, mem, sregs).read(addr, 4), "little")
    try:
        if value & ~v.mxcsr_mask() & 0xFFFFFFFF:
            raise NotExact(f"MXCSR value {value:#x} sets reserved bits: the CPU raises #GP")
        v.set_mxcsr(value)
    except KvmError as exc:
        raise NotExact(f"cannot load MXCSR: {exc}") from None
    regs.rip = (regs.rip + op.length) & U64
    regs.rflags &= ~RFLAGS_RF
    v.set_synced_regs(regs)


def _next_ip(rip: int, n: int, sregs: Sregs) -> int:
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return (rip + n) & U64
    if sregs.cs.db:
        return (rip + n) & 0xFFFFFFFF
    raise NotExact("16-bit code")


def deliver_bp(v: Vcpu, mem: GuestMemory, regs: Regs, sregs: Sregs) -> None:
    """Deliver the #BP of an int3 at CPL 0 in 64-bit mode, as the CPU does (Intel SDM vol. 3,
    6.14): the IDT's gate 3 (an interrupt or trap gate, present), its code segment (a
    present 64-bit code segment at DPL 0); the stack: the gate's IST entry from the 64-bit
    TSS if it names one, else the current RSP, aligned down to 16 bytes; the frame SS, RSP,
    RFLAGS, CS, RIP (after the int3); then TF, NT, RF (and IF for an interrupt gate) cleared
    and CS:RIP from the gate. SS stays (no privilege change). Every guest access goes
    through the vCPU's paging; a case where the CPU would fault instead is NotExact."""
    if not (sregs.efer & EFER_LMA and sregs.cs.l):
        raise NotExact("not in 64-bit mode")
    if sregs.cs.selector & 3 or sregs.cs.dpl:
        raise NotExact("not at CPL 0")
    if regs.rflags & RFLAGS_TF:
        raise NotExact("single-stepping")
    lin = Linear(v, mem, sregs)
    if BP_VECTOR * 16 + 15 > sregs.idt.limit:
        raise NotExact("the IDT is too short for vector 3: the CPU raises #GP")
    gate = lin.read(sregs.idt.base + BP_VECTOR * 16, 16)
    attr = gate[5]
    kind, present = attr & 0xF, attr >> 7
    if not present:
        raise NotExact("gate 3 is not present: the CPU raises #NP")
    if kind not in (GATE_INTERRUPT, GATE_TRAP):
        raise NotExact(f"gate 3 has type {kind:#x}: the CPU raises #GP")
    target = (int.from_bytes(gate[0:2], "little") | int.from_bytes(gate[6:8], "little") << 16
              | int.from_bytes(gate[8:12], "little") << 32)
    selector = int.from_bytes(gate[2:4], "little")
    ist = gate[4] & 7
    cs = code_segment(lin, sregs, selector)
    if ist:
        if not sregs.tr.present or sregs.tr.limit < TSS64_IST1 + 8 * ist - 1:
            raise NotExact("no 64-bit TSS holds the gate's IST entry")
        rsp = int.from_bytes(lin.read(sregs.tr.base + TSS64_IST1 + 8 * (ist - 1), 8), "little")
    else:
        rsp = regs.rsp
    rsp &= ~0xF
    frame = b"".join(x.to_bytes(8, "little") for x in (
        (regs.rip + 1) & U64, sregs.cs.selector, regs.rflags, regs.rsp, sregs.ss.selector))
    new_rsp = (rsp - len(frame)) & U64
    lin.write(new_rsp, frame)
    regs.rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if kind == GATE_INTERRUPT:
        regs.rflags &= ~RFLAGS_IF
    regs.rsp, regs.rip = new_rsp, target
    v.set_synced_regs(regs)
    if cs != sregs.cs:
        sregs.cs = cs
        v.set_synced_sregs(sregs)


def code_segment(lin: Linear, sregs: Sregs, selector: int) -> Segment:
    """The descriptor cache CS gets from ``selector``: a present 64-bit code segment at DPL 0
    in the GDT."""
    if selector & 4 or selector < 8:
        raise NotExact(f"gate selector {selector:#x} is null or in the LDT")
    index = selector & ~7
    if index + 7 > sregs.gdt.limit:
        raise NotExact(f"gate selector {selector:#x} is past the GDT: the CPU raises #GP")
    d = int.from_bytes(lin.read(sregs.gdt.base + index, 8), "little")
    typ, s, dpl, p = (d >> 40) & 0xF, (d >> 44) & 1, (d >> 45) & 3, (d >> 47) & 1
    l, db, g, avl = (d >> 53) & 1, (d >> 54) & 1, (d >> 55) & 1, (d >> 52) & 1
    if not (s and typ & 8 and p and l and not db and dpl == 0):
        raise NotExact(f"gate selector {selector:#x} is not a present 64-bit code segment "
                       "at DPL 0")
    limit = (d & 0xFFFF) | ((d >> 48) & 0xF) << 16
    if g:
        limit = limit << 12 | 0xFFF
    base = ((d >> 16) & 0xFFFFFF) | ((d >> 56) & 0xFF) << 24
    # the CPU marks the segment accessed as it loads it; the cache shows it so
    return Segment(base=base, limit=limit, selector=selector & ~3, type=typ | 1, present=1,
                   dpl=0, db=0, s=1, l=1, g=g, avl=avl, unusable=0)


class Linear:
    """Guest-linear memory through one vCPU's current paging (KVM_TRANSLATE), as the CPU
    accesses it at CPL 0: a page that is not mapped (or not writable, for a write) is where
    the CPU would fault, so it is NotExact."""

    def __init__(self, v: Vcpu, mem: GuestMemory, sregs: Sregs):
        self.v = v
        self.mem = mem
        self.paging = bool(sregs.cr0 & CR0_PG)

    def _pages(self, addr: int, n: int, write: bool):
        if (addr >> 47) not in (0, 0x1FFFF) or ((addr + n - 1) >> 47) not in (0, 0x1FFFF):
            raise NotExact(f"non-canonical address {addr:#x}")
        pos, end = addr, addr + n
        while pos < end:
            page = pos & ~(PAGE - 1)
            k = min(end, page + PAGE) - pos
            gpa = page
            if self.paging:
                try:
                    t = self.v.translate(page)
                except KvmError as exc:
                    raise NotExact(f"cannot translate {page:#x}: {exc}") from None
                if not t.valid or (write and not t.writeable):
                    raise NotExact(f"{page:#x} is not mapped{' writable' if write else ''}: "
                                   "the CPU raises #PF")
                gpa = t.physical_address & ~(PAGE - 1)
            yield gpa + pos - page, k
            pos += k

    def read(self, addr: int, n: int) -> bytes:
        try:
            return b"".join(self.mem.read(gpa, k) for gpa, k in self._pages(addr, n, False))
        except GuestMemoryError as exc:
            raise NotExact(str(exc)) from None

    def write(self, addr: int, data: bytes) -> None:
        pieces = list(self._pages(addr, len(data), True))   # all checked before any write
        if not all(self.mem.is_backed(gpa, k) for gpa, k in pieces):
            raise NotExact(f"the frame at {addr:#x} is not in guest RAM")
        pos = 0
        for gpa, k in pieces:
            self.mem.write(gpa, data[pos:pos + k])
            pos += k
