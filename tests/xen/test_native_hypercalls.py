"""The hypercalls dispatch.NATIVE names, served in C in the vCPU loop, answer exactly as the
Python handlers do: the same guest runs with the native path on and off and must see the same
results, registers and memory, error cases included; the counters count natively served
calls; and the native path really served them (the Python dispatcher never saw them)."""

from __future__ import annotations

import struct

import pytest

from tests.xen.conftest import SCRATCH, TABLE
from xend_lite.xen.dispatch import NATIVE
from xend_lite.xen.hypercall import TABLE_SIZE
from xend_lite.xen.xenabi import X

VER, SCHED, SCHED_COMPAT = X.__HYPERVISOR_xen_version, X.__HYPERVISOR_sched_op, \
    X.__HYPERVISOR_sched_op_compat
BAD_GVA = 0x7FFF_F000          # far past the guest's RAM (and unmapped in 64-bit mode)
U32 = 1 << 32


def calls(ptr) -> list[tuple[int, ...]]:
    """Every native (call, sub-op), its neighbours the Python side keeps, and the error cases:
    bad sub-ops, high bits a 64-bit guest sets on the sub-op, pointers out of RAM."""
    return [
        (VER, X.XENVER_version, 0),
        (VER, X.XENVER_version, BAD_GVA),               # the argument is not read: no fault
        (VER, X.XENVER_pagesize, BAD_GVA),
        (VER, X.XENVER_version | U32, 0),               # 64-bit: not XENVER_version
        (VER, X.XENVER_pagesize | U32, 0),
        (VER, X.XENVER_get_features, BAD_GVA),          # Python: -EFAULT
        (VER, X.XENVER_get_features, ptr(SCRATCH)),
        (VER, X.XENVER_extraversion, ptr(SCRATCH + 0x100)),
        (VER, 0x7FFF, 0),                               # -ENOSYS
        (SCHED, X.SCHEDOP_yield, 0),
        (SCHED, X.SCHEDOP_yield, BAD_GVA),
        (SCHED, X.SCHEDOP_yield | U32, 0),              # 64-bit: unknown sub-op
        (SCHED, 0x7FFF, 0),
        (SCHED_COMPAT, X.SCHEDOP_yield, 0),
        (VER, X.XENVER_version, 0),
    ]


def run_both(harness_factory, bits: int):
    """(results, guest memory, counters, Python-side counts) with native on, then off."""
    out = []
    for native in (True, False):
        h = harness_factory(bits, native_hypercalls=native)
        h.mem.write(SCRATCH, struct.pack("<II", 0, 0xA5A5A5A5))    # xen_feature_info
        got = h.run(calls(h.ptr))
        mem = h.mem.read(TABLE, 64 + 256 * len(got)), h.mem.read(SCRATCH, 0x200)
        out.append((got, mem, h.xen.counters(), list(h.xen.hypercalls.calls)))
    return out


def test_the_native_table_is_what_c_serves():
    from xend_lite.xen.native import NativeHypercalls

    n = NativeHypercalls(1, 0, NATIVE)
    assert set(n.slots) == NATIVE
    with pytest.raises(ValueError):
        NativeHypercalls(1, 0, [(X.__HYPERVISOR_memory_op, 0)])


def test_native_and_python_answer_the_same(harness_factory, bits):
    (on, mem_on, cnt_on, py_on), (off, mem_off, cnt_off, py_off) = run_both(harness_factory, bits)
    assert on == off
    assert mem_on == mem_off
    assert cnt_on["hypercalls"] == cnt_off["hypercalls"]
    assert cnt_on["total"] == cnt_off["total"] == len(on)
    # the answers are the real ones, not just equal
    r = [res for res, _clobbered in on]
    assert r[0] == r[1] == r[-1] == 4 << 16 | 16 and r[2] == 4096
    assert r[5] == -X.XEN_EFAULT and r[8] == -X.XEN_ENOSYS and r[9] == r[10] == 0
    if bits == 64:
        assert r[3] == r[4] == -X.XEN_ENOSYS and r[11] == -X.XEN_ENOSYS
    assert all(clobbered == 0 for _res, clobbered in on)
    # with the native path on the Python dispatcher never saw the natively served calls
    mask = U32 - 1 if bits == 32 else (1 << 64) - 1      # a 32-bit guest's registers
    native_calls = sum((nr, sub & mask) in NATIVE for nr, sub, _a in calls(lambda g: g))
    assert sum(py_off) - sum(py_on) == native_calls >= 6
    assert py_on[VER] + py_on[SCHED] < py_off[VER] + py_off[SCHED]


