"""Nothing is advertised to a guest that is not served.

What a guest is told comes from five places in the code: the HVM params it may read
(hvm.GUEST_READABLE), the Xen CPUID leaves (cpuid.xen_leaves), the XENVER_get_features
bits (version.FEATURES), the hvm_start_info the loader fills (loader.write_start_info) and
the platform features the toolstack's xenstore tree claims (xenstore/toolstack.py).
The first test reads each of them from that code and requires a proof for every item; the
proofs are the tests below, each a guest of ours using the item and getting its answer.
A param that holds 0 for "not present" must be 0 as Xen answers it for a PVH domU; a param
a guest may not read must be refused as Xen refuses it.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest

from tests.machine.test_loader import FakeMachine
from tests.xen.conftest import SCRATCH
from xend_lite.machine import acpi, loader
from xend_lite.machine.loader import E820_RAM, E820_RESERVED, e820_map
from xend_lite.vmm.domain import Domain
from xend_lite.vmm.spec import DomainSpec
from xend_lite.xen import cpuid, hvm, version
from xend_lite.xen.timekeeping import scale_delta
from xend_lite.xen.xenabi import X
from xend_lite.xen.page import BytesPage
from xend_lite.xen.xenstore.protocol import XsType
from xend_lite.xen.xenstore.server import XenstoreServer
from xend_lite.xen.xenstore.toolstack import DomainInfo

pytestmark = pytest.mark.kvm

NOT_PRESENT = {X.HVM_PARAM_VM86_TSS: "vm86 TSS: KVM runs real mode itself",
               X.HVM_PARAM_VM86_TSS_SIZED: "vm86 TSS: KVM runs real mode itself",
               X.HVM_PARAM_ACPI_IOPORTS_LOCATION: "no ACPI PM timer",
               X.HVM_PARAM_VM_GENERATION_ID_ADDR: "set only by a guest's firmware",
               X.HVM_PARAM_ALTP2M: "altp2m off"}

# item -> the test below that proves it is served
PARAM_PROOFS = {
    X.HVM_PARAM_CALLBACK_IRQ: "test_callback_irq_vector_delivers_events",
    X.HVM_PARAM_STORE_PFN: "test_store_params_reach_a_working_xenstore",
    X.HVM_PARAM_STORE_EVTCHN: "test_store_params_reach_a_working_xenstore",
    X.HVM_PARAM_CONSOLE_PFN: "test_console_params_carry_output_and_input",
    X.HVM_PARAM_CONSOLE_EVTCHN: "test_console_params_carry_output_and_input",
    X.HVM_PARAM_X87_FIP_WIDTH: "test_x87_fip_width_is_what_the_saved_state_keeps",
} | dict.fromkeys(NOT_PRESENT, "test_params_read_as_xen_answers_a_pvh_domu")

FEATURE_PROOFS = {
    X.XENFEAT_writable_page_tables: "test_writable_page_tables",
    X.XENFEAT_auto_translated_physmap: "test_pvclock_in_shared_info_mapped_where_the_guest_chose",
    X.XENFEAT_hvm_callback_vector: "test_callback_irq_vector_delivers_events",
    X.XENFEAT_hvm_safe_pvclock: "test_pvclock_in_shared_info_mapped_where_the_guest_chose",
}

L0, L1, L2, L3, L4 = (cpuid.BASE + i for i in range(5))
# (leaf, subleaf, register, bit): a bit of a flags register, or None for a value
CPUID_PROOFS = {
    (1, 0, "ecx", 31): "test_cpuid_leaves",
    (L0, 0, "eax", None): "test_cpuid_leaves",
    (L0, 0, "ebx", None): "test_cpuid_leaves",
    (L0, 0, "ecx", None): "test_cpuid_leaves",
    (L0, 0, "edx", None): "test_cpuid_leaves",
    (L1, 0, "eax", None): "test_cpuid_leaves",
    (L2, 0, "eax", None): "test_cpuid_leaves",
    (L2, 0, "ebx", None): "test_cpuid_leaves",
    (L3, 0, "ecx", None): "test_cpuid_leaves",
    (L3, 2, "eax", None): "test_cpuid_leaves",
    (L4, 0, "eax", 3): "test_cpuid_leaves",        # XEN_HVM_CPUID_VCPU_ID_PRESENT
    (L4, 0, "eax", 4): "test_cpuid_leaves",        # XEN_HVM_CPUID_DOMID_PRESENT
    # XEN_HVM_CPUID_UPCALL_VECTOR: HVMOP_set_evtchn_upcall_vector, served by a guest's own vector
    (L4, 0, "eax", 6): "test_upcall_vector_reaches_a_guest_that_enabled_its_apic_late",
    (L4, 0, "ebx", None): "test_cpuid_leaves",
    (L4, 0, "ecx", None): "test_cpuid_leaves",
}
FLAG_REGISTERS = {(1, 0, "ecx"), (L4, 0, "eax")}

START_INFO_FIELDS = ("magic", "version", "flags", "nr_modules", "modlist_paddr",
                     "cmdline_paddr", "rsdp_paddr", "memmap_paddr", "memmap_entries",
                     "reserved")
XENSTORE_FEATURE_PROOFS = {
    "platform-feature-xs_reset_watches": "test_xs_reset_watches_is_served",
}

START_INFO_PROOFS = dict.fromkeys(
    ("magic", "version", "nr_modules", "modlist_paddr", "cmdline_paddr", "memmap_paddr",
     "memmap_entries"), "test_start_info_is_what_the_guest_finds")


# -- what the code advertises -----------------------------------------------------------

def advertised_cpuid() -> set[tuple[int, int, str, int | None]]:
    cfg = cpuid.XenCpuidConfig(4, 16, domid=7, tsc_khz=1_000_000)
    basic = [cpuid.CpuidEntry(1, 0, 0, 0, 0, 0, 0)]
    out = set()
    for e in cpuid.build_cpuid(basic, cfg, vcpu_id=1):
        for reg in ("eax", "ebx", "ecx", "edx"):
            value = getattr(e, reg)
            if not value:
                continue
            if (e.function, e.index, reg) in FLAG_REGISTERS:
                out |= {(e.function, e.index, reg, b) for b in range(32) if value >> b & 1}
            else:
                out.add((e.function, e.index, reg, None))
    return out


def advertised_start_info() -> set[str]:
    m = FakeMachine(64 << 20)
    gpa = loader.write_start_info(m, "x", (loader.LoadSegment(0x800000, 4096, 4096),))
    values = loader.START_INFO.unpack(m.mem.read(gpa, loader.START_INFO.size))
    return {name for name, v in zip(START_INFO_FIELDS, values) if v}


def advertised_xenstore_features() -> set[str]:
    srv = XenstoreServer(1, BytesPage(), lambda: None)
    srv.write_domain_tree(DomainInfo(name="x", memory_kib=65536, store_port=1,
                                     store_ring_ref=2, console_port=3, console_ring_ref=4))
    control = srv.ls("/local/domain/1/control")["children"]
    return {name for name, node in control.items()
            if "feature" in name and node["value"] not in ("", "0")}


def test_every_advertised_item_has_a_proof():
    features = {b for b in range(32) if version.FEATURES >> b & 1}
    for advertised, proofs in ((set(hvm.GUEST_READABLE), PARAM_PROOFS),
                               (features, FEATURE_PROOFS),
                               (advertised_cpuid(), CPUID_PROOFS),
                               (advertised_start_info(), START_INFO_PROOFS),
                               (advertised_xenstore_features(), XENSTORE_FEATURE_PROOFS)):
        assert advertised == set(proofs), "advertised without a proof, or a proof of nothing"
        for name in proofs.values():
            assert callable(globals().get(name)), name


# -- the proofs -------------------------------------------------------------------------

def get_param(g, index: int, domid: int = X.DOMID_SELF) -> tuple[int, int]:
    """The guest asks for an HVM param: (rc, value)."""
    gpa = g.data(struct.pack("<HHIQ", domid, 0, index, 0xDEAD))
    rc = g.hcall(X.__HYPERVISOR_hvm_op, X.HVMOP_get_param, gpa)
    return rc, struct.unpack("<Q", g.mem.read(gpa + 8, 8))[0]


def set_param(g, index: int, value: int) -> int:
    gpa = g.data(struct.pack("<HHIQ", X.DOMID_SELF, 0, index, value))
    return g.hcall(X.__HYPERVISOR_hvm_op, X.HVMOP_set_param, gpa)


def test_params_read_as_xen_answers_a_pvh_domu(ring_guest):
    """Every param index through a guest: the readable ones answer (those that hold 0 for
    "not present" answer 0), the deprecated ones -EOPNOTSUPP, the toolstack's (IOREQ_PFN,
    BUFIOREQ_PFN, ...) -EPERM, and an index past the last -EINVAL."""
    g = ring_guest()
    got = {i: get_param(g, i) for i in range(X.HVM_NR_PARAMS + 1)}
    assert {i for i, (rc, _v) in got.items() if rc == 0} == set(hvm.GUEST_READABLE)
    for i, (rc, value) in got.items():
        if i == X.HVM_NR_PARAMS:
            assert rc == -X.XEN_EINVAL
        elif i in hvm.DEPRECATED:
            assert rc == -X.XEN_EOPNOTSUPP, i
        elif i not in hvm.GUEST_READABLE:
            assert rc == -X.XEN_EPERM and value == 0xDEAD, i
        elif i in NOT_PRESENT:
            assert value == 0, (i, NOT_PRESENT[i])
    for i in (X.HVM_PARAM_IOREQ_PFN, X.HVM_PARAM_BUFIOREQ_PFN):
        assert got[i][0] == -X.XEN_EPERM
    # a guest cannot move a PM timer it does not have, nor turn altp2m on
    assert set_param(g, X.HVM_PARAM_ACPI_IOPORTS_LOCATION, 1) == -X.XEN_ENODEV
    assert set_param(g, X.HVM_PARAM_ALTP2M, 1) == -X.XEN_EPERM
    assert get_param(g, X.HVM_PARAM_ACPI_IOPORTS_LOCATION) == (0, 0)
    assert get_param(g, 0, domid=0)[0] == -X.XEN_EPERM


def test_store_params_reach_a_working_xenstore(ring_guest):
    g = ring_guest(domid=7)
    assert get_param(g, X.HVM_PARAM_STORE_PFN) == (0, g.store_gpa >> 12)
    assert get_param(g, X.HVM_PARAM_STORE_EVTCHN) == (0, g.ctl(5))
    assert g.ask(XsType.READ, b"name", req_id=1) == (XsType.READ, b"xend-lite")
    assert g.ask(XsType.GET_DOMAIN_PATH, b"7", req_id=2) == \
        (XsType.GET_DOMAIN_PATH, b"/local/domain/7\0")
    event = (XsType.WATCH_EVENT, 0, 0, b"data/p\0tok\0")
    assert g.ask(XsType.WATCH, b"data/p", b"tok", req_id=3) == (XsType.WATCH, b"OK\0")
    g.wait(lambda: g.replies().count(event) == 1, 5, "the event a new watch fires")
    g.xen.xenstore.call("write", "data/p", "from the toolstack")
    g.wait(lambda: g.replies().count(event) == 2, 5, "the event for the toolstack's write")
    assert g.ask(XsType.READ, b"data/p", req_id=4) == (XsType.READ, b"from the toolstack")


def test_xs_reset_watches_is_served(ring_guest):
    """The tree claims control/platform-feature-xs_reset_watches: the guest's watches go
    when it asks, and no event comes for them after."""
    g = ring_guest()
    event = (XsType.WATCH_EVENT, 0, 0, b"data/r\0tok\0")
    assert g.ask(XsType.READ, b"control/platform-feature-xs_reset_watches", req_id=1) == \
        (XsType.READ, b"1")
    assert g.ask(XsType.WATCH, b"data/r", b"tok", req_id=2) == (XsType.WATCH, b"OK\0")
    g.wait(lambda: g.replies().count(event) == 1, 5, "the event a new watch fires")
    assert g.ask(XsType.RESET_WATCHES, b"", req_id=3) == (XsType.RESET_WATCHES, b"OK\0")
    assert not g.xen.xenstore.server.conn.watches
    g.xen.xenstore.call("write", "data/r", "changed")
    assert g.ask(XsType.READ, b"data/r", req_id=4) == (XsType.READ, b"changed")
    assert g.replies().count(event) == 1


def test_console_params_carry_output_and_input(ring_guest):
    g = ring_guest()
    assert get_param(g, X.HVM_PARAM_CONSOLE_PFN) == (0, g.console_gpa >> 12)
    assert get_param(g, X.HVM_PARAM_CONSOLE_EVTCHN) == (0, g.ctl(7))
    g.console_write(b"a line through the ring\n")
    g.wait(lambda: b"a line through the ring\n" in g.machine.console.tail(4096), 5, "output")
    g.xen.console.write_input(b"typed")
    cons, prod = struct.unpack("<II", g.mem.read(g.console_gpa + 3072, 8))
    assert prod - cons == 5 and g.mem.read(g.console_gpa + (cons & 1023), 5) == b"typed"


def test_callback_irq_vector_delivers_events(run_to_done, ring_guest):
    """upcall64 names a vector in HVM_PARAM_CALLBACK_IRQ and an event arrives on it; the
    param reads back as set."""
    d = run_to_done("xen/guests/upcall64.S")
    count, port = struct.unpack("<QQ", d.machine.mem.read(0x300000, 16))
    assert port > 0 and count >= 1
    g = ring_guest()
    assert set_param(g, X.HVM_PARAM_CALLBACK_IRQ, 2 << 56 | 0xF3) == 0
    assert get_param(g, X.HVM_PARAM_CALLBACK_IRQ) == (0, 2 << 56 | 0xF3)


def test_pvclock_in_shared_info_mapped_where_the_guest_chose(run_to_done):
    """time64 maps shared_info at a frame of its own choosing (auto-translated physmap) and
    reads system time from vcpu_time_info there: it advances with the host's clock and
    never steps back (safe pvclock)."""
    d = run_to_done("xen/guests/time64.S", timeout=30)
    assert d.overlay.gpa("shared_info") == 0x800000
    backwards = struct.unpack("<Q", d.machine.mem.read(0x300108, 8))[0]
    samples = struct.unpack("<2000Q", d.machine.mem.read(0x310000, 16000))
    assert backwards == 0 and samples[-1] > samples[0] > 0
    assert abs(d.xen.clock.now() - samples[-1]) < 2 * 10**9


def test_cpuid_leaves(ring_guest):
    """Each leaf value as the guest sees it, against the thing it names."""
    g = ring_guest(domid=7, xen_version="4.17")
    assert g.cpuid(1)[2] >> 31 == 1
    top, b, c, dx = g.cpuid(L0)
    assert top == L0 + 5 and struct.pack("<3I", b, c, dx) == b"XenVMMXenVMM"
    assert g.cpuid(L1)[0] == g.hcall(X.__HYPERVISOR_xen_version, X.XENVER_version) == 4 << 16 | 17
    pages, msr, _c, _d = g.cpuid(L2)
    assert pages == 1 and msr == cpuid.HYPERCALL_MSR
    assert g.xen.hypercall_page is not None      # the guest named its page through that MSR
    khz = g.cpuid(L3, 0)[2]
    assert khz == g.cpuid(L3, 2)[0] == g.xen.time.tsc_khz > 0
    # the scale vcpu_time_info carries turns khz * 1000 ticks into one second
    ns = scale_delta(khz * 1000, g.xen.time.tsc_mul, g.xen.time.tsc_shift)
    assert abs(ns - 10**9) < 10**6
    flags, vcpu_id, domid, _d = g.cpuid(L4)
    assert flags == (X.XEN_HVM_CPUID_VCPU_ID_PRESENT | X.XEN_HVM_CPUID_DOMID_PRESENT
                     | X.XEN_HVM_CPUID_UPCALL_VECTOR)
    assert vcpu_id == 0
    assert g.hcall(X.__HYPERVISOR_vcpu_op, X.VCPUOP_is_up, vcpu_id) == 1
    assert domid == 7 and g.ask(XsType.READ, b"domid", req_id=1) == (XsType.READ, b"7")
    assert g.cpuid(L0 + 5) == (0, 0, 0, 0)


def test_writable_page_tables(harness_factory):
    """The 64-bit harness guest writes its own PML4 to alias physical memory and hands Xen
    pointers through that alias: they are translated through the guest's tables."""
    h = harness_factory(64)
    (rc, _), = h.run([(X.__HYPERVISOR_xen_version, X.XENVER_extraversion, h.ptr(SCRATCH))])
    assert rc == 0 and h.ptr(SCRATCH) != SCRATCH
    assert h.mem.read(SCRATCH, 16).rstrip(b"\0") == version.XEN_EXTRAVERSION


