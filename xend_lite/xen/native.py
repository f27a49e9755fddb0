"""The Xen layer's native helpers (``_build.py``, compiled into ``xend_lite.xen._xen``) as
plain Python values and functions: the hypercall decoder the vCPU loop calls in C, atomic
bit operations on guest memory, and the host TSC. No cffi object leaves this module."""

from __future__ import annotations

from collections.abc import Iterable, MutableSet

from xend_lite.xen._xen import ffi as _ffi
from xend_lite.xen._xen import lib as _lib

__all__ = ["CALL_LONG", "CALL_USER", "CALL_WAKE", "DECODE_CALL", "NATIVE_HOOK", "EventMirror",
           "NativeHypercalls", "OneShotTimers", "UntakenFlags", "atomic_and64", "atomic_or64", "atomic_xchg8",
           "host_tsc"]

#: flags the decoder sets in a call's second word: the caller was in 64-bit mode / was not
#: the guest kernel
CALL_LONG: int = _lib.XEN_CALL_LONG
CALL_USER: int = _lib.XEN_CALL_USER
#: set by the native hook on a call it served whose event a blocked vCPU may wait for: the
#: Python dispatcher only wakes the vCPUs and returns the result the call's first argument
#: word holds
CALL_WAKE: int = _lib.XEN_CALL_WAKE
#: the address of the C function that decodes a hypercall from the synced registers into
#: [number, flags, five arguments]; the vCPU loop calls it right after a hypercall exit
DECODE_CALL: int = _lib.xen_decode_call_address()
#: the address of the C function that serves the natively served hypercalls in the vCPU
#: loop and decodes every other one as DECODE_CALL does; its context is a
#: NativeHypercalls.ctx(vcpu index)
NATIVE_HOOK: int = _lib.xen_native_hook_address()
#: how many counters each vCPU keeps (the Python dispatcher's TABLE_SIZE + 1)
NATIVE_COUNTERS: int = _lib.XEN_NATIVE_COUNTERS


class NativeHypercalls:
    """The C-owned state of the hypercalls served natively: which (call, sub-op) pairs are on,
    the fixed values they answer with, and each vCPU's counters (summed on read)."""

    def __init__(self, nr_vcpus: int, version_word: int, served: Iterable[tuple[int, int]],
                 enabled: bool = True):
        self._dom = _ffi.new("struct xen_native_dom *")
        self._dom.version_word = version_word
        self.slots = {}
        for op, subop in served:
            slot = _lib.xen_native_slot(op, subop)
            if slot < 0:
                raise ValueError(f"hypercall {op} sub-op {subop} has no native handler")
            self.slots[(op, subop)] = slot
        self._vcpus = [_ffi.new("struct xen_native_vcpu *") for _ in range(nr_vcpus)]
        for i, v in enumerate(self._vcpus):
            v.dom = self._dom
            v.index = i
            v.vcpu_fd = -1
        self.events = EventMirror(self._dom, nr_vcpus)
        self.timers = OneShotTimers(self._dom, nr_vcpus)
        self.set_enabled(enabled)

    def set_fds(self, vm_fd: int, vcpu_fds: list[int]) -> None:
        """The KVM file descriptors the event-channel calls use (KVM_SIGNAL_MSI on the VM,
        KVM_TRANSLATE on each vCPU); until set, those calls go to Python."""
        self._dom.evt.vm_fd = vm_fd
        for v, fd in zip(self._vcpus, vcpu_fds):
            v.vcpu_fd = fd

    @property
    def enabled(self) -> bool:
        return any(self._dom.on[s] for s in self.slots.values())

    def set_enabled(self, on: bool) -> None:
        """Serve the named pairs in C (True) or leave every call to Python (False); a byte
        store per pair, which the vCPU loops read atomically at their next hypercall."""
        for slot in self.slots.values():
            self._dom.on[slot] = 1 if on else 0

    def ctx(self, index: int) -> int:
        """The hook's context for vCPU ``index`` (0: none, every call goes to Python)."""
        if not 0 <= index < len(self._vcpus):
            return 0
        return int(_ffi.cast("uintptr_t", self._vcpus[index]))

    def calls(self) -> list[int]:
        return [sum(v.calls[i] for v in self._vcpus) for i in range(NATIVE_COUNTERS)]

    def errors(self) -> list[int]:
        return [sum(v.errors[i] for v in self._vcpus) for i in range(NATIVE_COUNTERS)]

    def sends(self) -> int:
        """EVTCHNOP_send calls served natively (they only grow)."""
        return sum(v.sends for v in self._vcpus)

    def msi_failures(self) -> tuple[int, int]:
        """(KVM_SIGNAL_MSI failures of upcalls sent in C so far, the last one's errno)."""
        n, err = 0, 0
        for v in self._vcpus:
            if v.msi_failures:
                n += v.msi_failures
                err = v.msi_errno
        return n, err


