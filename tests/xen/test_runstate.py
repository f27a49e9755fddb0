"""VCPUOP_register_runstate_memory_area from real guests (64- and 32-bit): the area is filled
at once, shows the vCPU running, counts the time it spent blocked, and survives a save."""

from __future__ import annotations

import struct

import pytest

from tests.xen.conftest import SCRATCH, errno
from xend_lite.xen.abi import guest_layout
from xend_lite.xen.runstate import RUNSTATE_UPDATE
from xend_lite.xen.xenabi import X

pytestmark = pytest.mark.kvm

AREA = SCRATCH + 0x100
ARG = SCRATCH
VCPU_OP, SCHED_OP = X.__HYPERVISOR_vcpu_op, X.__HYPERVISOR_sched_op


def read_area(h):
    lay = guest_layout("vcpu_runstate_info", h.bits == 64)
    raw = h.mem.read(AREA, lay.size)
    state = struct.unpack_from("<i", raw, 0)[0]
    entry = struct.unpack_from("<Q", raw, lay.offset("state_entry_time"))[0]
    times = struct.unpack_from("<4Q", raw, lay.offset("time"))
    return state, entry, times


def register_call(h, vcpu=0, area=AREA, arg=ARG):
    h.put(arg, struct.pack("<Q", h.ptr(area) if area else 0))
    return (VCPU_OP, X.VCPUOP_register_runstate_memory_area, vcpu, h.ptr(arg))


def register(h, vcpu=0, area=AREA):
    return h.run([register_call(h, vcpu, area)])[0][0]


def test_area_registered_filled_and_counts_blocked_time(harness):
    h = harness
    assert h.mem.read(AREA, 48) == bytes(48)
    # SCHEDOP_block with nothing pending returns after its slice: that time is blocked
    (rc, _), (rc2, _) = h.run([register_call(h), (SCHED_OP, X.SCHEDOP_block, 0)])
    assert rc == rc2 == 0
    state, entry, times = read_area(h)
    assert state == X.RUNSTATE_running and not entry & RUNSTATE_UPDATE
    assert 0 < entry <= h.xen.clock.now()
    assert times[X.RUNSTATE_blocked] > 1_000_000
    assert times[X.RUNSTATE_runnable] == times[X.RUNSTATE_offline] == 0     # no steal


def test_bad_requests_get_xens_errors(harness):
    h = harness
    got = h.run([register_call(h, vcpu=1), register_call(h, area=0x3FFF_F000, arg=ARG + 8),
                 register_call(h, area=0, arg=ARG + 16)])
    assert [rc for rc, _ in got] == [errno("ENOENT"), errno("EFAULT"), 0]   # a null handle
    assert not h.xen.runstates.areas


def test_area_saved_and_loaded(harness):
    h = harness
    assert register(h) == 0
    st = h.xen.persist.save()["xen"]
    assert st.runstate["0"][2] == X.RUNSTATE_running
    h.xen.runstates.reset()
    prep = h.xen.persist.prepare({"xen": st, "xen_overlay": h.xen.overlay.save()})
    h.xen.runstates.from_state(prep.xen.runstate, 1)
    assert set(h.xen.runstates.areas) == {0}
    bad = dict(st.runstate)
    bad["0"] = [[[0xFFFF_FFFF_0000, 48]], True, 0, 0, [0, 0, 0, 0]]
    st.runstate = bad
    from xend_lite.errors import InvalidArgument
    with pytest.raises(InvalidArgument):
        h.xen.persist.prepare({"xen": st, "xen_overlay": h.xen.overlay.save()})


def test_area_in_a_ballooned_out_frame_is_skipped_until_it_is_back(harness):
    """The guest balloons out the frame its area lies in. Xen writes the area with a copy to
    the guest that then fails and is skipped: blocking goes on as ever. Here too (no error to
    the guest, no internal error), and once the frame is put back the area is written again,
    with the blocked time of the while counted."""
    h, w = harness, harness.bits // 8
    area = SCRATCH + 0x10100                     # a frame of its own, away from the structs
    h.put(ARG + 0x100, (area >> 12).to_bytes(w, "little"))
    fmt = "<QQIIH" if h.bits == 64 else "<IIIIH"
    resv = h.put(ARG + 0x40, struct.pack(fmt, h.ptr(ARG + 0x100), 1, 0, 0, X.DOMID_SELF))
    got = h.run([register_call(h, area=area), (X.__HYPERVISOR_memory_op, X.XENMEM_decrease_reservation, resv),
                 (SCHED_OP, X.SCHEDOP_block, 0), (SCHED_OP, X.SCHEDOP_block, 0),
                 (X.__HYPERVISOR_memory_op, X.XENMEM_populate_physmap, resv),
                 (SCHED_OP, X.SCHEDOP_block, 0)])
    assert [rc for rc, _ in got] == [0, 1, 0, 0, 1, 0]
    assert h.xen.internal_errors == 0, h.xen.counters()
    lay = guest_layout("vcpu_runstate_info", h.bits == 64)
    raw = h.mem.read(area, lay.size)
    assert struct.unpack_from("<i", raw, 0)[0] == X.RUNSTATE_running
    assert struct.unpack_from("<Q", raw, lay.offset("state_entry_time"))[0] > 0
    blocked = struct.unpack_from("<4Q", raw, lay.offset("time"))[X.RUNSTATE_blocked]
    assert blocked > 2_000_000       # the three blocks, the two while the frame was out too