def test_x87_fip_width_is_what_the_saved_state_keeps(guest_path, tmp_path):
    """The param says 8: the FPU's instruction and operand pointers are kept whole across
    a save and a load into a fresh domain. (Whether the guest can set their upper halves
    depends on the host: where its FXRSTOR64 keeps only 32 bits, the 32 bits it kept must
    come back.)"""
    image = str(guest_path("xen/guests/fipwidth64.S"))
    out = 0x300000

    def domain() -> tuple[Domain, list[int]]:
        d = Domain(DomainSpec(image=image, memory_mib=64))
        signals: list[int] = []
        d.machine.exits.register_io_out(0xF0, lambda _r, ex: signals.append(ex.data[0]))
        return d, signals

    def wait(d, signals, n) -> None:
        deadline = time.monotonic() + 10
        while len(signals) < n:
            assert d.machine.status is None and time.monotonic() < deadline, d.machine.status
            time.sleep(0.01)

    a, sig_a = domain()
    try:
        a.start()
        wait(a, sig_a, 1)
        rc, width, fip, fdp, fip_seen, fdp_seen = struct.unpack("<qQQQQQ", a.machine.mem.read(out, 48))
        assert (rc, width) == (0, 8)
        assert (fip_seen, fdp_seen) in ((fip, fdp), (fip & 0xFFFF_FFFF, fdp & 0xFFFF_FFFF))
        a.pause()
        a.snapshot_save(tmp_path / "fpu.snap")
    finally:
        a.close()
    b, sig_b = domain()
    try:
        b.snapshot_load(tmp_path / "fpu.snap")
        b.machine.mem.write(out + 64, struct.pack("<Q", 1))
        b.start()
        wait(b, sig_b, 1)
        assert struct.unpack("<QQ", b.machine.mem.read(out + 48, 16)) == (fip_seen, fdp_seen)
    finally:
        b.close()


