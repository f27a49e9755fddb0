"""Event channels, 2-level ABI: ports, their bindings, and delivery into shared_info.

A port is unbound (waiting for a remote end), interdomain (bound to the daemon's side,
domain 0, or to another port of this domain), a VIRQ or an IPI. Pending and mask bits live in
shared_info; raising a port sets its pending bit and, unless masked, its selector bit in the
target vCPU's vcpu_info and the upcall flag, then injects the upcall. Bit updates are atomic,
because the guest changes the same words with locked instructions at the same time.

The daemon's side (domain 0) serves its ports with backends (the console, xenstore): a send
on a port bound to a daemon port runs that port's backend; a daemon port without a backend
answers by raising the guest's port again, an echo that lets a guest see a round trip.

Locking: ``lock`` guards the port tables and each delivery. Backends are called after it is
released (they take their own locks, and raise ports themselves). Threads other than the
vCPUs and the owner hold machine.host_access() around a delivery (a registered vcpu_info
lies in guest RAM); take it before ``lock``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable

from xend_lite.record import Record
from xend_lite.xen.errors import XenError
from xend_lite.xen.native import atomic_and64, atomic_or64, atomic_xchg8
from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.machine.machine import Machine
    from xend_lite.xen.evtchn_mirror import EvtchnMirror
    from xend_lite.xen.hvm import Upcalls
    from xend_lite.xen.shinfo import SharedInfo

DAEMON_DOMID = 0
# VIRQs each vCPU binds for itself (timer, debug, xenoprof, xenpmu); the rest are global
PER_VCPU_VIRQS = {X.VIRQ_TIMER, X.VIRQ_DEBUG, 10, 13}
STATE_NAMES = {X.EVTCHNSTAT_closed: "closed", X.EVTCHNSTAT_unbound: "unbound",
               X.EVTCHNSTAT_interdomain: "interdomain", X.EVTCHNSTAT_pirq: "pirq",
               X.EVTCHNSTAT_virq: "virq", X.EVTCHNSTAT_ipi: "ipi"}


class Port(Record):
    __slots__ = ("state", "vcpu", "virq", "remote_dom", "remote_port")

    def __init__(self, state: int, vcpu: int = 0, virq: int = -1, remote_dom: int = 0,
                 remote_port: int = 0):
        self.state = state
        self.vcpu = vcpu
        self.virq = virq
        self.remote_dom = remote_dom
        self.remote_port = remote_port

    def describe(self) -> dict:
        d = {"state": STATE_NAMES.get(self.state, "closed"), "vcpu": self.vcpu}
        if self.state == X.EVTCHNSTAT_virq:
            d["virq"] = self.virq
        if self.state in (X.EVTCHNSTAT_unbound, X.EVTCHNSTAT_interdomain):
            d["remote_dom"] = self.remote_dom
        if self.state == X.EVTCHNSTAT_interdomain:
            d["remote_port"] = self.remote_port
        return d


def _bit_op(op: Callable[[int, int], int], addr: int, bit: int, word: int, set_: bool) -> bool:
    """Atomically set or clear bit ``bit`` of the ``word``-byte little-endian word at
    ``addr``; True if it was set before."""
    if word == 4:
        base = addr & ~7
        bit += (addr - base) * 8
        addr = base
    mask = 1 << bit if set_ else ~(1 << bit) & (1 << 64) - 1
    return bool(op(addr, mask) >> bit & 1)


def _or_bit(addr: int, bit: int, word: int) -> bool:
    return _bit_op(atomic_or64, addr, bit, word, True)


def _clear_bit(addr: int, bit: int, word: int) -> bool:
    return _bit_op(atomic_and64, addr, bit, word, False)


class EventChannels:
    def __init__(self, machine: Machine, shinfo: SharedInfo, upcalls: Upcalls):
        self.machine = machine
        self.shinfo = shinfo
        self.upcalls = upcalls
        self.lock = threading.RLock()
        self.ports: dict[int, Port] = {}
        self.virqs: dict[tuple[int, int], int] = {}      # (vcpu, virq) -> port
        self.daemon_ports: dict[int, int | None] = {}    # daemon-side port -> guest port or None
        self.backends: dict[int, Callable[[], None]] = {}   # daemon-side port -> its backend
        self._sends = 0
        # the C copy the native send and unmask read (set by the platform), and how many
        # sends they served
        self.mirror: EvtchnMirror | None = None
        self.native_sends: Callable[[], int] = lambda: 0

    @property
    def sends(self) -> int:
        """EVTCHNOP_send calls made, natively served included."""
        return self._sends + self.native_sends()

    def _mirror_port(self, *ports: int) -> None:
        if self.mirror is not None:
            for n in ports:
                self.mirror.port(n)

    def _mirror_all(self) -> None:
        if self.mirror is not None:
            self.mirror.all_ports()

    # -- limits and lookup ---------------------------------------------------------------

    def max_ports(self) -> int:
        return self.shinfo.layout.nr_ports

    def valid(self, port: int) -> bool:
        return 0 < port < self.max_ports()

    def get(self, port: int) -> Port:
        p = self.ports.get(port) if self.valid(port) else None
        if p is None:
            raise XenError(X.XEN_EINVAL, f"port {port} is not in use")
        return p

    def _alloc(self, port: Port) -> int:
        for n in range(1, self.max_ports()):
            if n not in self.ports:
                self.ports[n] = port
                self._mirror_port(n)
                return n
        raise XenError(X.XEN_ENOSPC, "no free event channel")

    # -- operations (each returns the new local port where there is one) ------------------

    def alloc_unbound(self, remote_dom: int) -> int:
        with self.lock:
            return self._alloc(Port(X.EVTCHNSTAT_unbound, remote_dom=remote_dom))

    def daemon_offer(self) -> int:
        """A daemon-side port left unbound for the guest to bind_interdomain to."""
        with self.lock:
            n = max(self.daemon_ports, default=0) + 1
            self.daemon_ports[n] = None
            return n

    def bind_to_daemon(self, backend: Callable[[], None] | None = None) -> tuple[int, int]:
        """A guest port already connected to a new daemon-side port (store, console), served
        by ``backend`` when the guest sends on it: (guest port, daemon port)."""
        with self.lock:
            dport = self.daemon_offer()
            local = self._alloc(Port(X.EVTCHNSTAT_interdomain, remote_dom=DAEMON_DOMID,
                                     remote_port=dport))
            self.daemon_ports[dport] = local
            if backend is not None:
                self.backends[dport] = backend
            return local, dport

    def bind_interdomain(self, remote_dom: int, remote_port: int, self_domid: int) -> int:
        with self.lock:
            if remote_dom in (X.DOMID_SELF, self_domid):
                peer = self.ports.get(remote_port) if self.valid(remote_port) else None
                if peer is None:
                    raise XenError(X.XEN_EINVAL, "remote port is not in use")
                if peer.state != X.EVTCHNSTAT_unbound or peer.remote_dom not in (self_domid, X.DOMID_SELF):
                    raise XenError(X.XEN_EINVAL, "remote port is not unbound for us")
                local = self._alloc(Port(X.EVTCHNSTAT_interdomain, remote_dom=self_domid,
                                         remote_port=remote_port))
                peer.state, peer.remote_dom, peer.remote_port = X.EVTCHNSTAT_interdomain, self_domid, local
                self._mirror_port(remote_port)
                return local
            if remote_dom != DAEMON_DOMID:
                raise XenError(X.XEN_ESRCH, f"no domain {remote_dom}")
            if remote_port not in self.daemon_ports or self.daemon_ports[remote_port] is not None:
                raise XenError(X.XEN_EINVAL, "remote port is not unbound for us")
            local = self._alloc(Port(X.EVTCHNSTAT_interdomain, remote_dom=DAEMON_DOMID,
                                     remote_port=remote_port))
            self.daemon_ports[remote_port] = local
            return local

    def bind_virq(self, virq: int, vcpu: int) -> int:
        with self.lock:
            if (vcpu, virq) in self.virqs:
                raise XenError(X.XEN_EEXIST, "VIRQ already bound")
            port = self._alloc(Port(X.EVTCHNSTAT_virq, vcpu=vcpu, virq=virq))
            self.virqs[(vcpu, virq)] = port
            return port

    def bind_ipi(self, vcpu: int) -> int:
        with self.lock:
            return self._alloc(Port(X.EVTCHNSTAT_ipi, vcpu=vcpu))

    def bind_vcpu(self, port: int, vcpu: int) -> None:
        with self.lock:
            p = self.get(port)
            if p.state == X.EVTCHNSTAT_virq:
                if p.virq in PER_VCPU_VIRQS:   # per-vCPU VIRQs stay put
                    raise XenError(X.XEN_EINVAL, "per-vCPU VIRQ cannot move")
            elif p.state not in (X.EVTCHNSTAT_unbound, X.EVTCHNSTAT_interdomain):
                raise XenError(X.XEN_EINVAL, "port cannot move")
            p.vcpu = vcpu
            self._mirror_port(port)

    def close(self, port: int) -> None:
        with self.lock:
            self._free(port, self.get(port))

    def _free(self, port: int, p: Port) -> None:
        if p.state == X.EVTCHNSTAT_virq:
            self.virqs.pop((p.vcpu, p.virq), None)
        elif p.state == X.EVTCHNSTAT_interdomain:
            if p.remote_dom == DAEMON_DOMID and p.remote_port in self.daemon_ports:
                self.daemon_ports[p.remote_port] = None
            else:
                peer = self.ports.get(p.remote_port)
                if peer is not None and peer.state == X.EVTCHNSTAT_interdomain:
                    peer.state, peer.remote_port = X.EVTCHNSTAT_unbound, 0
                    self._mirror_port(p.remote_port)
        del self.ports[port]
        self._mirror_port(port)
        self._clear_pending(port)

    def reset(self) -> None:
        """Close every port (EVTCHNOP_reset, a soft reset). The daemon's ports and their
        backends go too; whoever made them binds them again."""
        with self.lock:
            for port in list(self.ports):
                self._free(port, self.ports[port])
            self.daemon_ports.clear()
            self.backends.clear()
            self._mirror_all()

    def send(self, port: int) -> None:
        backend = None
        with self.machine.host_access(), self.lock:
            p = self.get(port)
            self._sends += 1
            if p.state == X.EVTCHNSTAT_interdomain:
                if p.remote_dom != DAEMON_DOMID:
                    self.raise_port(p.remote_port)
                else:
                    backend = self.backends.get(p.remote_port)
                    if backend is None:
                        self.raise_port(port)       # the daemon's side echoes
            elif p.state == X.EVTCHNSTAT_ipi:
                self.raise_port(port)
            elif p.state != X.EVTCHNSTAT_unbound:   # unbound: no one listens, dropped as in Xen
                raise XenError(X.XEN_EINVAL, "cannot send on a VIRQ port")
        if backend is not None:
            backend()

    def notify_guest(self, daemon_port: int) -> None:
        """A backend tells the guest: raise the guest port bound to ``daemon_port``."""
        with self.machine.host_access(), self.lock:
            local = self.daemon_ports.get(daemon_port)
            if local is not None:
                self.raise_port(local)

    def status(self, port: int) -> Port | None:
        with self.lock:
            if not self.valid(port):
                raise XenError(X.XEN_EINVAL, "port out of range")
            return self.ports.get(port)

    # -- delivery ------------------------------------------------------------------------

    def raise_virq(self, vcpu: int, virq: int) -> None:
        with self.machine.host_access(), self.lock:
            port = self.virqs.get((vcpu, virq))
            if port is not None:
                self.raise_port(port)

    def raise_port(self, port: int) -> None:
        """Set a port pending and deliver it (any thread, see the module docstring)."""
        lay = self.shinfo.layout
        if not 0 < port < lay.nr_ports:
            return
        word, bit = divmod(port, lay.bits)
        p = self.ports.get(port)
        vcpu = p.vcpu if p is not None else 0
        with self.machine.host_access():   # a registered vcpu_info lives in guest RAM
            if not _or_bit(self.shinfo.addr + lay.evtchn_pending + word * lay.word, bit, lay.word):
                if not self.shinfo.read_bit(lay.evtchn_mask + word * lay.word, bit, lay.word):
                    self._flag_vcpu(vcpu, word)
        self.wake(vcpu)

    def _flag_vcpu(self, vcpu: int, word: int) -> None:
        """Set the selector bit and the upcall flag; inject the upcall on a new flag."""
        lay = self.shinfo.layout
        vi = self.shinfo.vcpu_info_addr(vcpu)
        if vi and not _or_bit(vi + lay.pending_sel, word, lay.word):
            self._flag_upcall(vcpu, vi)
        else:
            self.upcalls.retry(vcpu)

    def _flag_upcall(self, vcpu: int, vi: int) -> None:
        """Set the upcall flag of the vcpu_info at host address ``vi``: deliver the upcall
        on a new flag, else try again one KVM did not take."""
        if not atomic_xchg8(vi + self.shinfo.layout.upcall_pending, 1):
            self.upcalls.inject(vcpu)
        else:
            self.upcalls.retry(vcpu)

    def mark_events_pending(self, vcpu: int) -> None:
        """Flag an upcall for ``vcpu`` and deliver it, unless one is flagged already (Xen's
        vcpu_mark_events_pending, used when a vcpu_info moves)."""
        with self.machine.host_access(), self.lock:
            vi = self.shinfo.vcpu_info_addr(vcpu)
            if vi:
                self._flag_upcall(vcpu, vi)
        self.wake(vcpu)

    def unmask(self, port: int) -> None:
        """Clear the mask bit; a port still pending is delivered now."""
        lay = self.shinfo.layout
        with self.machine.host_access(), self.lock:
            if not self.valid(port):
                raise XenError(X.XEN_EINVAL, "port out of range")
            word, bit = divmod(port, lay.bits)
            base = self.shinfo.addr
            _clear_bit(base + lay.evtchn_mask + word * lay.word, bit, lay.word)
            if self.shinfo.read_bit(lay.evtchn_pending + word * lay.word, bit, lay.word):
                p = self.ports.get(port)
                self._flag_vcpu(p.vcpu if p is not None else 0, word)

    def is_pending(self, port: int) -> bool:
        lay = self.shinfo.layout
        if not 0 < port < lay.nr_ports:
            return False
        word, bit = divmod(port, lay.bits)
        return self.shinfo.read_bit(lay.evtchn_pending + word * lay.word, bit, lay.word)

    def is_masked(self, port: int) -> bool:
        lay = self.shinfo.layout
        if not 0 < port < lay.nr_ports:
            return False
        word, bit = divmod(port, lay.bits)
        return self.shinfo.read_bit(lay.evtchn_mask + word * lay.word, bit, lay.word)

    def _clear_pending(self, port: int) -> None:
        lay = self.shinfo.layout
        word, bit = divmod(port, lay.bits)
        _clear_bit(self.shinfo.addr + lay.evtchn_pending + word * lay.word, bit, lay.word)

    @contextmanager
    def waiting(self, vcpu: int) -> Iterator[None]:
        """Around a vCPU's wait for its events (SCHEDOP_block, SCHEDOP_poll): the native send
        sees it flagged before the vCPU looks at its events, and has it woken."""
        if self.mirror is None:
            yield
            return
        self.mirror.events.set_blocked(vcpu, True)
        try:
            yield
        finally:
            self.mirror.events.set_blocked(vcpu, False)

    def wake(self, vcpu: int) -> None:
        """Wake a vCPU that may be blocked waiting for an event (every one: the target may
        have moved)."""
        for r in self.machine.runners:
            r.notify()

    # -- saved state ---------------------------------------------------------------------

    def to_state(self) -> dict:
        return {"ports": {str(n): [p.state, p.vcpu, p.virq, p.remote_dom, p.remote_port]
                          for n, p in self.ports.items()},
                "daemon_ports": {str(n): (-1 if g is None else g) for n, g in self.daemon_ports.items()},
                "sends": self.sends}

    def from_state(self, st: dict) -> None:
        """Ports as saved; the daemon's backends stay as they are (a domain always makes its
        daemon ports first and in the same order, so they have the same numbers)."""
        with self.lock:
            self.ports = {int(n): Port(*v) for n, v in st["ports"].items()}
            self.virqs = {(p.vcpu, p.virq): n for n, p in self.ports.items()
                          if p.state == X.EVTCHNSTAT_virq}
            self.daemon_ports = {int(n): (None if g < 0 else g) for n, g in st["daemon_ports"].items()}
            self._sends = st.get("sends", 0) - self.native_sends()
            self._mirror_all()
