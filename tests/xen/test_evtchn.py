"""Event channels, polling, timers and vcpu_op from real guests."""

from __future__ import annotations

import struct

import pytest

from tests.xen.conftest import SCRATCH, errno
from xend_lite.xen.xenabi import X
from xend_lite.xen.abi import SHINFO32, SHINFO64

pytestmark = pytest.mark.kvm

EV = X.__HYPERVISOR_event_channel_op
SCHED = X.__HYPERVISOR_sched_op
VCPU = X.__HYPERVISOR_vcpu_op
MEM = X.__HYPERVISOR_memory_op
HVM = X.__HYPERVISOR_hvm_op


def test_fifo_control_gets_xens_answers_in_xens_order(harness):
    """EVTCHNOP_init_control is checked as Xen checks it (offset, vCPU, frame) and a valid
    request is refused as a Xen with FIFO event channels off refuses it; guests then use the
    2-level ABI."""
    h, m, p = harness, harness.mem, harness.ptr
    gfn = SCRATCH >> 12
    m.write(SCRATCH + 0x00, struct.pack("<QIIB", gfn, 0, 0, 0))            # valid
    m.write(SCRATCH + 0x20, struct.pack("<QIIB", gfn, 4, 0, 0))            # offset not 8-aligned
    m.write(SCRATCH + 0x40, struct.pack("<QIIB", gfn, 4096 - 32, 0, 0))    # block past the page
    m.write(SCRATCH + 0x60, struct.pack("<QIIB", gfn, 0, 9, 0))            # no vCPU 9
    m.write(SCRATCH + 0x80, struct.pack("<QIIB", 1 << 36, 0, 0, 0))        # frame not RAM
    m.write(SCRATCH + 0xa0, struct.pack("<II", 1, 0))                      # set_priority, port 1
    m.write(SCRATCH + 0xb0, struct.pack("<II", 999, 0))                    # set_priority, bad port
    res = h.run([(EV, X.EVTCHNOP_init_control, p(SCRATCH + o)) for o in (0, 0x20, 0x40, 0x60, 0x80)]
                + [(EV, X.EVTCHNOP_init_control, 0xFFFFF000),
                   (EV, X.EVTCHNOP_expand_array, p(SCRATCH)),
                   (EV, X.EVTCHNOP_set_priority, p(SCRATCH + 0xa0)),
                   (EV, X.EVTCHNOP_set_priority, p(SCRATCH + 0xb0))])
    assert [r for r, _ in res] == [errno("EOPNOTSUPP"), errno("EINVAL"), errno("EINVAL"),
                                   errno("ENOENT"), errno("EINVAL"), errno("EFAULT"),
                                   errno("EOPNOTSUPP"), errno("ENOSYS"), errno("EINVAL")]