#: what the mirror says of a port, a vcpu_info and an upcall (see _build.py)
PORT_PYTHON: int = _lib.XEN_PORT_PYTHON
PORT_IPI: int = _lib.XEN_PORT_IPI
PORT_LOOP: int = _lib.XEN_PORT_LOOP
PORT_UNBOUND: int = _lib.XEN_PORT_UNBOUND
VI_NONE: int = _lib.XEN_VI_NONE
VI_SHARED: int = _lib.XEN_VI_SHARED
VI_GPA: int = _lib.XEN_VI_GPA
UPCALL_NONE: int = _lib.XEN_UPCALL_NONE
UPCALL_MSI: int = _lib.XEN_UPCALL_MSI
UPCALL_PYTHON: int = _lib.XEN_UPCALL_PYTHON
MIRROR_VCPUS: int = _lib.XEN_EVT_VCPUS
MIRROR_PORTS: int = _lib.XEN_EVT_PORTS
MIRROR_SEGMENTS: int = _lib.XEN_EVT_SEGS
TIMER_VCPUS: int = _lib.XEN_EVT_VCPUS
TIMER_MAX: int = (1 << 63) - 1
NO_DEADLINE: int = (1 << 64) - 1


class OneShotTimers:
    """Each vCPU's one-shot timer, in C memory: the native set_timer_op and vcpu_op set it
    there on the vCPU thread, Python's handlers and a restore through the same functions,
    and the timer thread takes the expired ones with a compare-and-swap. Deadlines are Xen
    system time in ns; one past TIMER_MAX (some 292 years) is kept as TIMER_MAX."""

    def __init__(self, dom, nr_vcpus: int):
        if nr_vcpus > TIMER_VCPUS:
            raise ValueError(f"at most {TIMER_VCPUS} vCPUs have a one-shot timer")
        self._dom = dom
        self._timer = dom.timer
        self.nr_vcpus = nr_vcpus
        self._fired = _ffi.new("uint8_t[]", max(1, nr_vcpus))
        self._next = _ffi.new("uint64_t *")
        self._armed = _ffi.new("int *")

    def set_clock(self, boot_ns: int) -> None:
        """CLOCK_MONOTONIC (ns) at system time 0: timekeeping.Clock's zero."""
        self._timer.boot_ns = boot_ns

    def set_running(self, on: bool) -> None:
        """The timer thread runs (True) or has stopped: until it runs, C leaves timer calls
        to Python."""
        self._timer.running = 1 if on else 0

    def set(self, vcpu: int, deadline: int) -> None:
        _lib.xen_timer_set(self._dom, vcpu, min(max(deadline, 0), TIMER_MAX))

    def stop(self, vcpu: int) -> None:
        _lib.xen_timer_stop(self._dom, vcpu)

    def get(self, vcpu: int) -> int | None:
        at = _lib.xen_timer_get(self._dom, vcpu, self._armed)
        return at if self._armed[0] else None

    def kick(self) -> None:
        """Wake the timer thread (it looks at every timer again)."""
        _lib.xen_timer_kick(self._dom)

    def wake_count(self) -> int:
        """Read before take_due(..., sleep_until) and given to wait()."""
        return _lib.xen_timer_seq(self._dom)

    def wait(self, count: int, timeout_ns: int) -> None:
        """Sleep (the GIL released) until kicked or ``timeout_ns`` passed, unless the wake
        count moved from ``count`` already."""
        _lib.xen_timer_wait(self._dom, count, max(0, timeout_ns))

    def take_due(self, now: int, sleep_until: int = 0) -> tuple[list[int], int | None]:
        """For the timer thread: (the vCPUs whose timers expired at ``now``, taken; the
        earliest deadline left). ``sleep_until``: the system time it will sleep until if
        this finds nothing sooner (a setter of an earlier deadline then wakes it); 0: it
        stays awake and looks again before it sleeps."""
        n = _lib.xen_timers_due(self._dom, self.nr_vcpus, now, sleep_until, self._fired,
                                self._next)
        fired = [v for v in range(self.nr_vcpus) if self._fired[v]] if n else []
        nxt = self._next[0]
        return fired, None if nxt == NO_DEADLINE else nxt


