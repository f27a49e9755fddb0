"""sched_op, sched_op_compat and set_timer_op: yielding, blocking, polling, shutting down, and
the one-shot timer.

A vCPU that blocks or polls waits on its own thread (shown as halted) until an event is
pending for it, its timeout passes, or the owner wants it paused; in the last case the call
returns early, as a wakeup, and the guest looks again (guests re-check what they wait for).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from xend_lite.xen.errors import XenError, inval
from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.machine.vcpu import VcpuRunner
    from xend_lite.xen.evtchn import EventChannels
    from xend_lite.xen.hypercall import Call
    from xend_lite.xen.runstate import Runstates
    from xend_lite.xen.shinfo import SharedInfo
    from xend_lite.xen.timekeeping import Clock
    from xend_lite.xen.timers import Timers

BLOCK_SLICE = 0.010   # longest SCHEDOP_block wait before the guest looks again
MAX_POLL_PORTS = 128
SHUTDOWN_NAMES = {X.SHUTDOWN_poweroff: "poweroff", X.SHUTDOWN_reboot: "reboot",
                  X.SHUTDOWN_suspend: "suspend", X.SHUTDOWN_crash: "crash",
                  X.SHUTDOWN_watchdog: "watchdog", X.SHUTDOWN_soft_reset: "soft-reset"}

#: (runner, reason name, reason number) -> None: the domain ends its run
ShutdownFn = Callable[["VcpuRunner", str, int], None]


class SchedOps:
    def __init__(self, clock: Clock, timers: Timers, evtchn: EventChannels, shinfo: SharedInfo,
                 shutdown: ShutdownFn, soft_reset: Callable[["VcpuRunner"], None],
                 runstates: Runstates | None = None):
        self.clock = clock
        self.timers = timers
        self.evtchn = evtchn
        self.shinfo = shinfo
        self._shutdown = shutdown
        self._soft_reset = soft_reset
        self.shutdown_code: int | None = None
        self.runstates = runstates

    def sched_op(self, c: Call, cmd: int, arg: int) -> int:
        if cmd == X.SCHEDOP_yield:
            time.sleep(0)
            return 0
        if cmd in (X.SCHEDOP_block, X.SCHEDOP_poll):
            self._runstate(c, X.RUNSTATE_blocked)
            try:
                return self._block(c) if cmd == X.SCHEDOP_block else self._poll(c, arg)
            finally:
                self._runstate(c, X.RUNSTATE_running)
        if cmd in (X.SCHEDOP_shutdown, X.SCHEDOP_shutdown_code):
            reason = c.view.read_uint(arg, 4)
            if cmd == X.SCHEDOP_shutdown_code:
                if self.shutdown_code is None:
                    self.shutdown_code = reason & 0xFF
                return 0
            return self._shutdown_as_xen(c, reason)
        if cmd in (X.SCHEDOP_remote_shutdown, X.SCHEDOP_pin_override):
            raise XenError(X.XEN_EPERM, "for the control domain only")
        raise XenError(X.XEN_ENOSYS, "unknown sched_op")

    def sched_op_compat(self, c: Call, cmd: int, arg: int) -> int:
        if cmd == X.SCHEDOP_yield:
            return 0
        if cmd == X.SCHEDOP_block:
            return self._block(c)
        if cmd == X.SCHEDOP_shutdown:
            return self._shutdown_as_xen(c, arg)
        raise XenError(X.XEN_ENOSYS, "unknown sched_op_compat")

    def set_timer_op(self, c: Call, a1: int, a2: int) -> int:
        timeout = a1 if c.long_mode else (a2 << 32 | a1)
        if timeout == 0:
            self.timers.stop(c.index)
        else:
            self.timers.set(c.index, timeout)
        return 0

    def _runstate(self, c: Call, state: int) -> None:
        if self.runstates is not None:
            self.runstates.set_state(c.index, state)

    def _shutdown_as_xen(self, c: Call, reason: int) -> int:
        """As Xen: the reason is taken as a u8 and any value shuts the domain down; one
        outside the known SHUTDOWN_* values reaches the host as "unknown" (its number in the
        detail), which the daemon treats as a poweroff."""
        reason &= 0xFF
        if reason == X.SHUTDOWN_soft_reset:
            self._soft_reset(c.runner)
            return 0
        self._shutdown(c.runner, SHUTDOWN_NAMES.get(reason, "unknown"), reason)
        return 0

    def _block(self, c: Call) -> int:
        deadline = self.timers.deadline(c.index)
        slice_s = BLOCK_SLICE
        if deadline is not None:
            slice_s = min(slice_s, max(0.0, (deadline - self.clock.now()) / 1e9))
        with self.evtchn.waiting(c.index):
            c.runner.block(slice_s, lambda: self.shinfo.upcall_pending(c.index))
        return 0

    def _poll(self, c: Call, arg: int) -> int:
        p = c.read("sched_poll", arg)
        n = p["nr_ports"]
        if n > MAX_POLL_PORTS:
            raise inval("too many ports")
        raw = c.view.read(p["ports"], 4 * n)
        ports = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 4 * n, 4)]
        ev = self.evtchn
        limit = ev.max_ports()
        for port in ports:               # one pass, as Xen: a pending port before a bad one wins
            if port >= limit:
                raise inval("port out of range")
            if ev.is_pending(port):
                return 0
        timeout = p["timeout"]
        while not c.runner.should_yield():
            now = self.clock.now()
            if timeout and now >= timeout:
                return 0
            wait = None if not timeout else (timeout - now) / 1e9
            with ev.waiting(c.index):
                if c.runner.block(wait, lambda: any(ev.is_pending(q) for q in ports)):
                    return 0
        return 0                         # the owner wants this vCPU: a wakeup, the guest looks again