def test_user_mode_calls_are_refused_both_ways(run_to_done):
    got = {}
    for native in (True, False):
        d = run_to_done("xen/guests/user64.S", native_hypercalls=native)
        got[native] = struct.unpack("<qq", d.machine.mem.read(0x300000, 16))
        assert d.xen.hypercalls.calls[VER] == (1 if native else 2)   # the kernel's call was native
    assert got[True] == got[False]
    assert got[True][0] == -X.XEN_EPERM and got[True][1] == 4 << 16 | 16


def test_counters_reset_and_reload_with_native_calls(harness_factory):
    h = harness_factory(64)
    h.run([(VER, X.XENVER_version, 0)] * 3)
    hc = h.xen.hypercalls
    assert hc.count(VER) == 3 and hc.calls[VER] == 0
    # the exits served in C count as exits (the halt watch looks for vCPUs making none)
    r = h.machine.runners[0]
    assert r.vcpu.hook_served() == 3 and r.exits_total >= 3 + r.exit_counts.total()
    calls, errors = hc.totals()
    hc.reset_counters()
    assert hc.count(VER) == 0 and hc.counters()["total"] == 0
    hc.load_counters(calls, errors)
    assert hc.count(VER) == 3 and len(calls) == TABLE_SIZE + 1


def test_served_reports_the_native_pairs(harness_factory):
    on = harness_factory(64).xen.hypercalls.served()
    off = harness_factory(64, native_hypercalls=False).xen.hypercalls.served()
    assert sum(v == "native" for v in on.values()) == len(NATIVE)
    assert "native" not in off.values() and off["xen_version"] == "python"


def test_the_environment_turns_the_native_path_off(harness_factory, monkeypatch):
    from xend_lite.vmm.domain import NATIVE_ENV

    monkeypatch.setenv(NATIVE_ENV, "0")
    h = harness_factory(64)
    assert not h.xen.native.enabled
    h.run([(VER, X.XENVER_version, 0)])
    assert h.xen.hypercalls.calls[VER] == 1        # served by the Python dispatcher


def test_a_vcpu_looping_on_native_calls_pauses_and_resumes(guest_image, tmp_path):
    import time

    from xend_lite.vmm.domain import Domain
    from xend_lite.vmm.spec import DomainSpec

    img = tmp_path / "nativeloop64.elf"
    img.write_bytes(guest_image("xen/guests/nativeloop64.S"))
    d = Domain(DomainSpec(image=str(img), memory_mib=64))
    try:
        m = d.machine

        def count() -> int:
            return struct.unpack("<Q", m.mem.read(0x300000, 8))[0]

        def wait_past(n: int) -> None:
            deadline = time.monotonic() + 10
            while count() <= n:
                assert m.status is None and time.monotonic() < deadline, m.status
                time.sleep(0.01)
        d.start()
        wait_past(1000)
        m.pause()                                   # the loop stays in C: the kick ends it
        assert m.runners[0].state.value == "paused"
        n = count()
        time.sleep(0.05)
        assert count() == n
        served = d.xen.hypercalls.count(VER)
        assert n <= served <= n + 1 and d.xen.hypercalls.calls[VER] == 0
        assert n <= d.xen.hypercalls.count(SCHED) <= served
        assert struct.unpack("<qq", m.mem.read(0x300008, 16)) == (4 << 16 | 16, 0)
        m.resume()
        wait_past(n + 1000)
        time.sleep(0.8)             # past the halt watch's quiet checks: still running
        assert m.status is None and m.runners[0].state.value == "running"
    finally:
        d.close()
