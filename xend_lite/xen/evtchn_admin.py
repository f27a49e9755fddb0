"""The operator's view of the event channels: the listing and injection QMP names
xen-event-list and xen-event-inject.

Each in-use port is described as QMP's EvtchnInfo: port, vcpu, type (closed, unbound,
interdomain, pirq, virq, ipi), remote-domain ("xend-lite" for the daemon's own end,
"loopback" for a port bound to another port of this domain, the remote domain's id as a
string for an unbound port, "" otherwise), target (the remote port, the VIRQ or 0), pending
and masked (the bits in shared_info). Injection sets the port pending and delivers it as a
send from its remote end would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xend_lite.errors import InvalidArgument, NotFound
from xend_lite.xen.evtchn import DAEMON_DOMID, STATE_NAMES
from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.xen.evtchn import EventChannels, Port

DAEMON_NAME = "xend-lite"


def _remote(p: Port) -> tuple[str, int]:
    if p.state == X.EVTCHNSTAT_interdomain:
        return (DAEMON_NAME if p.remote_dom == DAEMON_DOMID else "loopback"), p.remote_port
    if p.state == X.EVTCHNSTAT_unbound:
        return str(p.remote_dom), 0
    if p.state == X.EVTCHNSTAT_virq:
        return "", max(p.virq, 0)
    return "", 0


def event_list(ev: EventChannels) -> list[dict]:
    """Every port in use, in port order (EvtchnInfo each)."""
    out = []
    with ev.lock:
        ports = sorted(ev.ports.items())
        for n, p in ports:
            remote, target = _remote(p)
            out.append({"port": n, "vcpu": p.vcpu, "type": STATE_NAMES.get(p.state, "closed"),
                        "remote-domain": remote, "target": target,
                        "pending": ev.is_pending(n), "masked": ev.is_masked(n)})
    return out


def check_port(ev: EventChannels, port: int) -> None:
    """InvalidArgument for a port outside the ABI's range, NotFound for a closed one."""
    if not ev.valid(port):
        raise InvalidArgument(f"port {port} is out of range (1..{ev.max_ports() - 1})")
    if port not in ev.ports:
        raise NotFound(f"port {port} is closed")


def event_inject(ev: EventChannels, port: int) -> None:
    """Set ``port`` pending and deliver the upcall unless it is masked (any thread)."""
    with ev.machine.host_access(), ev.lock:
        check_port(ev, port)
        ev.raise_port(port)
