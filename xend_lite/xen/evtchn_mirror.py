"""Keeps the C mirror of the event channels (native.EventMirror) equal to the Python state,
so that EVTCHNOP_send and EVTCHNOP_unmask can be served on the calling vCPU's thread without
the GIL with the answers evtchn.py gives.

Each kind of state has one method, called wherever that state changes, under the
event-channel lock (the one writer): a port (bound, moved, closed), every port (reset,
restore), the memory map's RAM (the map's view changed), and how events reach each vCPU
(shared_info's layout, a vcpu_info registered, an upcall vector or the callback set).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xend_lite.xen import native
from xend_lite.xen.evtchn import DAEMON_DOMID
from xend_lite.xen.hvm import ROUTE_MSI, ROUTE_NONE
from xend_lite.xen.shinfo import LEGACY_VCPUS
from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.machine.memmap import MemoryMap
    from xend_lite.xen.evtchn import EventChannels, Port
    from xend_lite.xen.hvm import Upcalls
    from xend_lite.xen.shinfo import SharedInfo

def port_entry(p: Port | None) -> tuple[int, int, int]:
    """(kind, vCPU, remote port) of a port as the native send sees it."""
    if p is None:
        return native.PORT_PYTHON, 0, 0
    if p.state == X.EVTCHNSTAT_ipi:
        return native.PORT_IPI, p.vcpu, 0
    if p.state == X.EVTCHNSTAT_interdomain and p.remote_dom != DAEMON_DOMID:
        return native.PORT_LOOP, p.vcpu, p.remote_port
    if p.state == X.EVTCHNSTAT_unbound:
        return native.PORT_UNBOUND, p.vcpu, 0
    return native.PORT_PYTHON, p.vcpu, 0       # a VIRQ, or the daemon's side: Python sends


class EvtchnMirror:
    def __init__(self, events: native.EventMirror, evtchn: EventChannels, shinfo: SharedInfo,
                 upcalls: Upcalls, memmap: MemoryMap):
        self.events = events
        self.evtchn = evtchn
        self.shinfo = shinfo
        self.upcalls = upcalls
        self.memmap = memmap

    def port(self, n: int) -> None:
        self.events.set_port(n, *port_entry(self.evtchn.ports.get(n)))

    def all_ports(self) -> None:
        ev = self.events
        ev.clear_ports()
        for n, p in list(self.evtchn.ports.items()):
            ev.set_port(n, *port_entry(p))

    def memory(self) -> None:
        """Guest RAM as KVM's slots hold it (after every change of it). An overlay laid in
        place over RAM is read and written through the RAM's host address, as the guest
        sees it, so moving one leaves this alone; other overlays, holes and ballooned
        pages lie outside it, and C leaves an access there to Python."""
        with self.evtchn.lock:
            ev = self.events
            ev.begin()
            try:
                ev.set_segments(list(self.memmap.slot_ram))
            finally:
                ev.end()

    def delivery(self) -> None:
        """shared_info's layout and each vCPU's vcpu_info and upcall."""
        with self.evtchn.lock:
            ev = self.events
            sh, lay = self.shinfo, self.shinfo.layout
            ev.begin()
            try:
                ev.set_shared_info(sh.addr, lay.word, lay.nr_ports, lay.evtchn_pending,
                                   lay.evtchn_mask, lay.pending_sel, lay.upcall_pending)
                for v in range(ev.nr_vcpus):
                    gpa = sh.vcpu_info_gpa.get(v)
                    kind = native.VI_GPA if gpa is not None else \
                        native.VI_SHARED if v < LEGACY_VCPUS else native.VI_NONE
                    route, value = self.upcalls.route(v)
                    mode = native.UPCALL_MSI if route == ROUTE_MSI else \
                        native.UPCALL_NONE if route == ROUTE_NONE else native.UPCALL_PYTHON
                    ev.set_vcpu(v, kind, gpa or 0, mode, value if route == ROUTE_MSI else 0)
            finally:
                ev.end()

    def everything(self) -> None:
        with self.evtchn.lock:
            self.memory()
            self.delivery()
            self.all_ports()
