"""EVTCHNOP_send and EVTCHNOP_unmask served in C (dispatch.NATIVE) change exactly what the
Python handlers change: the same guest runs its calls with the native path on and off, and
every result, pending and mask bit, selector word, upcall flag, untaken upcall and counter
must be the same; with the native path on, the Python dispatcher must not have seen the
calls C could serve."""

from __future__ import annotations

import struct

import pytest

from tests.xen.conftest import SCRATCH
from xend_lite.xen.abi import SHINFO32, SHINFO64
from xend_lite.xen.xenabi import X

EV, HVM, VCPU = X.__HYPERVISOR_event_channel_op, X.__HYPERVISOR_hvm_op, X.__HYPERVISOR_vcpu_op
SEND, UNMASK = X.EVTCHNOP_send, X.EVTCHNOP_unmask
pytestmark = pytest.mark.kvm

BAD_GVA = 0x7FFF_F000
MASKED = 4                       # the second IPI port, masked before the guest runs
VCPU_INFO = SCRATCH + 0x3040     # where vCPU 1 registers its vcpu_info at the end
# the ports the calls below bind, in order (1 and 2 are the store's and the console's)
IPI0, IPI0_MASKED, IPI1, LOOP_A, LOOP_B, UNBOUND, VIRQ = 3, 4, 5, 6, 7, 8, 9


def calls(put) -> tuple[list[tuple[int, ...]], int]:
    """(calls, how many of them C may serve): bindings made through Python, then sends and
    unmasks of every kind: to self and to the other vCPU, masked and not, already pending,
    loopback both ways, dropped, refused (VIRQ, closed, out of range, bad pointer), to the
    daemon's side, before and after upcall vectors are set."""
    out: list[tuple[int, ...]] = []
    served = 0
    at = [SCRATCH]

    def struct_at(data: bytes) -> int:
        gva = put(at[0], data)
        at[0] += 0x20
        return gva

    def op(cmd: int, data: bytes) -> None:
        out.append((EV, cmd, struct_at(data)))

    def port_op(cmd: int, port: int, native: bool = True) -> None:
        nonlocal served
        op(cmd, struct.pack("<I", port))
        served += native

    def vector(vcpu: int, vec: int) -> None:
        out.append((HVM, X.HVMOP_set_evtchn_upcall_vector, struct_at(struct.pack("<IB", vcpu, vec))))

    op(X.EVTCHNOP_bind_ipi, struct.pack("<II", 0, 0))
    op(X.EVTCHNOP_bind_ipi, struct.pack("<II", 0, 0))
    op(X.EVTCHNOP_bind_ipi, struct.pack("<II", 1, 0))
    op(X.EVTCHNOP_alloc_unbound, struct.pack("<HHI", X.DOMID_SELF, X.DOMID_SELF, 0))
    op(X.EVTCHNOP_bind_interdomain, struct.pack("<HHII", X.DOMID_SELF, 0, LOOP_A, 0))
    op(X.EVTCHNOP_alloc_unbound, struct.pack("<HHI", X.DOMID_SELF, 0, 0))
    op(X.EVTCHNOP_bind_virq, struct.pack("<III", X.VIRQ_DEBUG, 0, 0))
    port_op(SEND, IPI0_MASKED)           # masked: pending only, no selector, no flag
    port_op(SEND, IPI0)                  # to self: pending, selector, upcall flag
    port_op(SEND, IPI0)                  # already pending
    port_op(SEND, LOOP_B)                # loopback: raises the other end
    port_op(SEND, LOOP_A)
    port_op(SEND, UNBOUND)               # no one listens: dropped
    port_op(SEND, VIRQ, native=False)    # -EINVAL
    port_op(SEND, 1, native=False)       # the daemon's side (xenstore)
    port_op(SEND, 0, native=False)
    port_op(SEND, 10, native=False)      # closed
    port_op(SEND, 5000, native=False)    # out of range
    out.append((EV, SEND, BAD_GVA))      # -EFAULT
    port_op(UNMASK, IPI0_MASKED)         # pending: delivered now (selector already set)
    port_op(UNMASK, 100)                 # unused, in range: the mask bit only
    port_op(UNMASK, 0, native=False)
    port_op(UNMASK, 5000, native=False)
    out.append((EV, UNMASK, BAD_GVA))
    vector(1, 0xF4)                      # vCPU 1 never starts: KVM does not take its upcalls
    port_op(SEND, IPI1)                  # to the other vCPU: a new flag, an MSI not taken
    port_op(SEND, IPI1)
    port_op(UNMASK, IPI1)                # pending: the untaken upcall is tried again
    vector(0, 0xF3)
    port_op(SEND, IPI0)
    port_op(UNMASK, IPI0)
    op(X.EVTCHNOP_close, struct.pack("<I", LOOP_A))
    port_op(SEND, LOOP_B)                # its other end closed: unbound, dropped
    op(X.EVTCHNOP_bind_vcpu, struct.pack("<II", LOOP_B, 1))
    port_op(UNMASK, LOOP_B)
    # vCPU 1's vcpu_info moves into guest RAM: later events flag it there
    out.append((VCPU, X.VCPUOP_register_vcpu_info, 1,
                struct_at(struct.pack("<QII", VCPU_INFO >> 12, VCPU_INFO & 0xFFF, 0))))
    port_op(SEND, IPI1)
    port_op(UNMASK, LOOP_B)
    return out, served


