"""Hypercalls from real guests in 64-bit and 32-bit mode, through the hypercall page."""

from __future__ import annotations

import struct

import pytest

from tests.xen.conftest import HCPAGE, SCRATCH, errno
from xend_lite.xen.xenabi import X
from xend_lite.xen.hypercall import HYPERCALL_PAGE

pytestmark = pytest.mark.kvm

HC = {n: getattr(X, "__HYPERVISOR_" + n) for n in (
    "xen_version", "memory_op", "hvm_op", "console_io", "sched_op", "event_channel_op",
    "grant_table_op", "vcpu_op", "set_timer_op", "sysctl", "domctl", "platform_op")}


def test_leaves_page_and_version(harness):
    (ver, flags), = harness.run([(HC["xen_version"], X.XENVER_version)])
    assert ver == 4 << 16 | 16 and flags == 0
    count, msr, done, msr_base, ver_leaf, top = harness.header()
    assert done == 1 and msr_base == 0x40000000 and ver_leaf == 4 << 16 | 16
    assert top == 0x40000005
    assert harness.mem.read(HCPAGE, 4096) == HYPERCALL_PAGE
    assert harness.xen.hypercall_page == HCPAGE


def test_version_and_domid_configurable(harness_factory):
    h = harness_factory(64, xen_version="4.17", domid=7)
    (ver, _), = h.run([(HC["xen_version"], X.XENVER_version)])
    assert ver == 4 << 16 | 17
    leaf4 = [e for e in h.machine.runners[0].vcpu.get_cpuid2() if e.function == 0x40000004] \
        if hasattr(h.machine.runners[0].vcpu, "get_cpuid2") else []
    if leaf4:
        assert leaf4[0].ecx == 7


def test_xen_version_subops(harness):
    p = harness.ptr
    calls = [
        (HC["xen_version"], X.XENVER_extraversion, p(SCRATCH)),
        (HC["xen_version"], X.XENVER_capabilities, p(SCRATCH + 0x100)),
        (HC["xen_version"], X.XENVER_pagesize, 0),
        (HC["xen_version"], X.XENVER_guest_handle, p(SCRATCH + 0x600)),
        (HC["xen_version"], X.XENVER_get_features, p(SCRATCH + 0x700)),
        (HC["xen_version"], X.XENVER_compile_info, p(SCRATCH + 0x800)),
        (HC["xen_version"], X.XENVER_changeset, p(SCRATCH + 0x900)),
        (HC["xen_version"], X.XENVER_platform_parameters, p(SCRATCH + 0xa00)),
        (HC["xen_version"], X.XENVER_commandline, p(SCRATCH + 0xb00)),
        (HC["xen_version"], 99, 0),
        (HC["xen_version"], X.XENVER_extraversion, 0xFFFFF000),   # unmapped / past RAM
    ]
    harness.mem.write(SCRATCH + 0x700, struct.pack("<II", 0, 0))
    res = harness.run(calls)
    assert [r for r, _ in res] == [0, 0, 4096, 0, 0, 0, 0, 0, errno("EPERM"), errno("ENOSYS"),
                                   errno("EFAULT")]
    assert all(f == 0 for _, f in res)
    m = harness.mem
    assert m.read(SCRATCH, 16).rstrip(b"\0") == b".0-xend-lite"
    assert m.read(SCRATCH + 0x100, 64).startswith(b"hvm-3.0-x86_64")
    assert m.read(SCRATCH + 0x600, 16) != bytes(16)
    feats = struct.unpack("<I", m.read(SCRATCH + 0x704, 4))[0]
    assert feats & (1 << X.XENFEAT_hvm_callback_vector)
    assert feats & (1 << X.XENFEAT_auto_translated_physmap)


def test_unknown_privileged_and_registers(harness):
    res = harness.run([(63, 1, 2, 3, 4, 5), (127, 0), (HC["sysctl"], 0), (HC["domctl"], 0),
                       (HC["platform_op"], 0), (HC["xen_version"], X.XENVER_version, 7, 8, 9, 10)])
    assert [r for r, _ in res[:5]] == [errno("ENOSYS"), errno("ENOSYS"), errno("EPERM"),
                                       errno("EPERM"), errno("EPERM")]
    assert all(f == 0 for _, f in res), "a register other than RAX changed"
    c = harness.domain.query_hypercalls()
    assert c["hypercalls"]["sysctl"] == {"calls": 1, "errors": 1, "errnos": {str(X.XEN_EPERM): 1}}
    assert c["hypercalls"]["unknown"]["errnos"] == {str(X.XEN_ENOSYS): 1}   # 127
    assert c["hypercalls"]["xen_version"] == {"calls": 1, "errors": 0}
    assert c["internal_errors"] == 0


