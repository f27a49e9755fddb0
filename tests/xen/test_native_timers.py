"""set_timer_op and vcpu_op's one-shot timer calls, served in C (dispatch.NATIVE): the same
calls with the native path on and off give the same results, leave the same deadline and
count the same; with it on, C served them (the Python dispatcher never saw them); a deadline
C sets fires VIRQ_TIMER, and an earlier one set while the timer thread sleeps wakes it."""

from __future__ import annotations

import struct
import time

import pytest

from tests.xen.conftest import SCRATCH
from xend_lite.xen.xenabi import X

pytestmark = pytest.mark.kvm

EV, SCHED, TIMER, VCPU = X.__HYPERVISOR_event_channel_op, X.__HYPERVISOR_sched_op, \
    X.__HYPERVISOR_set_timer_op, X.__HYPERVISOR_vcpu_op
SET, STOP = X.VCPUOP_set_singleshot_timer, X.VCPUOP_stop_singleshot_timer
BAD_GVA = 0x7FFF_F000
FAR = 1 << 50                  # some 13 days of system time: never fires in a test
NEVER = (1 << 64) - 1          # past what C keeps: kept as 2^63 - 1 both ways


def set_timer(h, deadline: int) -> tuple[int, ...]:
    """set_timer_op in the caller's convention: one 64-bit word, or low and high halves."""
    if h.bits == 64:
        return (TIMER, deadline)
    return (TIMER, deadline & 0xFFFFFFFF, deadline >> 32)


def calls(h) -> tuple[list[tuple[int, ...]], int]:
    """(calls, how many of them C serves): each kind, and the cases C leaves to Python."""
    m, p = h.mem, h.ptr
    m.write(SCRATCH, struct.pack("<QI", FAR + 1, 0))
    m.write(SCRATCH + 0x20, struct.pack("<QI", 1, X.VCPU_SSHOTTMR_future))   # long past
    m.write(SCRATCH + 0x40, struct.pack("<QI", FAR + 2, X.VCPU_SSHOTTMR_future))
    m.write(SCRATCH + 0x60, struct.pack("<QI", NEVER, 0))
    m.write(SCRATCH + 0xFFC, struct.pack("<I", 0))              # crosses into the next page
    m.write(SCRATCH + 0x80, struct.pack("<QI", FAR + 3, 0))
    out = [
        set_timer(h, FAR),                       # C
        set_timer(h, 0),                         # C: stops it
        (VCPU, SET, 0, p(SCRATCH)),              # C
        (VCPU, SET, 0, p(SCRATCH + 0x20)),       # Python: -ETIME
        (VCPU, SET, 0, p(SCRATCH + 0x40)),       # C: in the future, as asked
        (VCPU, SET, 1, p(SCRATCH)),              # Python: no vCPU 1, -ENOENT
        (VCPU, SET, 0, BAD_GVA),                 # Python: -EFAULT
        (VCPU, SET, 0, p(SCRATCH + 0xFFC)),      # Python: it reads across a page
        (VCPU, STOP, 0, 0),                      # C
        (VCPU, STOP, 1, 0),                      # Python: -ENOENT
        (VCPU, SET, 0, p(SCRATCH + 0x60)),       # C: the deadline kept capped
        (VCPU, SET | 1 << 32, 0, p(SCRATCH)),    # 64-bit: not the sub-op (-ENOSYS)
        (VCPU, SET, 0, p(SCRATCH + 0x80)),       # C: what is left armed
    ]
    served = 7 if h.bits == 64 else 8          # 32-bit: the high bits are not seen
    if h.bits == 32:
        out[11] = (VCPU, SET, 0, p(SCRATCH + 0x80))
    return out, served


def run_one(harness_factory, bits: int, native: bool) -> dict:
    h = harness_factory(bits, native_hypercalls=native)
    h.xen.timers.start_refresh()                 # C serves timer calls once its thread runs
    cs, served = calls(h)
    got = h.run(cs)
    hc = h.xen.hypercalls
    return {"results": got, "deadline": h.xen.timers.deadlines(),
            "counters": h.xen.counters(), "served": served,
            "python": (hc.calls[TIMER], hc.calls[VCPU])}