class EventMirror:
    """The C copy of the event-channel state the native send and unmask read. One writer at
    a time (the caller holds the event-channel lock). The memory map, shared_info and the
    vCPUs' delivery are rewritten inside ``rewrite()`` (the C reader sees the sequence count
    move and leaves the call to Python); a port and a vCPU's flags are single stores."""

    def __init__(self, dom, nr_vcpus: int):
        self._dom = dom
        self._evt = dom.evt
        self.nr_vcpus = nr_vcpus
        self._ports = int(_ffi.cast("uintptr_t", _ffi.addressof(self._evt, "ports")))
        self._blocked = int(_ffi.cast("uintptr_t", _ffi.addressof(self._evt, "blocked")))
        self._untaken = int(_ffi.cast("uintptr_t", _ffi.addressof(self._evt, "untaken")))
        self._used: set[int] = set()         # ports whose word is not 0
        self._evt.nr_vcpus = nr_vcpus if self.usable else 0

    @property
    def usable(self) -> bool:
        """Whether this domain fits the mirror (else every event call goes to Python)."""
        return self.nr_vcpus <= MIRROR_VCPUS

    def begin(self) -> None:
        self._evt.seq += 1                   # odd: the reader leaves every call to Python

    def end(self) -> None:
        self._evt.seq += 1

    def set_segments(self, segments: list[tuple[int, int, int]]) -> None:
        """The memory map's plain RAM: (guest-physical address, size, host address)."""
        e = self._evt
        if len(segments) > MIRROR_SEGMENTS:
            e.nr_segs = MIRROR_SEGMENTS + 1
            return
        e.nr_segs = 0
        for i, (gpa, size, host) in enumerate(segments):
            seg = e.segs[i]
            seg.gpa, seg.size, seg.host = gpa, size, host
        e.nr_segs = len(segments)

    def set_shared_info(self, host: int, word: int, nr_ports: int, pending: int, mask: int,
                        sel: int, upcall: int) -> None:
        """shared_info's host address (0: none) and its layout for the guest's mode."""
        e = self._evt
        e.shinfo, e.word, e.nr_ports = host, word, nr_ports
        e.pending_off, e.mask_off, e.sel_off, e.upcall_off = pending, mask, sel, upcall

    def set_vcpu(self, vcpu: int, vi_kind: int, vi_gpa: int, upcall: int, vector: int) -> None:
        if vcpu >= MIRROR_VCPUS:
            return
        v = self._evt.vcpus[vcpu]
        v.vi_kind, v.vi_gpa, v.upcall = vi_kind, vi_gpa, upcall << 8 | (vector & 0xFF)

    def set_port(self, port: int, kind: int, vcpu: int, remote: int) -> None:
        if 0 <= port < MIRROR_PORTS:
            word = kind | (vcpu & 0xFFFFFF) << 8 | remote << 32
            _lib.xen_store64(self._ports + 8 * port, word)
            if word:
                self._used.add(port)
            else:
                self._used.discard(port)

    def clear_ports(self) -> None:
        """Every port's word back to 0: only those set are stored (the table has 4096, and
        a restore or reset comes here)."""
        for port in self._used:
            _lib.xen_store64(self._ports + 8 * port, 0)
        self._used.clear()

    def describe(self) -> dict:
        """What the mirror holds, as plain values: each port in use (kind, vCPU, other end),
        each vCPU's vcpu_info (kind, address) and upcall (route, vector), shared_info's
        layout and the RAM segments (guest-physical address, size)."""
        e = self._evt
        ports = {}
        for n in range(MIRROR_PORTS):
            w = int(_ffi.cast("uint64_t *", self._ports)[n])
            if w:
                ports[n] = (w & 0xFF, w >> 8 & 0xFFFFFF, w >> 32)
        nsegs = e.nr_segs if e.nr_segs <= MIRROR_SEGMENTS else 0
        return {"ports": ports,
                "vcpus": [(v.vi_kind, v.vi_gpa, v.upcall >> 8, v.upcall & 0xFF)
                          for v in (e.vcpus[i] for i in range(e.nr_vcpus))],
                "layout": (e.word, e.nr_ports, e.pending_off, e.mask_off, e.sel_off,
                           e.upcall_off),
                "shared_info": bool(e.shinfo),
                "segments": [(e.segs[i].gpa, e.segs[i].size) for i in range(nsegs)]}

    def set_blocked(self, vcpu: int, blocked: bool) -> None:
        """Before a vCPU looks at its events and waits (True), and after (False): a native
        send that sets bits while any vCPU is flagged has Python wake them."""
        if vcpu < MIRROR_VCPUS:
            _lib.xen_xchg8(self._blocked + vcpu, 1 if blocked else 0)