def test_ports_bind_send_status_close(harness):
    h, m, p = harness, harness.mem, harness.ptr
    m.write(SCRATCH + 0x00, struct.pack("<HHI", X.DOMID_SELF, 0, 0))          # alloc_unbound
    m.write(SCRATCH + 0x10, struct.pack("<III", X.VIRQ_TIMER, 0, 0))         # bind_virq
    m.write(SCRATCH + 0x20, struct.pack("<III", X.VIRQ_TIMER, 0, 0))         # again: EEXIST
    m.write(SCRATCH + 0x30, struct.pack("<II", 0, 0))                        # bind_ipi vcpu0
    m.write(SCRATCH + 0x40, struct.pack("<II", 5, 0))                        # bind_ipi vcpu5
    m.write(SCRATCH + 0x50, struct.pack("<III", X.NR_VIRQS, 0, 0))           # bad virq
    m.write(SCRATCH + 0x60, struct.pack("<HHIII", X.DOMID_SELF, 0, 0, 0, 0))  # status port (set below)
    m.write(SCRATCH + 0x80, struct.pack("<I", 4000000))                      # close bad port
    m.write(SCRATCH + 0x90, struct.pack("<HHIII", X.DOMID_SELF, 0, 1, 0, 0))  # status of store port
    res = h.run([
        (EV, X.EVTCHNOP_alloc_unbound, p(SCRATCH)),
        (EV, X.EVTCHNOP_bind_virq, p(SCRATCH + 0x10)),
        (EV, X.EVTCHNOP_bind_virq, p(SCRATCH + 0x20)),
        (EV, X.EVTCHNOP_bind_ipi, p(SCRATCH + 0x30)),
        (EV, X.EVTCHNOP_bind_ipi, p(SCRATCH + 0x40)),
        (EV, X.EVTCHNOP_bind_virq, p(SCRATCH + 0x50)),
        (EV, X.EVTCHNOP_close, p(SCRATCH + 0x80)),
        (EV, X.EVTCHNOP_status, p(SCRATCH + 0x90)),
        (EV, X.EVTCHNOP_init_control, p(SCRATCH + 0xa0)),
        (EV, 99, 0),
        (EV, X.EVTCHNOP_send, 0xFFFFF000),
    ])
    assert [r for r, _ in res] == [0, 0, errno("EEXIST"), 0, errno("ENOENT"), errno("EINVAL"),
                                   errno("EINVAL"), 0, errno("EINVAL"), errno("ENOSYS"),
                                   errno("EFAULT")]
    unbound = struct.unpack("<I", m.read(SCRATCH + 4, 4))[0]
    virq = struct.unpack("<I", m.read(SCRATCH + 0x18, 4))[0]
    ipi = struct.unpack("<I", m.read(SCRATCH + 0x34, 4))[0]
    assert len({unbound, virq, ipi}) == 3 and 0 not in (unbound, virq, ipi)
    # the store port (1) is bound to the daemon's side (domain 0)
    status, vcpu, dom, rport = struct.unpack("<IIHxxI", m.read(SCRATCH + 0x98, 16))
    assert status == X.EVTCHNSTAT_interdomain and dom == 0 and rport > 0
    ev = h.xen.evtchn
    assert ev.ports[unbound].state == X.EVTCHNSTAT_unbound
    assert ev.ports[virq].virq == X.VIRQ_TIMER


def test_send_sets_pending_and_upcall_and_unmask_redelivers(harness_factory, bits):
    h = harness_factory(bits)
    m, p = h.mem, h.ptr
    lay = SHINFO64 if bits == 64 else SHINFO32
    # map shared_info at 8 MiB, set a callback vector, bind an IPI, mask it, send, unmask
    xatp = struct.pack("<HHIQQ", X.DOMID_SELF, 0, X.XENMAPSPACE_shared_info, 0, 0x800) if bits == 64 \
        else struct.pack("<HHIII", X.DOMID_SELF, 0, X.XENMAPSPACE_shared_info, 0, 0x800)
    m.write(SCRATCH, xatp)
    m.write(SCRATCH + 0x40, struct.pack("<HHIQ", X.DOMID_SELF, 0, X.HVM_PARAM_CALLBACK_IRQ, 2 << 56 | 0xf3))
    m.write(SCRATCH + 0x60, struct.pack("<II", 0, 0))
    h.run([(MEM, X.XENMEM_add_to_physmap, p(SCRATCH)), (HVM, X.HVMOP_set_param, p(SCRATCH + 0x40)),
           (EV, X.EVTCHNOP_bind_ipi, p(SCRATCH + 0x60))])
    port = struct.unpack("<I", m.read(SCRATCH + 0x64, 4))[0]
    sh = 0x800000
    word, bit = divmod(port, lay.bits)
    pending = lambda: int.from_bytes(m.read(sh + lay.evtchn_pending + word * lay.word, lay.word), "little") >> bit & 1
    upcall = lambda: m.read(sh + lay.upcall_pending, 1)[0]
    sel = lambda: int.from_bytes(m.read(sh + lay.pending_sel, lay.word), "little") >> word & 1
    h.machine.pause()
    # mask the port in shared_info (as a guest does), then send from the host side
    mask_off = sh + lay.evtchn_mask + word * lay.word
    m.write(mask_off, (1 << bit).to_bytes(lay.word, "little"))
    h.xen.evtchn.send(port)
    assert pending() == 1 and upcall() == 0 and sel() == 0, "a masked port raises no upcall"
    h.xen.evtchn.unmask(port)
    assert upcall() == 1 and sel() == 1
    assert h.xen.evtchn.sends == 1
    h.machine.resume()


