"""vcpu_op: where a vCPU's vcpu_info lives, whether a vCPU is up, and its timers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xend_lite.machine.backing import PAGE_SHIFT, PAGE_SIZE
from xend_lite.xen.abi import PERIODIC_MAX_NS, PERIODIC_MIN_NS
from xend_lite.xen.errors import XenError, inval
from xend_lite.xen.shinfo import VCPU_INFO_SIZE
from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.machine.machine import Machine
    from xend_lite.xen.evtchn import EventChannels
    from xend_lite.xen.hypercall import Call
    from xend_lite.xen.runstate import Runstates
    from xend_lite.xen.shinfo import SharedInfo
    from xend_lite.xen.timekeeping import Clock
    from xend_lite.xen.timers import Timers
    from xend_lite.xen.vcputime import VcpuTime

MAX_GFN = 1 << 40


class VcpuOps:
    def __init__(self, machine: Machine, shinfo: SharedInfo, time: VcpuTime, clock: Clock,
                 timers: Timers, runstates: Runstates, evtchn: EventChannels):
        self.machine = machine
        self.nr_vcpus = len(machine.runners)
        self.shinfo = shinfo
        self.time = time
        self.clock = clock
        self.timers = timers
        self.runstates = runstates
        self.evtchn = evtchn

    def is_up(self, vcpu: int) -> bool:
        return vcpu == 0 or self.machine.runners[vcpu].started

    def vcpu_op(self, c: Call, cmd: int, vcpuid: int, arg: int) -> int:
        if vcpuid >= self.nr_vcpus:
            raise XenError(X.XEN_ENOENT, "no such vcpu")
        if cmd == X.VCPUOP_register_vcpu_info:
            return self._register_vcpu_info(c, vcpuid, arg)
        if cmd == X.VCPUOP_register_runstate_memory_area:
            return self.runstates.register(c, vcpuid, arg)
        if cmd == X.VCPUOP_is_up:
            return 1 if self.is_up(vcpuid) else 0
        if cmd == X.VCPUOP_set_singleshot_timer:
            if vcpuid != c.index:
                raise inval("only the calling vcpu's timer")
            t = c.read("vcpu_set_singleshot_timer", arg)
            if t["flags"] & X.VCPU_SSHOTTMR_future and t["timeout_abs_ns"] < self.clock.now():
                raise XenError(X.XEN_ETIME, "timeout already passed")
            self.timers.set(vcpuid, t["timeout_abs_ns"])
            return 0
        if cmd == X.VCPUOP_stop_singleshot_timer:
            if vcpuid != c.index:
                raise inval("only the calling vcpu's timer")
            self.timers.stop(vcpuid)
            return 0
        if cmd == X.VCPUOP_set_periodic_timer:     # any vCPU of the domain, as in Xen
            period = c.read("vcpu_set_periodic_timer", arg)["period_ns"]
            if not PERIODIC_MIN_NS <= period <= PERIODIC_MAX_NS:
                raise inval("periodic timer period must be 1 ms or more")
            self.timers.set_periodic(vcpuid, period)
            return 0
        if cmd == X.VCPUOP_stop_periodic_timer:
            self.timers.stop_periodic(vcpuid)
            return 0
        raise XenError(X.XEN_ENOSYS, "vcpu_op not offered")

    def _register_vcpu_info(self, c: Call, vcpuid: int, arg: int) -> int:
        r = c.read("vcpu_register_vcpu_info", arg)
        if r["offset"] + VCPU_INFO_SIZE > PAGE_SIZE or r["rsvd"]:
            raise inval("vcpu_info must fit in its page")
        if vcpuid in self.shinfo.vcpu_info_gpa:
            raise inval("vcpu_info already registered")
        gfn = r["mfn"]
        if gfn >= MAX_GFN or not self.machine.memmap.is_ram_page(gfn):
            raise inval("vcpu_info frame is not RAM")
        self.shinfo.register_vcpu_info(vcpuid, (gfn << PAGE_SHIFT) + r["offset"])
        self.evtchn.mark_events_pending(vcpuid)
        self.time.publish_from(c.vcpu)
        self.timers.start_refresh()
        return 0
