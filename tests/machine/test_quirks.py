"""Host quirks: instructions a software KVM gives up on, carried out by the machine exactly as
the CPU would (xend_lite/machine/quirks.py), with tests/machine/guests/quirks64.S.

Each real-guest test checks the guest's view (the #BP frame, MXCSR, getting past fwait)
whoever carried the instruction out, then skips with the reason where the host's KVM did it
itself (the quirk was not used). The refusals are checked with a fake vCPU: a case where the
CPU faults must stay an internal error."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from xend_lite.kvm import Dtable, Kvm, Regs, Segment, Sregs, Translation, exits
from xend_lite.machine import quirkprobe
from xend_lite.machine.insn import Undecodable, decode_0f_mem
from xend_lite.machine.loader import load_image
from xend_lite.machine.quirkprobe import probe_all
from xend_lite.machine.quirks import HostQuirks, NotExact, deliver_bp, load_mxcsr, step_over_fwait

MiB = 1 << 20
RESULT = 0x300000
INT3_RSP = 0x2FFFF8
IST_TOP = 0x280000
RFLAGS_IF, RFLAGS_TF = 1 << 9, 1 << 8


def run_quirks_guest(make_machine, guests, **defines):
    m = make_machine(8 * MiB)
    reports: list[int] = []

    def report(_r, ex):
        reports.append(ex.data[0])
        if ex.data[0] in (4, 5):
            reports.append(("mxcsr", m.runners[0].vcpu.fpu_status()[1]))

    m.exits.register_io_out(0xF0, report)
    load_image(m, guests.image("quirks64.S", defines=defines))
    m.start()
    status = m.wait(20)
    return m, reports, status


def skip_if_host_did_it(m, name: str) -> None:
    if m.quirks.counts[name] == 0:
        pytest.skip(f"this host's KVM carries out {name} itself: the quirk was not needed")


@pytest.mark.kvm
@pytest.mark.parametrize("gate,ist", [(0x8E, 1), (0x8F, 0)], ids=["interrupt-gate-ist1",
                                                                  "trap-gate-no-ist"])
def test_int3_at_cpl0_delivers_bp_through_the_idt(make_machine, guests, gate, ist):
    defines = {"INT3": 1, "GATE": gate, "IST": ist}
    m, reports, status = run_quirks_guest(make_machine, guests, **defines)
    assert reports == [1, 2, 0xFF], (reports, status)
    assert status.reason == "halted"
    raw = m.mem.read(RESULT, 72)
    handler_rsp, rip, cs, rflags, old_rsp, ss, handler_rflags, _, after_rsp = \
        struct.unpack("<9Q", raw)
    stack_top = IST_TOP if ist else INT3_RSP & ~0xF
    assert handler_rsp == stack_top - 40                   # 16-byte aligned, 5 quadwords
    assert old_rsp == INT3_RSP and after_rsp == INT3_RSP   # iretq went back to it
    assert cs == 0x08 and ss == 0x10
    assert rflags & RFLAGS_IF                              # IF was set at the int3
    assert bool(handler_rflags & RFLAGS_IF) == (gate == 0x8F)   # an interrupt gate clears it
    code = guests.path("quirks64.S", defines=defines).read_bytes()
    assert code.count(b"\xfb\xcc\xfa") == 1                # sti; int3; cli
    # the saved RIP is the cli right after the int3
    assert m.mem.read(rip - 1, 2) == b"\xcc\xfa"
    skip_if_host_did_it(m, "int3-cpl0")


@pytest.mark.kvm
def test_fwait_with_nothing_pending_moves_on(make_machine, guests):
    m, reports, status = run_quirks_guest(make_machine, guests, FWAIT=1)
    assert reports == [3, 0xFF] and status.reason == "halted", (reports, status)
    skip_if_host_did_it(m, "fwait")


@pytest.mark.kvm
def test_ldmxcsr_loads_the_operand(make_machine, guests):
    m, reports, status = run_quirks_guest(make_machine, guests, LDMXCSR=1, MXCSR1=0x3F80,
                                          MXCSR2=0x1F80 | 0x6000)
    assert reports == [4, ("mxcsr", 0x3F80), 5, ("mxcsr", 0x7F80), 0xFF], (reports, status)
    skip_if_host_did_it(m, "ldmxcsr")


@pytest.mark.kvm
def test_an_unknown_instruction_still_ends_the_run_named(make_machine, guests):
    """movd at CPL 0 is no quirk: where the host cannot run it, the run ends as an internal
    error naming the bytes (and nothing is pretended)."""
    probes = {r.name: r.applies for r in probe_all()}
    if not probes.get("sse-cpl0"):
        pytest.skip("this host runs SSE at CPL 0 itself")
    m = make_machine(8 * MiB)
    load_image(m, guests.image("quirks64.S", defines={"LDMXCSR": 1, "MXCSR1": 0x1F80,
                                                      "MXCSR2": 0x1F80}))
    # replace the first report after ldmxcsr with movd %ecx, %xmm1 (66 0f 6e c9)
    code = bytearray(m.mem.read(0x100000, 0x1000))
    at = code.index(b"\xb0\x04\xe6\xf0")
    m.mem.write(0x100000 + at, b"\x66\x0f\x6e\xc9")
    m.start()
    status = m.wait(20)
    assert status.reason == "internal-error" and "66 0f 6e c9" in status.detail


@pytest.mark.kvm
def test_probe_agrees_with_the_handling():
    """The probe finds each quirk with the handling off; on a host without it, says so."""
    results = probe_all()
    assert {r.name for r in results} == {"int3-cpl0", "fwait", "ldmxcsr", "sse-cpl0",
                                         "syscall-cpl3"}
    for r in results:
        assert r.applies is not None, r.detail


@pytest.mark.kvm
def test_a_limit_probe_tells_a_runnable_instruction_from_one_that_stops():
    """The host-limit probe is no constant: an instruction every KVM runs (nop) is found
    runnable (the SSE one is checked against a real guest's run above)."""
    kvm = Kvm()
    try:
        quirkprobe.LIMITS["nop"] = quirkprobe.Limit("nop", b"\x90" + quirkprobe.TAIL)
        assert quirkprobe.probe_limit(kvm, "nop").applies is False
    finally:
        del quirkprobe.LIMITS["nop"]
        kvm.close()


# -- refusals, with a fake vCPU ----------------------------------------------------------

@dataclass
class FakeVcpu:
    fsw: int = 0
    mxcsr: int = 0x1F80
    mask: int = 0xFFFF
    regs: Regs | None = None
    sregs: Sregs | None = None
    mapped: dict[int, tuple[int, bool]] = field(default_factory=dict)   # page -> (gpa, writable)

    def fpu_status(self):
        return self.fsw, self.mxcsr

    def mxcsr_mask(self):
        return self.mask

    def set_mxcsr(self, v):
        self.mxcsr = v

    def set_synced_regs(self, regs):
        self.regs = regs

    def set_synced_sregs(self, sregs):
        self.sregs = sregs

    def translate(self, page):
        gpa, w = self.mapped.get(page, (0, False))
        return Translation(gpa, page in self.mapped, w, False)


class FakeMem:
    def __init__(self, size=1 << 20):
        self.data = bytearray(size)

    def read(self, gpa, n):
        return bytes(self.data[gpa:gpa + n])

    def write(self, gpa, data):
        self.data[gpa:gpa + len(data)] = data

    def is_backed(self, gpa, n):
        return gpa + n <= len(self.data)


def long_mode_sregs(cr0=0x80000033) -> Sregs:
    s = Sregs()
    s.cs = Segment(selector=8, type=0xB, present=1, s=1, l=1, g=1, limit=0xFFFFFFFF)
    s.ss = Segment(selector=0x10, type=3, present=1, s=1, db=1, g=1, limit=0xFFFFFFFF)
    s.tr = Segment(base=0x9000, limit=0x67, type=0xB, present=1, s=0)
    s.gdt, s.idt = Dtable(0x4000, 23), Dtable(0x5000, 4 * 16 - 1)
    s.cr0, s.cr4, s.efer = cr0, 0x620, 0x500
    return s


def identity(v: FakeVcpu, *pages: int, writable: bool = True) -> None:
    for p in pages:
        v.mapped[p] = (p, writable)


def bp_setup(gate_attr=0x8E, ist=0, stack_writable=True):
    mem, v = FakeMem(), FakeVcpu()
    mem.write(0x4000, struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
    mem.write(0x5000 + 48, struct.pack("<HHBBHII", 0x7000, 8, ist, gate_attr, 0, 0, 0))
    mem.write(0x9000 + 0x24, struct.pack("<Q", 0x8000))
    identity(v, 0x4000, 0x5000, 0x9000)
    identity(v, 0x7000, 0x8000 - 0x1000, writable=stack_writable)
    return mem, v, Regs(rip=0x6000, rsp=0x7F08, rflags=0x202), long_mode_sregs()


def test_bp_frame_built_by_hand():
    mem, v, regs, sregs = bp_setup(ist=1)
    deliver_bp(v, mem, regs, sregs)
    assert v.regs.rip == 0x7000 and v.regs.rsp == 0x8000 - 40
    assert struct.unpack("<5Q", mem.read(0x8000 - 40, 40)) == (0x6001, 8, 0x202, 0x7F08, 0x10)
    assert not v.regs.rflags & RFLAGS_IF


@pytest.mark.parametrize("change,why", [
    (lambda m, v, r, s: setattr(s, "idt", Dtable(0x5000, 47)), "too short"),
    (lambda m, v, r, s: m.write(0x5000 + 53, b"\x0e"), "not present"),
    (lambda m, v, r, s: m.write(0x5000 + 53, b"\x85"), "type"),
    (lambda m, v, r, s: setattr(r, "rflags", 0x302), "single-stepping"),
    (lambda m, v, r, s: setattr(s.cs, "selector", 0x23), "CPL 0"),
    (lambda m, v, r, s: m.write(0x5000 + 50, b"\x10\x00"), "64-bit code segment"),
    (lambda m, v, r, s: v.mapped.pop(0x7000), "not mapped"),
    (lambda m, v, r, s: v.mapped.__setitem__(0x7000, (0x7000, False)), "writable"),
])
def test_bp_cases_where_the_cpu_faults_are_refused(change, why):
    mem, v, regs, sregs = bp_setup()
    change(mem, v, regs, sregs)
    before = mem.read(0, len(mem.data))
    with pytest.raises(NotExact, match=why):
        deliver_bp(v, mem, regs, sregs)
    assert v.regs is None and mem.read(0, len(mem.data)) == before   # nothing changed


@pytest.mark.parametrize("fsw,cr0,why", [
    (0x80, 0x80000033, "#MF"),          # an unmasked exception pending
    (0, 0x8000003B, "#NM"),              # CR0.MP and CR0.TS
])
def test_fwait_that_would_fault_is_refused(fsw, cr0, why):
    v = FakeVcpu(fsw=fsw)
    with pytest.raises(NotExact, match=why):
        step_over_fwait(v, Regs(rip=0x6000), long_mode_sregs(cr0))
    assert v.regs is None


def test_fwait_steps_over():
    v = FakeVcpu()
    step_over_fwait(v, Regs(rip=0x6000), long_mode_sregs(0x80000039))   # TS without MP
    assert v.regs.rip == 0x6001


@pytest.mark.parametrize("insn,value,cr0,why", [
    (b"\x0f\xae\x15\x00\x00\x00\x00", 0x10000, 0x80000033, "#GP"),    # a reserved bit
    (b"\x0f\xae\x15\x00\x00\x00\x00", 0x1F80, 0x8000003B, "#NM"),     # CR0.TS
    (b"\xf3\x0f\xae\x15\x00\x00\x00\x00", 0x1F80, 0x80000033, "prefix"),
])
def test_ldmxcsr_that_would_fault_is_refused(insn, value, cr0, why):
    mem, v = FakeMem(), FakeVcpu()
    identity(v, 0x6000)
    mem.write(0x6000 + len(insn), struct.pack("<I", value))
    with pytest.raises(NotExact, match=why):
        load_mxcsr(v, mem, insn, Regs(rip=0x6000), long_mode_sregs(cr0))
    assert v.mxcsr == 0x1F80 and v.regs is None


def test_decoder_forms():
    regs = Regs(rsp=0x7000, rax=0x10, rbx=0x100, r12=0x1000, r9=0x20, rip=0x5000)
    assert decode_0f_mem(bytes.fromhex("0fae542404"), regs, 0x5000).address == 0x7004
    op = decode_0f_mem(bytes.fromhex("0fae15f0ffffff"), regs, 0x5000)     # rip-relative
    assert (op.address, op.length) == (0x5000 + 7 - 0x10, 7)
    op = decode_0f_mem(bytes.fromhex("4a0fae54c308"), regs, 0x5000)       # base rbx, index r8
    assert op.address == 0x100 + 8
    op = decode_0f_mem(bytes.fromhex("650fae1425e8030000"), regs, 0)      # gs:, absolute
    assert (op.segment, op.address, op.length) == ("gs", 0x3E8, 9)
    op = decode_0f_mem(bytes.fromhex("410fae1424"), regs, 0)              # base r12
    assert op.address == 0x1000
    with pytest.raises(Undecodable):
        decode_0f_mem(bytes.fromhex("0faed0"), regs, 0)                   # a register form


def test_other_emulation_failures_are_left_alone():
    q = HostQuirks(FakeMem())

    class Runner:
        index = 0
        vcpu = FakeVcpu()

    assert not q.handle(Runner(), exits.InternalError(1, (1, 0x0F00000000000000 | 0x66 << 8 | 2, 0)))
    assert not q.handle(Runner(), exits.InternalError(3, ()))
    assert not q.counts


@pytest.mark.kvm
def test_the_syscall_probe_tells_ring_0_from_ring_3_at_its_entry():
    """The SYSCALL limit is judged by the CS its entry code finds: the same entry reached by
    SYSCALL from ring 0, which every KVM carries out, is found in ring 0 (runnable); from
    ring 3 the probe says what this host does, and never cannot tell."""
    kvm = Kvm()
    try:
        from_ring0 = quirkprobe._wrmsr(quirkprobe.MSR_STAR, quirkprobe.KERNEL_CS << 32) \
            + quirkprobe._wrmsr(quirkprobe.MSR_LSTAR, quirkprobe.SYSCALL_ENTRY) + b"\x0f\x05"
        quirkprobe.LIMITS["syscall-cpl0"] = quirkprobe.Limit("SYSCALL from CPL 0", from_ring0,
                                                             stop_report=3)
        assert quirkprobe.probe_limit(kvm, "syscall-cpl0").applies is False
        assert quirkprobe.probe_limit(kvm, "syscall-cpl3").applies is not None
    finally:
        del quirkprobe.LIMITS["syscall-cpl0"]
        kvm.close()


@pytest.mark.kvm
def test_guest_speed_is_timed_in_each_ring():
    """--check's speed line times a real loop in each ring: ten times the iterations give about
    the same time per iteration (a measurement, not a constant), and the line compares the two
    rings only from the figures measured."""
    from xend_lite.machine.hostcheck import HostReport

    kvm = Kvm()
    try:
        speed = {ring: quirkprobe.ring_speed(kvm, ring) for ring in (0, 3)}
        assert all(v is not None and v > 0 for v in speed.values()), speed
        quirkprobe.SPEED_LOOPS[3] *= 10
        longer = quirkprobe.ring_speed(kvm, 3)
    finally:
        quirkprobe.SPEED_LOOPS[3] //= 10
        kvm.close()
    assert longer is not None and speed[3] / 5 < longer < speed[3] * 5, (speed, longer)
    line = HostReport("/dev/kvm", ok=True, speed={0: 500.0, 3: 0.5}).speed_line()
    assert "500.0 ns" in line and "1000x slower" in line
    assert "slower" not in HostReport("/dev/kvm", ok=True, speed={0: 0.5, 3: 0.5}).speed_line()