def observe(h) -> dict:
    """Everything a send or unmask may change, as the guest or a client sees it."""
    lay = SHINFO64 if h.bits == 64 else SHINFO32
    page = bytes(h.xen.shinfo.page.view)
    bitmaps = page[lay.evtchn_pending:lay.evtchn_mask + lay.word * lay.bits]
    # each vcpu_info's flags and selector (its time record changes on its own)
    vcpu_infos = [page[v * 64:v * 64 + 16] for v in range(2)] + [h.mem.read(VCPU_INFO, 16)]
    counters = h.xen.counters()
    return {"bitmaps": bitmaps, "vcpu_info": vcpu_infos, "untaken": sorted(h.xen.upcalls.untaken),
            "hypercalls": counters["hypercalls"], "total": counters["total"],
            "sends": counters["event_sends"], "layout": h.xen.shinfo.layout.word}


def run_one(harness_factory, bits: int, native: bool, steps: int | None = None):
    """Run the first ``steps`` calls (all by default) in a new domain: (results, what they
    changed, the Python dispatcher's counts, how many of them C may serve)."""
    h = harness_factory(bits, native_hypercalls=native, vcpus=2)
    try:
        lay = SHINFO64 if bits == 64 else SHINFO32
        h.xen.shinfo.page.view[lay.evtchn_mask] = 1 << MASKED
        table, served = calls(h.put)
        results = h.run(table[:steps])
        return results, observe(h), list(h.xen.hypercalls.calls), served
    finally:
        h.close()


def test_send_and_unmask_change_the_same_both_ways(harness_factory, bits):
    res_on, seen_on, py_on, served = run_one(harness_factory, bits, True)
    res_off, seen_off, py_off, _ = run_one(harness_factory, bits, False)
    assert res_on == res_off
    for key in seen_off:
        assert seen_on[key] == seen_off[key], key
    # and the answers are Xen's, not merely equal
    r = [res for res, _clobbered in res_off]
    assert r[:7] == [0] * 7 and r[7:13] == [0] * 6
    assert r[13] == r[15] == r[16] == r[17] == -X.XEN_EINVAL and r[18] == -X.XEN_EFAULT
    assert r[21] == r[22] == -X.XEN_EINVAL and r[23] == -X.XEN_EFAULT
    assert r[-3:] == [0, 0, 0] and seen_off["vcpu_info"][2][0] == 1   # flagged where it moved
    assert all(clobbered == 0 for _res, clobbered in res_on)
    assert seen_off["untaken"] == [0, 1]     # neither local APIC is enabled: none taken
    assert seen_off["sends"] == 13             # every send on a port in use
    # the calls C could serve never reached the Python dispatcher
    assert py_off[EV] - py_on[EV] == served
    assert served >= 15