def test_alloc_unbound_until_full(harness_factory):
    h = harness_factory(32)     # 32-bit: 1024 ports in the 2-level ABI
    h.run([])
    ev = h.xen.evtchn
    n = 0
    with pytest.raises(Exception) as e:
        while True:
            ev.alloc_unbound(0)
            n += 1
    assert getattr(e.value, "errno", None) == X.XEN_ENOSPC
    assert len(ev.ports) == 1023 and n == 1023 - 2   # ports 1..1023; store and console first


def test_timer_and_poll_through_guest(harness):
    """set_timer_op arms VIRQ_TIMER; SCHEDOP_poll on the timer port returns when it fires;
    a poll with nothing pending and a past timeout returns at once; too many ports is EINVAL;
    a port out of range is EINVAL."""
    h, m, p = harness, harness.mem, harness.ptr
    m.write(SCRATCH, struct.pack("<III", X.VIRQ_TIMER, 0, 0))
    h.run([(EV, X.EVTCHNOP_bind_virq, p(SCRATCH))])
    port = struct.unpack("<I", m.read(SCRATCH + 8, 4))[0]
    h.machine.stop()
    h.machine.rearm()
    from xend_lite.machine.loader import load_image

    load_image(h.machine, h.domain.image)
    now = h.xen.clock.now()
    m.write(SCRATCH + 0x100, struct.pack("<I", port))

    def poll(at, n, timeout, ports=SCRATCH + 0x100):
        if h.bits == 64:
            m.write(at, struct.pack("<QIIQ", p(ports), n, 0, timeout))
        else:
            m.write(at, struct.pack("<IIQ", p(ports), n, timeout))
    poll(SCRATCH + 0x200, 1, 0)                      # wait for the timer, no timeout
    poll(SCRATCH + 0x240, 0, 1)                      # nothing, timeout long past
    poll(SCRATCH + 0x280, 129, 0)                    # too many ports
    m.write(SCRATCH + 0x300, struct.pack("<I", 1 << 20))
    poll(SCRATCH + 0x2c0, 1, 0, ports=SCRATCH + 0x300)   # port out of range
    deadline = now + 300_000_000                     # 0.3 s from now
    set_timer = (X.__HYPERVISOR_set_timer_op, deadline) if h.bits == 64 else \
        (X.__HYPERVISOR_set_timer_op, deadline & 0xFFFFFFFF, deadline >> 32)
    import time

    t0 = time.monotonic()
    res = h.run([set_timer, (SCHED, X.SCHEDOP_poll, p(SCRATCH + 0x200)),
                 (SCHED, X.SCHEDOP_poll, p(SCRATCH + 0x240)),
                 (SCHED, X.SCHEDOP_poll, p(SCRATCH + 0x280)),
                 (SCHED, X.SCHEDOP_poll, p(SCRATCH + 0x2c0))])
    took = time.monotonic() - t0
    assert [r for r, _ in res] == [0, 0, 0, errno("EINVAL"), errno("EINVAL")]
    assert all(f == 0 for _, f in res)
    assert h.xen.evtchn.is_pending(port)
    assert took >= 0.2, f"poll returned before the timer fired ({took:.3f}s)"