def test_console_io(harness):
    msg = b"hello from the harness\n"
    ptr = harness.put(SCRATCH, msg)
    res = harness.run([(HC["console_io"], X.CONSOLEIO_write, len(msg), ptr),
                       (HC["console_io"], X.CONSOLEIO_read, 16, harness.ptr(SCRATCH + 0x100)),
                       (HC["console_io"], 7, 0, 0),
                       (HC["console_io"], X.CONSOLEIO_write, 100, 0xFFFFF000)])
    assert [r for r, _ in res] == [0, 0, errno("ENOSYS"), errno("EFAULT")]
    assert msg in harness.machine.console.tail(4096)


def test_memory_map_reservation_and_params(harness):
    p = harness.ptr
    m = harness.mem
    mmap_struct = struct.pack("<II", 16, p(SCRATCH + 0x100)) if harness.bits == 32 else \
        struct.pack("<IIQ", 16, 0, p(SCRATCH + 0x100))
    m.write(SCRATCH, mmap_struct)
    m.write(SCRATCH + 0x40, struct.pack("<H", X.DOMID_SELF))
    m.write(SCRATCH + 0x48, struct.pack("<H", 5))
    param = lambda idx: struct.pack("<HHIQ", X.DOMID_SELF, 0, idx, 0)
    m.write(SCRATCH + 0x200, param(X.HVM_PARAM_STORE_PFN))
    m.write(SCRATCH + 0x210, param(X.HVM_PARAM_CONSOLE_PFN))
    m.write(SCRATCH + 0x220, param(X.HVM_PARAM_STORE_EVTCHN))
    m.write(SCRATCH + 0x230, param(1000))
    m.write(SCRATCH + 0x240, param(X.HVM_PARAM_IOREQ_PFN + 100 if False else 9))  # toolstack's
    m.write(SCRATCH + 0x250, struct.pack("<HHIQ", X.DOMID_SELF, 0, X.HVM_PARAM_CALLBACK_IRQ,
                                         2 << 56 | 0xf3))
    m.write(SCRATCH + 0x260, struct.pack("<HHIQ", 0, 0, X.HVM_PARAM_STORE_PFN, 0))
    res = harness.run([
        (HC["memory_op"], X.XENMEM_memory_map, p(SCRATCH)),
        (HC["memory_op"], X.XENMEM_current_reservation, p(SCRATCH + 0x40)),
        (HC["memory_op"], X.XENMEM_maximum_reservation, p(SCRATCH + 0x40)),
        (HC["memory_op"], X.XENMEM_current_reservation, p(SCRATCH + 0x48)),
        (HC["memory_op"], X.XENMEM_maximum_ram_page, 0),
        (HC["hvm_op"], X.HVMOP_get_param, p(SCRATCH + 0x200)),
        (HC["hvm_op"], X.HVMOP_get_param, p(SCRATCH + 0x210)),
        (HC["hvm_op"], X.HVMOP_get_param, p(SCRATCH + 0x220)),
        (HC["hvm_op"], X.HVMOP_get_param, p(SCRATCH + 0x230)),
        (HC["hvm_op"], X.HVMOP_get_param, p(SCRATCH + 0x240)),
        (HC["hvm_op"], X.HVMOP_set_param, p(SCRATCH + 0x250)),
        (HC["hvm_op"], X.HVMOP_get_param, p(SCRATCH + 0x260)),
        (HC["hvm_op"], 1234, 0),
        (HC["memory_op"], 55, 0),
    ])
    pages = 64 << 8
    assert [r for r, _ in res] == [0, pages, pages, errno("ESRCH"), pages, 0, 0, 0, errno("EINVAL"),
                                   errno("EPERM"), 0, errno("EPERM"), errno("ENOSYS"),
                                   errno("ENOSYS")]
    n = struct.unpack("<I", m.read(SCRATCH, 4))[0]
    e820 = [struct.unpack("<QQI", m.read(SCRATCH + 0x100 + 20 * i, 20)) for i in range(n)]
    store = struct.unpack("<Q", m.read(SCRATCH + 0x208, 8))[0]
    console = struct.unpack("<Q", m.read(SCRATCH + 0x218, 8))[0]
    assert store and console and store != console
    for pfn in (store, console):
        kinds = {t for a, s, t in e820 if a <= pfn << 12 < a + s}
        assert kinds == {2}, f"special page {pfn:#x} must be reserved in the e820: {e820}"
    assert struct.unpack("<Q", m.read(SCRATCH + 0x228, 8))[0] > 0
    assert harness.xen.params[X.HVM_PARAM_CALLBACK_IRQ] == 2 << 56 | 0xf3


