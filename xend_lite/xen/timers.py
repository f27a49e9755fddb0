"""Per-vCPU timers in Xen system time, a one-shot and a periodic one each, as Xen has; either
raises VIRQ_TIMER when it expires. One thread runs them, and also refreshes the guests'
vcpu_time_info about once a second (``refresh``).

Locking: ``_cond`` guards the deadlines. The thread fires timers after releasing it, inside
machine.host_access() (it is neither a vCPU nor the owner).
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
    from xend_lite.xen.timekeeping import Clock

log = logging.getLogger("xend_lite.xen")

REFRESH_EVERY = 1.0   # seconds between vcpu_time_info refreshes, as Xen's calibration


class Timers:
    def __init__(self, machine: Machine, clock: Clock, evtchn: EventChannels,
                 refresh: Callable[[], None]):
        self.machine = machine
        self.clock = clock
        self.evtchn = evtchn
        self.refresh = refresh
        self._deadline: dict[int, int] = {}
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
        with self._cond:
            self._deadline[vcpu] = deadline_ns
            self._ensure()
            self._cond.notify()

    def stop(self, vcpu: int) -> None:
        with self._cond:
            self._deadline.pop(vcpu, None)

    def stop_all(self) -> None:
        with self._cond:
            self._deadline.clear()
            self._periodic.clear()

    def set_periodic(self, vcpu: int, period_ns: int, expiry: int | None = None) -> None:
        """Expire every period_ns from now (or first at ``expiry``), until stopped."""
        with self._cond:
            first = self.clock.now() + period_ns if expiry is None else expiry
            self._periodic[vcpu] = [period_ns, first]
            self._ensure()
            self._cond.notify()

    def stop_periodic(self, vcpu: int) -> None:
        with self._cond:
            self._periodic.pop(vcpu, None)

    def periodics(self) -> dict[int, tuple[int, int]]:
        with self._cond:
            return {v: (p, e) for v, (p, e) in self._periodic.items()}

    def deadline(self, vcpu: int) -> int | None:
        return self._deadline.get(vcpu)

    def deadlines(self) -> dict[int, int]:
        with self._cond:
            return dict(self._deadline)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(2.0)

    def _due(self) -> list[int] | None:
        """Under _cond: the vCPUs whose timers expired (None: closed); waits when none."""
        if self._closed:
            return None
        now = self.clock.now()
        fire = []
        for v, d in list(self._deadline.items()):
            if d <= now:
                fire.append(v)
                del self._deadline[v]
        for v, pe in self._periodic.items():
            if pe[1] <= now:        # as Xen: one event, the next a period from now
                fire.append(v)
                pe[1] = now + pe[0]
        if not fire:
            nxt = min([*self._deadline.values(), *(e for _, e in self._periodic.values())], default=None)
            wait = REFRESH_EVERY if nxt is None else max(0.0, (nxt - now) / 1e9)
            self._cond.wait(min(wait, REFRESH_EVERY))
        return fire

    def _run(self) -> None:
        next_refresh = time.monotonic() + REFRESH_EVERY
        while True:
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + REFRESH_EVERY
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001
                    log.exception("refreshing guest time failed")
            with self._cond:
                fire = self._due()
            if fire is None:
                return
            for v in fire:
                try:
                    self.evtchn.raise_virq(v, X.VIRQ_TIMER)
                except Exception:  # noqa: BLE001
                    log.exception("timer for vcpu%d failed", v)