def test_vcpu_op(harness):
    h, m, p = harness, harness.mem, harness.ptr
    now = h.xen.clock.now()
    m.write(SCRATCH, struct.pack("<QII", 0x900, 0x40, 0))               # register_vcpu_info
    m.write(SCRATCH + 0x20, struct.pack("<QII", 0x900, 4090, 0))        # does not fit
    m.write(SCRATCH + 0x40, struct.pack("<QI", 1, X.VCPU_SSHOTTMR_future))  # in the past
    m.write(SCRATCH + 0x60, struct.pack("<QI", now + 10**12, 0))
    m.write(SCRATCH + 0x80, struct.pack("<Q", 999_999))                 # period under 1 ms
    m.write(SCRATCH + 0x88, struct.pack("<Q", 1 << 62))                 # past STIME_DELTA_MAX
    m.write(SCRATCH + 0x90, struct.pack("<Q", 10**12))                  # 1000 s
    res = h.run([
        (VCPU, X.VCPUOP_is_up, 0, 0),
        (VCPU, X.VCPUOP_is_up, 3, 0),
        (VCPU, X.VCPUOP_register_vcpu_info, 0, p(SCRATCH + 0x20)),
        (VCPU, X.VCPUOP_register_vcpu_info, 0, p(SCRATCH)),
        (VCPU, X.VCPUOP_register_vcpu_info, 0, p(SCRATCH)),
        (VCPU, X.VCPUOP_set_singleshot_timer, 0, p(SCRATCH + 0x40)),
        (VCPU, X.VCPUOP_set_singleshot_timer, 0, p(SCRATCH + 0x60)),
        (VCPU, X.VCPUOP_stop_singleshot_timer, 0, 0),
        (VCPU, X.VCPUOP_set_periodic_timer, 0, p(SCRATCH + 0x80)),
        (VCPU, X.VCPUOP_set_periodic_timer, 0, p(SCRATCH + 0x88)),
        (VCPU, X.VCPUOP_set_periodic_timer, 0, 0xFFFF_F000),            # not mapped: EFAULT
        (VCPU, X.VCPUOP_set_periodic_timer, 0, p(SCRATCH + 0x90)),
        (VCPU, X.VCPUOP_stop_periodic_timer, 0, 0),
        (VCPU, 77, 0, 0),
    ])
    assert [r for r, _ in res] == [1, errno("ENOENT"), errno("EINVAL"), 0, errno("EINVAL"),
                                   errno("ETIME"), 0, 0, errno("EINVAL"), errno("EINVAL"),
                                   errno("EFAULT"), 0, 0, errno("ENOSYS")]
    assert h.xen.timers.periodics() == {}
    assert h.xen.shinfo.vcpu_info_gpa[0] == 0x900040
    # the registered vcpu_info carries live time: version even and non-zero, system time set
    ver, _, tsc, systime = struct.unpack("<IIQQ", m.read(0x900040 + 32, 24))
    assert ver and ver % 2 == 0 and systime > 0
    assert h.xen.timers.deadline(0) is None


def test_periodic_timer_raises_virq_timer_every_period(harness):
    """VCPUOP_set_periodic_timer: VIRQ_TIMER again and again, a period apart, until stopped."""
    import time

    h, m, p = harness, harness.mem, harness.ptr
    m.write(SCRATCH, struct.pack("<III", X.VIRQ_TIMER, 0, 0))
    m.write(SCRATCH + 0x20, struct.pack("<Q", 20_000_000))             # 20 ms
    fired = []
    raise_virq = h.xen.evtchn.raise_virq

    def counting(vcpu, virq):
        fired.append((time.monotonic(), vcpu, virq))
        raise_virq(vcpu, virq)
    h.xen.evtchn.raise_virq = counting
    res = h.run([(EV, X.EVTCHNOP_bind_virq, p(SCRATCH)),
                 (VCPU, X.VCPUOP_set_periodic_timer, 0, p(SCRATCH + 0x20))])
    assert [r for r, _ in res] == [0, 0]
    port = struct.unpack("<I", m.read(SCRATCH + 8, 4))[0]
    time.sleep(0.25)
    ticks = list(fired)
    # saved with the vCPU: its period and next expiry, about a period from now
    (period, expiry), = h.xen.persist.save()["xen"].periodic.values()
    assert period == 20_000_000 and abs(expiry - h.xen.clock.now()) <= 60_000_000
    assert 5 <= len(ticks) <= 14, ticks                   # about 12 in 250 ms
    assert {(v, q) for _, v, q in ticks} == {(0, X.VIRQ_TIMER)}
    gaps = [b[0] - a[0] for a, b in zip(ticks, ticks[1:])]
    assert min(gaps) >= 0.015, gaps                       # never faster than the period
    assert h.xen.evtchn.is_pending(port)
    h.xen.timers.stop_periodic(0)
    time.sleep(0.05)
    n = len(fired)
    time.sleep(0.1)
    assert len(fired) == n                                 # stopped: no more


