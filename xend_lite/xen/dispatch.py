"""Who serves each hypercall: the one table. Every hypercall a guest may make is here with
the handler that answers it; a number not here gets -ENOSYS (-EPERM for the ones Xen keeps
for the control domain, hypercall.PRIVILEGED). All are served in Python on the calling vCPU's
thread (Hypercalls.served reports the same).
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