class UntakenFlags(MutableSet):
    """The vCPUs whose last upcall KVM did not take, one byte each in the mirror: written by
    the native send and unmask and by hvm.Upcalls alike. A set's interface."""

    def __init__(self, events: EventMirror):
        self._base = events._untaken
        self._n = min(events.nr_vcpus, MIRROR_VCPUS)
        self._extra: set[int] = set()        # vCPUs past the mirror's size

    def _addr(self, vcpu: int) -> int | None:
        return self._base + vcpu if 0 <= vcpu < self._n else None

    def add(self, vcpu: int) -> None:
        a = self._addr(vcpu)
        if a is None:
            self._extra.add(vcpu)
        else:
            _lib.xen_store8(a, 1)

    def discard(self, vcpu: int) -> None:
        a = self._addr(vcpu)
        if a is None:
            self._extra.discard(vcpu)
        else:
            _lib.xen_store8(a, 0)

    def __contains__(self, vcpu: object) -> bool:
        if not isinstance(vcpu, int):
            return False
        a = self._addr(vcpu)
        return vcpu in self._extra if a is None else bool(_ffi.cast("uint8_t *", a)[0])

    def __iter__(self):
        return iter([v for v in range(self._n) if v in self] + sorted(self._extra))

    def __len__(self) -> int:
        return len(list(iter(self)))

    def clear(self) -> None:
        for v in range(self._n):
            _lib.xen_store8(self._base + v, 0)
        self._extra.clear()



def atomic_or64(addr: int, mask: int) -> int:
    """Atomically OR ``mask`` into the aligned u64 at host address ``addr``; the old value."""
    return _lib.xen_fetch_or64(addr, mask)


def atomic_and64(addr: int, mask: int) -> int:
    """Atomically AND ``mask`` into the aligned u64 at host address ``addr``; the old value."""
    return _lib.xen_fetch_and64(addr, mask)


def atomic_xchg8(addr: int, value: int) -> int:
    """Atomically swap the byte at host address ``addr``; the old value."""
    return _lib.xen_xchg8(addr, value)


def host_tsc() -> int:
    """The host's time-stamp counter (RDTSC)."""
    return _lib.xen_rdtsc()