def test_block_yield_and_upcall_vector(harness):
    h, m, p = harness, harness.mem, harness.ptr
    m.write(SCRATCH, struct.pack("<IB3x", 0, 0xf3))
    m.write(SCRATCH + 0x10, struct.pack("<IB3x", 0, 0x05))
    m.write(SCRATCH + 0x20, struct.pack("<IB3x", 9, 0xf3))
    res = h.run([(SCHED, X.SCHEDOP_block, 0), (SCHED, X.SCHEDOP_yield, 0),
                 (HVM, X.HVMOP_set_evtchn_upcall_vector, p(SCRATCH)),
                 (HVM, X.HVMOP_set_evtchn_upcall_vector, p(SCRATCH + 0x10)),
                 (HVM, X.HVMOP_set_evtchn_upcall_vector, p(SCRATCH + 0x20)),
                 (X.__HYPERVISOR_sched_op_compat, X.SCHEDOP_yield, 0)])
    assert [r for r, _ in res] == [0, 0, 0, errno("EINVAL"), errno("ENOENT"), 0]
    assert h.xen.upcalls.vectors == {0: 0xf3}


def test_forcing_the_kernel_backend_is_a_clear_error_here(harness_factory):
    from xend_lite.errors import NotSupported
    from xend_lite.kvm import CAPABILITIES, Kvm

    with Kvm() as kvm:
        if kvm.check_extension(CAPABILITIES["xen_hvm"]):
            pytest.skip("this host's KVM has Xen support (KVM_CAP_XEN_HVM)")
    with pytest.raises(NotSupported, match="kvm-xen"):
        harness_factory(64, backend="kvm-xen")


def test_event_reaches_the_guest_as_its_upcall_interrupt(run_to_done):
    d = run_to_done("xen/guests/upcall64.S")
    count, port = struct.unpack("<QQ", d.machine.mem.read(0x300000, 16))
    assert port > 0 and count >= 1, (count, port)
    assert d.xen.evtchn.is_pending(port)
    assert d.xen.params[X.HVM_PARAM_CALLBACK_IRQ] == 2 << 56 | 0xF3

def test_bind_interdomain_to_the_daemon_side_and_echo(harness):
    h, m, p = harness, harness.mem, harness.ptr
    offered = h.xen.evtchn.daemon_offer()
    m.write(SCRATCH, struct.pack("<HxxII", 0, offered, 0))          # bind_interdomain
    m.write(SCRATCH + 0x10, struct.pack("<HxxII", 0, offered, 0))   # again: taken
    m.write(SCRATCH + 0x20, struct.pack("<HxxII", 9, 1, 0))         # no such domain
    m.write(SCRATCH + 0x30, struct.pack("<HHI", X.DOMID_SELF, X.DOMID_SELF, 0))  # loopback
    res = h.run([(EV, X.EVTCHNOP_bind_interdomain, p(SCRATCH)),
                 (EV, X.EVTCHNOP_bind_interdomain, p(SCRATCH + 0x10)),
                 (EV, X.EVTCHNOP_bind_interdomain, p(SCRATCH + 0x20)),
                 (EV, X.EVTCHNOP_alloc_unbound, p(SCRATCH + 0x30))])
    assert [r for r, _ in res] == [0, errno("EINVAL"), errno("ESRCH"), 0]
    local = struct.unpack("<I", m.read(SCRATCH + 8, 4))[0]
    ev = h.xen.evtchn
    assert ev.ports[local].state == X.EVTCHNSTAT_interdomain and ev.daemon_ports[offered] == local
    assert not ev.is_pending(local)
    ev.send(local)                      # the daemon's side answers by raising the port
    assert ev.is_pending(local)
    ev.close(local)
    assert ev.daemon_ports[offered] is None, "closing frees the daemon's end for a new bind"
    # a port bound to another of the guest's own ports delivers there
    unbound = struct.unpack("<I", m.read(SCRATCH + 0x34, 4))[0]
    a = ev.bind_interdomain(X.DOMID_SELF, unbound, h.xen.domid)
    ev.send(a)
    assert ev.is_pending(unbound)


def test_callback_vector_upcalls_reach_a_guest_that_does_not_eoi(run_to_done):
    """The domain's callback vector, as a guest without a per-vCPU vector takes it: a
    handler that never EOIs still gets the next upcall, and one raised while it halts."""
    d = run_to_done("xen/guests/upcall_noeoi64.S")
    count = struct.unpack("<Q", d.machine.mem.read(0x300000, 8))[0]
    assert count == 3, f"{count} of 3 upcalls reached the guest"
    assert d.xen.params[X.HVM_PARAM_CALLBACK_IRQ] == 2 << 56 | 0xF3

