"""Per-vCPU timers in Xen system time, a one-shot and a periodic one each, as Xen has; either
raises VIRQ_TIMER when it expires. One thread runs them, and also refreshes the guests'
vcpu_time_info about once a second (``refresh``).

The one-shot deadlines live in C memory (native.OneShotTimers): a vCPU sets its own there,
in C when the native path serves set_timer_op and vcpu_op's one-shot calls, or through
:meth:`Timers.set` from Python; the thread takes the expired ones atomically and sleeps on a
futex that a setter of an earlier deadline wakes. Until the thread runs, C leaves those calls
to Python, whose ``set`` starts it.

Locking: ``_cond`` guards the periodic timers and ``_closed``. The thread fires timers
after releasing it, inside machine.host_access() (it is neither a vCPU nor the owner).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.machine.machine import Machine
    from xend_lite.xen.evtchn import EventChannels
    from xend_lite.xen.native import OneShotTimers
    from xend_lite.xen.timekeeping import Clock

log = logging.getLogger("xend_lite.xen")

REFRESH_EVERY = 1.0   # seconds between vcpu_time_info refreshes, as Xen's calibration
_REFRESH_NS = int(REFRESH_EVERY * 1e9)


class Timers:
    def __init__(self, machine: Machine, clock: Clock, evtchn: EventChannels,
                 refresh: Callable[[], None], oneshot: OneShotTimers):
        self.machine = machine
        self.clock = clock
        self.evtchn = evtchn
        self.refresh = refresh
        self._oneshot = oneshot
        self._periodic: dict[int, list[int]] = {}     # vcpu -> [period, next expiry]
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start_refresh(self) -> None:
        """Start the thread (it also refreshes guest time every REFRESH_EVERY seconds)."""
        with self._cond:
            self._ensure()

    def _ensure(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = self.machine.spawn(self._run, "xen-timers")

    def set(self, vcpu: int, deadline_ns: int) -> None:
        """vCPU ``vcpu``'s one-shot timer (on its own thread, or with the vCPUs paused)."""
        self._oneshot.set(vcpu, deadline_ns)
        with self._cond:
            self._ensure()

    def stop(self, vcpu: int) -> None:
        self._oneshot.stop(vcpu)

    def stop_all(self) -> None:
        """Every timer stopped (a reset, or a restore before it sets the saved ones and
        moves system time: the thread looks again)."""
        for v in range(self._oneshot.nr_vcpus):
            self._oneshot.stop(v)
        with self._cond:
            self._periodic.clear()
        self._oneshot.kick()

    def set_periodic(self, vcpu: int, period_ns: int, expiry: int | None = None) -> None:
        """Expire every period_ns from now (or first at ``expiry``), until stopped."""
        with self._cond:
            first = self.clock.now() + period_ns if expiry is None else expiry
            self._periodic[vcpu] = [period_ns, first]
            self._ensure()
        self._oneshot.kick()

    def stop_periodic(self, vcpu: int) -> None:
        with self._cond:
            self._periodic.pop(vcpu, None)

    def periodics(self) -> dict[int, tuple[int, int]]:
        with self._cond:
            return {v: (p, e) for v, (p, e) in self._periodic.items()}

    def deadline(self, vcpu: int) -> int | None:
        return self._oneshot.get(vcpu)

    def deadlines(self) -> dict[int, int]:
        out = {}
        for v in range(self._oneshot.nr_vcpus):
            d = self._oneshot.get(v)
            if d is not None:
                out[v] = d
        return out

    def close(self) -> None:
        with self._cond:
            self._closed = True
        self._oneshot.set_running(False)     # C leaves timer calls to Python from now
        self._oneshot.kick()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(2.0)

    def _periodic_due(self, now: int) -> tuple[list[int], int | None] | None:
        """The vCPUs whose periodic timers expired (set again a period on), and the next
        expiry; None once closed."""
        with self._cond:
            if self._closed:
                return None
            fire = []
            for v, pe in self._periodic.items():
                if pe[1] <= now:        # as Xen: one event, the next a period from now
                    fire.append(v)
                    pe[1] = now + pe[0]
            nxt = min((e for _, e in self._periodic.values()), default=None)
        return fire, nxt

    def _due(self, refresh_in: int) -> list[int] | None:
        """The vCPUs whose timers expired (None: closed); sleeps when none, until the
        earliest deadline, ``refresh_in`` ns from now at the latest, or a kick."""
        one = self._oneshot
        now = self.clock.now()
        refresh_at = now + refresh_in
        got = self._periodic_due(now)
        if got is None:
            return None
        fire, nxt = got
        fired, nxt_one = one.take_due(now)
        if fire or fired:
            return fire + fired
        until = min(x for x in (nxt, nxt_one, refresh_at) if x is not None)
        count = one.wake_count()
        fired, nxt_one = one.take_due(self.clock.now(), max(1, until))  # published: look again
        if fired or (nxt_one is not None and nxt_one < until):
            return fired
        one.wait(count, until - self.clock.now())
        return []

    def _run(self) -> None:
        self._oneshot.set_running(True)
        # on the host's clock: a restore moves system time
        next_refresh = time.monotonic_ns() + _REFRESH_NS
        while True:
            if time.monotonic_ns() >= next_refresh:
                next_refresh = time.monotonic_ns() + _REFRESH_NS
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001
                    log.exception("refreshing guest time failed")
            fire = self._due(next_refresh - time.monotonic_ns())
            if fire is None:
                return
            for v in fire:
                try:
                    self.evtchn.raise_virq(v, X.VIRQ_TIMER)
                except Exception:  # noqa: BLE001
                    log.exception("timer for vcpu%d failed", v)
