"""Who serves each hypercall: the one table. Every hypercall a guest may make is here with
the handler that answers it; a number not here gets -ENOSYS (-EPERM for the ones Xen keeps
for the control domain, hypercall.PRIVILEGED). All are served in Python on the calling vCPU's
thread, except the (call, sub-op) pairs in NATIVE: those are served in C inside the vCPU's
KVM_RUN loop, without the GIL (native.NativeHypercalls, the hook in _build.py), with the same
answers as the Python handler named here, which still serves them when the domain turns the
native path off (XenConfig.native_hypercalls). Hypercalls.served reports who serves what.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.xen.hypercall import Handler
    from xend_lite.xen.platform import XenPlatform


def hypercall_table(p: XenPlatform) -> dict[int, Handler]:
    return {
        X.__HYPERVISOR_xen_version: p.version.xen_version,            # version.py
        X.__HYPERVISOR_memory_op: p.memory.memory_op,                 # memory.py
        X.__HYPERVISOR_hvm_op: p.hvm.hvm_op,                          # hvm.py
        X.__HYPERVISOR_console_io: p.console.console_io,              # console.py
        X.__HYPERVISOR_sched_op: p.sched.sched_op,                    # sched.py
        X.__HYPERVISOR_sched_op_compat: p.sched.sched_op_compat,      # sched.py
        X.__HYPERVISOR_set_timer_op: p.sched.set_timer_op,            # sched.py
        X.__HYPERVISOR_event_channel_op: p.evtchn_ops.event_channel_op,   # evtchn_op.py
        X.__HYPERVISOR_grant_table_op: p.grants.grant_table_op,       # grant.py
        X.__HYPERVISOR_vcpu_op: p.vcpu_ops.vcpu_op,                   # vcpu_op.py
    }


#: calls served whole, whatever their first argument (set_timer_op's is a timeout), and the
#: "sub-op" they are listed with
WHOLE_CALLS = frozenset({X.__HYPERVISOR_set_timer_op})
WHOLE_CALL = 0

#: (call, sub-op) pairs served natively: hot calls whose answer needs values fixed at set-up
#: or the C mirror of the event channels (evtchn_mirror.py). A call from outside the guest
#: kernel always goes to Python, and so does any case the C code cannot finish exactly (see
#: each line), before it has changed anything.
NATIVE: frozenset[tuple[int, int]] = frozenset({
    (X.__HYPERVISOR_xen_version, X.XENVER_version),     # version.py: the version word
    (X.__HYPERVISOR_xen_version, X.XENVER_pagesize),    # version.py: PAGE_SIZE
    (X.__HYPERVISOR_sched_op, X.SCHEDOP_yield),         # sched.py: yield the host CPU, 0
    # evtchn.py's send on an IPI, loopback or unbound port, delivered through an MSI or not
    # at all; Python: VIRQ and daemon ports, bad ports and pointers, a GSI callback, no
    # shared_info, an argument or vcpu_info outside plain RAM
    (X.__HYPERVISOR_event_channel_op, X.EVTCHNOP_send),
    (X.__HYPERVISOR_event_channel_op, X.EVTCHNOP_unmask),   # evtchn.py's unmask, as above
    # the calling vCPU's one-shot timer (timers.py's, kept in C); Python: another vCPU's,
    # a pointer C cannot read, a deadline already passed that must be refused (-ETIME)
    (X.__HYPERVISOR_set_timer_op, WHOLE_CALL),          # sched.py: its argument is no sub-op
    (X.__HYPERVISOR_vcpu_op, X.VCPUOP_set_singleshot_timer),    # vcpu_op.py
    (X.__HYPERVISOR_vcpu_op, X.VCPUOP_stop_singleshot_timer),
})