def _foreign_map(h, domid: int, n: int, buf: int) -> bytes:
    """struct xen_foreign_memory_map: domid, then the map at the pointer's alignment."""
    if h.bits == 32:
        return struct.pack("<HHII", domid, 0, n, buf)
    return struct.pack("<HHIIIQ", domid, 0, 0, n, 0, buf)


def test_a_guest_sets_its_own_memory_map(harness):
    """XENMEM_set_memory_map on itself replaces what XENMEM_memory_map answers (GRUB does
    this); too many entries, another domain or a bad buffer are refused and change nothing;
    a reset forgets the guest's map."""
    p, m, h = harness.ptr, harness.mem, harness
    mine = [(0, 0x9F000, 1), (0x100000, 0x1000000, 1), (0x1100000, 0x1000, 2)]
    m.write(SCRATCH + 0x400, b"".join(struct.pack("<QQI", *e) for e in mine))
    m.write(SCRATCH, _foreign_map(h, X.DOMID_SELF, 3, p(SCRATCH + 0x400)))
    m.write(SCRATCH + 0x40, _foreign_map(h, X.DOMID_SELF, 1025, p(SCRATCH + 0x400)))
    m.write(SCRATCH + 0x80, _foreign_map(h, 0, 1, p(SCRATCH + 0x400)))
    m.write(SCRATCH + 0xc0, _foreign_map(h, X.DOMID_SELF, 2, 0xFFFFF000))
    get = lambda buf: struct.pack("<II", 8, p(buf)) if h.bits == 32 else \
        struct.pack("<IIQ", 8, 0, p(buf))
    m.write(SCRATCH + 0x100, get(SCRATCH + 0x800))
    m.write(SCRATCH + 0x140, get(SCRATCH + 0xa00))
    ours = h.xen.memory._e820()
    res = h.run([
        (HC["memory_op"], X.XENMEM_set_memory_map, p(SCRATCH + 0x40)),
        (HC["memory_op"], X.XENMEM_set_memory_map, p(SCRATCH + 0x80)),
        (HC["memory_op"], X.XENMEM_set_memory_map, p(SCRATCH + 0xc0)),
        (HC["memory_op"], X.XENMEM_memory_map, p(SCRATCH + 0x140)),
        (HC["memory_op"], X.XENMEM_set_memory_map, p(SCRATCH)),
        (HC["memory_op"], X.XENMEM_memory_map, p(SCRATCH + 0x100)),
    ])
    assert [r for r, _ in res] == [errno("EINVAL"), errno("EPERM"), errno("EFAULT"), 0, 0, 0]
    before = [struct.unpack("<QQI", m.read(SCRATCH + 0xa00 + 20 * i, 20))
              for i in range(struct.unpack("<I", m.read(SCRATCH + 0x140, 4))[0])]
    assert before == ours[:8]          # the refused calls left our map in place
    n = struct.unpack("<I", m.read(SCRATCH + 0x100, 4))[0]
    assert n == 3 and h.xen.memory.guest_map == mine
    h.domain.pause()
    assert h.xen.persist.save()["xen"].guest_memory_map == [list(e) for e in mine]
    h.domain.reset()
    assert h.xen.memory.guest_map is None