def test_start_info_is_what_the_guest_finds(guest_path, tmp_path):
    """startinfo32 reads hvm_start_info as a PVH guest does: the magic and version, the
    command line, the module (the initrd's bytes), and a memory map that is the one
    XENMEM_memory_map gives, whose RAM is memory (the guest's markers are there) and whose
    reserved entries are exactly the ACPI tables (where rsdp_paddr points) and the xenstore
    and console rings."""
    initrd = bytes((i * 7 + 3) & 0xFF for i in range(5000))
    (tmp_path / "initrd").write_bytes(initrd)
    cmdline = "console=hvc0 xend-lite start_info proof"
    d = Domain(DomainSpec(image=str(guest_path("xen/guests/startinfo32.S", bits=32)),
                          memory_mib=64, cmdline=cmdline, initrd=str(tmp_path / "initrd")))
    try:
        done = threading.Event()
        d.machine.exits.register_io_out(0xF0, lambda _r, _e: done.set())
        d.start()
        assert done.wait(10), d.machine.status
        m, out = d.machine.mem, 0x300000
        si = dict(zip(START_INFO_FIELDS, loader.START_INFO.unpack(m.read(out, 56))))
        assert (si["magic"], si["version"], si["flags"]) == (loader.HVM_START_MAGIC, 1, 0)
        assert si["rsdp_paddr"] == d.machine.acpi_rsdp != 0
        assert m.read(si["rsdp_paddr"], 8) == b"RSD PTR "
        assert m.read(out + 0x1000, len(cmdline) + 1) == cmdline.encode() + b"\0"
        assert si["nr_modules"] == 1
        paddr, size, _cmd, _r = struct.unpack("<QQQQ", m.read(out + 0x40, 32))
        assert size == len(initrd) and m.read(out + 0x2000, 256) == initrd[:256]
        table = [struct.unpack("<QQII", m.read(out + 0x100 + 24 * i, 24))[:3]
                 for i in range(si["memmap_entries"])]
        rc, n = struct.unpack("<qI", m.read(out + 0x80, 12))[0], \
            struct.unpack("<I", m.read(out + 0x90, 4))[0]
        hcall = [struct.unpack("<QQI", m.read(out + 0x800 + 20 * i, 20)) for i in range(n)]
        assert rc == 0 and table == hcall == e820_map(d.machine)
        for i, (a, size_, t) in enumerate(table):
            if t == E820_RAM:
                assert struct.unpack("<I", m.read(a + size_ - 4, 4))[0] == 0x5A5A0000 | i
        reserved = {a for a, size_, t in table if t == E820_RESERVED}
        assert reserved == {acpi.ACPI_GPA, d.xen.params[X.HVM_PARAM_STORE_PFN] << 12,
                            d.xen.params[X.HVM_PARAM_CONSOLE_PFN] << 12}
        assert paddr + size <= max(a + s for a, s, t in table if t == E820_RAM)
    finally:
        d.close()


def test_upcall_vector_reaches_a_guest_that_enabled_its_apic_late(run_to_done):
    """A per-vCPU upcall vector named while the local APIC is disabled, with an event
    already flagged: the upcall arrives once the guest enables its APIC (KVM dropped the
    first try), and the next one after the guest's EOI."""
    d = run_to_done("xen/guests/upcall_vector64.S")
    count = struct.unpack("<Q", d.machine.mem.read(0x300000, 8))[0]
    assert count == 2, f"{count} of 2 upcalls reached the guest"
    assert d.xen.upcalls.vectors == {0: 0xF3}
    assert not d.xen.upcalls.untaken