def test_every_step_leaves_the_same_state_both_ways(harness_factory, bits):
    """A later call can hide what an earlier one did wrong (a selector bit a masked send set
    is set again by the next send): the state is compared after every call."""
    n = len(calls(lambda _gpa, _data: 0)[0])
    for steps in range(8, n + 1):            # from the first send on
        on = run_one(harness_factory, bits, True, steps)
        off = run_one(harness_factory, bits, False, steps)
        assert on[0] == off[0], steps
        for key in off[1]:
            assert on[1][key] == off[1][key], (steps, key)


SMP_DATA = 0x300000
ROUNDS = 20


def run_smp(guest_image, tmp_path, native: bool) -> tuple[dict, float]:
    """Run guests/evtchn_smp64.S on two vCPUs: (what it recorded, seconds to done)."""
    import threading
    import time

    from xend_lite.machine.loader import boot_cpu
    from xend_lite.vmm.domain import Domain
    from xend_lite.vmm.spec import DomainSpec

    img = tmp_path / "evtchn_smp64.elf"
    img.write_bytes(guest_image("xen/guests/evtchn_smp64.S"))
    d = Domain(DomainSpec(image=str(img), memory_mib=64, vcpus=2, native_hypercalls=native))
    try:
        m = d.machine
        m.set_boot_cpu(1, boot_cpu(m, d.boot, 1))
        done = threading.Event()
        m.exits.register_io_out(0xF0, lambda _r, _e: done.set())
        t0 = time.monotonic()
        d.start()
        while not done.wait(0.05):
            assert m.status is None and time.monotonic() - t0 < 60, m.status
        took = time.monotonic() - t0
        data = m.mem.read(SMP_DATA, 0x900)
        count0, count1, masked, ack = struct.unpack_from("<4Q", data, 0)
        nres = struct.unpack_from("<Q", data, 0x50)[0]
        counters = d.xen.counters()
        seen = {"count0": count0, "masked_count": masked, "ack": ack,
                "results": struct.unpack_from(f"<{nres}q", data, 0x100),
                "results1": struct.unpack_from(f"<{ROUNDS}q", data, 0x808),
                "evtchn_op": counters["hypercalls"]["event_channel_op"],
                "sends": counters["event_sends"], "untaken": sorted(d.xen.upcalls.untaken),
                "py_evtchn_op": d.xen.hypercalls.calls[EV]}
        return seen, took
    finally:
        d.close()


def test_two_vcpus_take_the_same_upcalls_both_ways(guest_image, tmp_path):
    """Upcalls really taken (to itself, through a loopback pair, after an unmask), none while
    masked, and a vCPU waiting in SCHEDOP_poll woken by each send from the other: the same
    with the native path on and off, and the wakes are prompt (a missed one costs the
    waiting vCPU up to a second)."""
    on, took_on = run_smp(guest_image, tmp_path, True)
    off, took_off = run_smp(guest_image, tmp_path, False)
    py_on, py_off = on.pop("py_evtchn_op"), off.pop("py_evtchn_op")
    assert on == off
    assert off["count0"] == 3 and off["masked_count"] == 2 and off["ack"] == ROUNDS
    assert set(off["results"]) == {0} and len(off["results"]) == 9 + ROUNDS
    assert set(off["results1"]) == {0}
    assert off["sends"] == 3 + ROUNDS and off["untaken"] == []
    assert py_off - py_on == 4 + ROUNDS          # every send and the unmask served in C
    assert took_on < 12 and took_off < 12     # with every wake missed: 20 s or more


