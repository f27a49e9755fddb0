"""event_channel_op: the guest's calls on its event channels (see evtchn.py for the channels).

Only the 2-level ABI is offered. The FIFO ABI's calls get the answers a Xen with FIFO event
channels turned off gives: their arguments are checked in Xen's order (a bad pointer -EFAULT,
a bad offset or frame -EINVAL, a bad vCPU -ENOENT) and a valid request is -EOPNOTSUPP, which
guests take as "use 2-level".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xend_lite.machine.backing import PAGE_SIZE
from xend_lite.xen.errors import XenError, inval
from xend_lite.xen.evtchn import PER_VCPU_VIRQS, EventChannels
from xend_lite.xen.hvm import self_domain
from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.machine.memmap import MemoryMap
    from xend_lite.xen.hypercall import Call

FIFO_CONTROL_BLOCK = 64      # sizeof(evtchn_fifo_control_block_t)
MAX_GFN = 1 << 40


class EvtchnOps:
    def __init__(self, domid: int, nr_vcpus: int, evtchn: EventChannels, memmap: MemoryMap):
        self.domid = domid
        self.nr_vcpus = nr_vcpus
        self.ev = evtchn
        self.memmap = memmap

    def _vcpu(self, vcpu: int) -> int:
        if vcpu >= self.nr_vcpus:
            raise XenError(X.XEN_ENOENT, "no such vcpu")
        return vcpu

    def event_channel_op(self, c: Call, cmd: int, arg: int) -> int:
        ev = self.ev
        if cmd == X.EVTCHNOP_send:
            ev.send(c.read("evtchn_send", arg)["port"])
            return 0
        if cmd == X.EVTCHNOP_unmask:
            ev.unmask(c.read("evtchn_unmask", arg)["port"])
            return 0
        if cmd == X.EVTCHNOP_alloc_unbound:
            lay = c.lay("evtchn_alloc_unbound")
            a = c.view.read_struct(lay, arg)
            self_domain(a["dom"], self.domid)
            remote = a["remote_dom"]          # any domain may bind later: Xen does not check
            port = ev.alloc_unbound(self.domid if remote == X.DOMID_SELF else remote)
            c.view.write_fields(lay, arg, {"port": port})
            return 0
        if cmd == X.EVTCHNOP_bind_interdomain:
            lay = c.lay("evtchn_bind_interdomain")
            a = c.view.read_struct(lay, arg)
            port = ev.bind_interdomain(a["remote_dom"], a["remote_port"], self.domid)
            c.view.write_fields(lay, arg, {"local_port": port})
            return 0
        if cmd == X.EVTCHNOP_bind_virq:
            lay = c.lay("evtchn_bind_virq")
            a = c.view.read_struct(lay, arg)
            virq, vcpu = a["virq"], a["vcpu"]
            if virq >= X.NR_VIRQS:
                raise inval("no such VIRQ")
            if virq not in PER_VCPU_VIRQS and vcpu != 0:
                raise inval("a global VIRQ binds on vcpu 0")
            port = ev.bind_virq(virq, self._vcpu(vcpu))
            c.view.write_fields(lay, arg, {"port": port})
            return 0
        if cmd == X.EVTCHNOP_bind_ipi:
            lay = c.lay("evtchn_bind_ipi")
            a = c.view.read_struct(lay, arg)
            port = ev.bind_ipi(self._vcpu(a["vcpu"]))
            c.view.write_fields(lay, arg, {"port": port})
            return 0
        if cmd == X.EVTCHNOP_close:
            ev.close(c.read("evtchn_close", arg)["port"])
            return 0
        if cmd == X.EVTCHNOP_status:
            return self._status(c, arg)
        if cmd == X.EVTCHNOP_bind_vcpu:
            a = c.read("evtchn_bind_vcpu", arg)
            ev.bind_vcpu(a["port"], self._vcpu(a["vcpu"]))
            return 0
        if cmd == X.EVTCHNOP_reset:
            self_domain(c.view.read_uint(arg, 2), self.domid)
            ev.reset()
            return 0
        if cmd == X.EVTCHNOP_init_control:
            return self._init_control(c, arg)
        if cmd == X.EVTCHNOP_expand_array:
            c.view.read(arg, 8)
            raise XenError(X.XEN_EOPNOTSUPP, "FIFO event channels are not in use")
        if cmd == X.EVTCHNOP_set_priority:
            a = c.read("evtchn_set_priority", arg)
            ev.get(a["port"])
            raise XenError(X.XEN_ENOSYS, "the 2-level ABI has no priorities")
        if cmd == X.EVTCHNOP_bind_pirq:
            raise XenError(X.XEN_EPERM, "no physical IRQs")
        raise XenError(X.XEN_ENOSYS, "unknown event_channel_op")

    def _init_control(self, c: Call, arg: int) -> int:
        a = c.read("evtchn_init_control", arg)
        if a["offset"] & 7 or a["offset"] > PAGE_SIZE - FIFO_CONTROL_BLOCK:
            raise inval("control block offset")
        self._vcpu(a["vcpu"])
        gfn = a["control_gfn"]
        if gfn >= MAX_GFN or not self.memmap.is_ram_page(gfn):
            raise inval("control block frame is not RAM")
        raise XenError(X.XEN_EOPNOTSUPP, "only the 2-level event channel ABI is offered")

    def _status(self, c: Call, arg: int) -> int:
        lay = c.lay("evtchn_status")
        a = c.view.read_struct(lay, arg)
        self_domain(a["dom"], self.domid)
        p = self.ev.status(a["port"])
        out = bytearray(c.view.read(arg, 24))
        status = X.EVTCHNSTAT_closed if p is None else p.state
        vcpu = 0 if p is None else p.vcpu
        out[8:12] = status.to_bytes(4, "little")
        out[12:16] = vcpu.to_bytes(4, "little")
        u = bytearray(8)
        if p is not None:
            if status == X.EVTCHNSTAT_unbound:
                u[0:2] = (p.remote_dom & 0xFFFF).to_bytes(2, "little")
            elif status == X.EVTCHNSTAT_interdomain:
                u[0:2] = (p.remote_dom & 0xFFFF).to_bytes(2, "little")
                u[4:8] = p.remote_port.to_bytes(4, "little")
            elif status == X.EVTCHNSTAT_virq:
                u[0:4] = p.virq.to_bytes(4, "little")
        out[16:24] = u
        c.view.write(arg + 8, bytes(out[8:24]))
        return 0