def test_shutdown_reasons_reach_the_host(harness_factory, bits):
    for reason, name in [(X.SHUTDOWN_poweroff, "poweroff"), (X.SHUTDOWN_reboot, "reboot"),
                         (X.SHUTDOWN_crash, "crash"), (X.SHUTDOWN_watchdog, "watchdog"),
                         (X.SHUTDOWN_suspend, "suspend")]:
        h = harness_factory(bits)
        h.mem.write(SCRATCH, struct.pack("<I", 42))
        h.mem.write(SCRATCH + 8, struct.pack("<I", reason))
        h.plant([(HC["sched_op"], X.SCHEDOP_shutdown_code, h.ptr(SCRATCH)),
                 (HC["sched_op"], X.SCHEDOP_shutdown, h.ptr(SCRATCH + 8))])
        h.domain.start()
        st = h.machine.wait(10)
        assert st is not None and st.reason == name and st.code == 42, st
        if name == "crash":
            assert ("GUEST_PANICKED", {"reason": "crash", "code": 42}) in [
                (e, {k: v for k, v in d.items() if k != "detail"}) for e, d in h.events]


def test_unknown_sched_op_refused(harness):
    res = harness.run([(HC["sched_op"], 99, 0), (HC["sched_op"], X.SCHEDOP_yield, 0)])
    assert [r for r, _ in res] == [errno("ENOSYS"), 0]
    assert harness.machine.status is None


@pytest.mark.parametrize(("reason", "name", "detail"), [
    (77, "unknown", "reason 77"),                       # not a SHUTDOWN_* value
    (0x100 | X.SHUTDOWN_reboot, "reboot", "reboot"),     # Xen reads the reason as a u8
    (0xFFFF_FF00, "poweroff", "poweroff"),
])
def test_any_shutdown_reason_shuts_down_as_in_xen(harness_factory, reason, name, detail):
    h = harness_factory(64)
    h.mem.write(SCRATCH, struct.pack("<I", reason))
    h.plant([(HC["sched_op"], X.SCHEDOP_shutdown, h.ptr(SCRATCH))])
    h.domain.start()
    st = h.machine.wait(10)
    assert st is not None and st.reason == name and detail in st.detail, st


def test_bad_hypercall_msr_gets_gp(harness_factory):
    """An MSR value naming a page index other than 0 is refused with #GP; the guest has no
    IDT, so the fault ends it (a triple fault), and the daemon reports that."""
    h = harness_factory(32)
    h.plant([], msr=HCPAGE | 5)
    h.domain.start()
    st = h.machine.wait(10)
    assert st is not None and st.reason in ("triple-fault", "internal-error")
    assert h.xen.hypercall_page is None


def test_hypercall_from_user_mode_is_refused(run_to_done):
    d = run_to_done("xen/guests/user64.S")
    user, kernel = struct.unpack("<qq", d.machine.mem.read(0x300000, 16))
    assert kernel == 4 << 16 | 16
    assert user == errno("EPERM")


def test_handler_arity_is_the_signatures_count(harness_factory):
    """A handler is called with as many argument registers as it has parameters after the
    Call (5 with *args): read from its code object, the count is inspect.signature's, for
    every handler of a domain and for the other shapes a handler may take."""
    import functools
    import inspect

    from xend_lite.xen.dispatch import hypercall_table
    from xend_lite.xen.hypercall import _arity

    def by_signature(fn):
        params = list(inspect.signature(fn).parameters.values())[1:]
        return 5 if any(p.kind == p.VAR_POSITIONAL for p in params) else len(params)

    class Ops:
        def none(self, c): return 0
        def two(self, c, a, b=1): return 0
        def rest(self, c, a, *more): return 0
        def keyword(self, c, a, *, k=1): return 0
        def keywords(self, c, a, **kw): return 0

    def plain(c, a, b, d): return 0

    ops = Ops()
    shapes = [ops.none, ops.two, ops.rest, ops.keyword, ops.keywords, plain,
              functools.wraps(plain)(lambda *a, **k: plain(*a, **k)), functools.partial(plain)]
    h = harness_factory(64)
    table = hypercall_table(h.domain.xen)
    for fn in [*table.values(), *shapes]:
        assert _arity(fn) == by_signature(fn), fn
    assert [_arity(fn) for fn in shapes] == [0, 2, 5, 2, 2, 3, 3, 3]