def test_the_mirror_is_what_python_holds_after_a_restore(harness_factory, tmp_path):
    """A restored domain's C mirror holds what the saved domain's did: ports, vcpu_infos,
    upcall routes, shared_info's layout, the RAM segments."""
    a = harness_factory(64, vcpus=2)
    a.run(calls(a.put)[0])
    a.domain.pause()
    path = str(tmp_path / "evtchn.xls")
    a.domain.snapshot_save(path)
    b = harness_factory(64, vcpus=2)
    b.domain.snapshot_load(path)
    want, got = a.xen.native.events.describe(), b.xen.native.events.describe()
    assert got == want
    from xend_lite.xen import native

    assert want["ports"][IPI1] == (native.PORT_IPI, 1, 0)
    assert want["ports"][LOOP_B] == (native.PORT_UNBOUND, 1, 0)     # its other end closed
    # the daemon's side and VIRQs on vCPU 0 are sent by Python: to C, like a closed port
    assert 1 not in want["ports"] and VIRQ not in want["ports"]
    assert want["vcpus"][1][:2] == (native.VI_GPA, VCPU_INFO)
    assert want["vcpus"][0][2:] == (native.UPCALL_MSI, 0xF3)
    assert want["shared_info"] and want["segments"]



def test_a_restore_leaves_no_port_of_before_in_the_mirror(harness_factory, tmp_path):
    """A domain whose guest bound ports loads a snapshot of one that bound none: its C
    mirror then holds exactly the saved domain's ports (a stale entry would let C send on a
    port Python no longer has)."""
    a = harness_factory(64, vcpus=2)
    a.domain.pause()
    path = str(tmp_path / "none.xls")
    a.domain.snapshot_save(path)
    b = harness_factory(64, vcpus=2)
    b.run(calls(b.put)[0])
    assert b.xen.native.events.describe()["ports"] != a.xen.native.events.describe()["ports"]
    b.domain.pause()
    b.domain.snapshot_load(path)
    assert b.xen.native.events.describe()["ports"] == a.xen.native.events.describe()["ports"]


def test_an_upcall_c_fails_to_send_is_logged(harness_factory, caplog):
    """KVM_SIGNAL_MSI failing for an upcall sent in C (here: the VM's fd taken from the
    mirror) is counted there, with its errno, and logged by the timer thread's regular
    work, as Upcalls.inject logs its own; the send itself still answers 0 and sets the bit."""
    import logging

    h = harness_factory(64)
    put = h.put
    vec = put(SCRATCH, struct.pack("<IB", 0, 0xF3))
    ipi = put(SCRATCH + 0x20, struct.pack("<II", 0, 0))
    h.run([(HVM, X.HVMOP_set_evtchn_upcall_vector, vec), (EV, X.EVTCHNOP_bind_ipi, ipi)])
    port = struct.unpack("<I", h.mem.read(SCRATCH + 0x24, 4))[0]
    h.xen.native.set_fds(-1, [r.vcpu.fd for r in h.machine.runners])
    h.machine.stop()
    h.machine.rearm()
    from xend_lite.machine.loader import load_image

    load_image(h.machine, h.domain.image)
    sends = h.xen.counters()["event_sends"]
    assert h.run([(EV, SEND, h.put(SCRATCH + 0x40, struct.pack("<I", port)))]) == [(0, 0)]
    assert h.xen.counters()["event_sends"] == sends + 1 and h.xen.evtchn.is_pending(port)
    assert h.xen.native.msi_failures() == (1, 9)            # EBADF
    with caplog.at_level(logging.WARNING, logger="xend_lite.xen"):
        h.xen._tick()
        h.xen._tick()                                       # logged once
    logged = [r.getMessage() for r in caplog.records if "KVM_SIGNAL_MSI" in r.getMessage()]
    assert logged == ["1 upcall(s) sent by native event-channel calls failed: "
                      "KVM_SIGNAL_MSI: Bad file descriptor"]