def test_timer_calls_answer_and_leave_the_same_both_ways(harness_factory, bits):
    on = run_one(harness_factory, bits, True)
    off = run_one(harness_factory, bits, False)
    assert on["results"] == off["results"]
    got = [r for r, _ in on["results"]]
    assert got[:7] + got[8:11] == [0, 0, 0, -X.XEN_ETIME, 0, -X.XEN_ENOENT, -X.XEN_EFAULT,
                                   0, -X.XEN_ENOENT, 0]
    assert on["deadline"] == off["deadline"] == {0: FAR + 3}
    assert on["counters"] == off["counters"]
    timer_calls = 2
    assert off["python"] == (timer_calls, 13 - timer_calls)
    # C served its share: the Python dispatcher saw only the rest
    assert sum(on["python"]) == 13 - on["served"]


def test_a_deadline_kept_capped_is_the_same_both_ways(harness_factory):
    """A deadline past 2^63 - 1 ns (292 years) is kept as that, by C and by Python."""
    for native in (True, False):
        h = harness_factory(64, native_hypercalls=native)
        h.xen.timers.start_refresh()
        h.run([set_timer(h, NEVER)])
        assert h.xen.timers.deadlines() == {0: (1 << 63) - 1}


def bind_timer(h) -> int:
    h.mem.write(SCRATCH, struct.pack("<III", X.VIRQ_TIMER, 0, 0))
    h.run([(EV, X.EVTCHNOP_bind_virq, h.ptr(SCRATCH))])
    return struct.unpack("<I", h.mem.read(SCRATCH + 8, 4))[0]


def poll_after(h, port: int, delay_ns: int) -> float:
    """Set a one-shot timer ``delay_ns`` from now through the guest, then SCHEDOP_poll on
    the timer port; seconds until the guest came back."""
    from xend_lite.machine.loader import load_image

    h.machine.stop()
    h.machine.rearm()
    load_image(h.machine, h.domain.image)        # the guest again (its memory too)
    m, p = h.mem, h.ptr
    m.write(SCRATCH + 0x100, struct.pack("<I", port))
    if h.bits == 64:
        m.write(SCRATCH + 0x200, struct.pack("<QIIQ", p(SCRATCH + 0x100), 1, 0, 0))
    else:
        m.write(SCRATCH + 0x200, struct.pack("<IIQ", p(SCRATCH + 0x100), 1, 0))
    calls = [set_timer(h, h.xen.clock.now() + delay_ns), (SCHED, X.SCHEDOP_poll, p(SCRATCH + 0x200))]
    t0 = time.monotonic()
    res = h.run(calls)
    took = time.monotonic() - t0
    assert [r for r, _ in res] == [0, 0]
    return took


def test_a_timer_c_sets_fires_and_wakes_the_sleeping_timer_thread(harness):
    """The thread sleeps until its next refresh (1 s away); a deadline 30 ms away set in C
    must wake it: the poll returns in well under the second it would otherwise sleep. (With
    the wake taken out of xen_timer_set, it took a whole second.)"""
    h = harness
    port = bind_timer(h)
    h.xen.timers.start_refresh()
    time.sleep(0.1)                              # asleep on its futex by now
    before = h.xen.hypercalls.calls[TIMER]
    took = poll_after(h, port, 30_000_000)
    assert h.xen.hypercalls.calls[TIMER] == before       # C served it
    assert h.xen.evtchn.is_pending(port)
    assert 0.02 <= took < 0.6, f"the timer fired after {took:.3f} s"
    assert h.xen.timers.deadlines() == {}


def test_the_first_timer_call_starts_the_timer_thread(harness):
    """Before the timer thread runs, C leaves timer calls to Python, which starts it: a
    guest's first timer is never set where nothing would fire it."""
    h = harness
    port = bind_timer(h)
    took = poll_after(h, port, 30_000_000)
    assert h.xen.evtchn.is_pending(port) and took < 0.6
    assert h.xen.hypercalls.calls[TIMER] == 1            # Python took the first
