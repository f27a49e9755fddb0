"""One thread per vCPU: a small state machine driven by pause / resume / stop requests.

The owner asks a runner to pause by setting its flag, then immediate_exit, then sending the
kick signal (in that order, so a runner about to enter KVM_RUN cannot miss it), and waits
for the runner to say it is paused. While paused the thread waits on a condition and the
owner may use the vCPU's ioctls.
"""

from __future__ import annotations

import collections
import errno
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from xend_lite.kvm import SYNC_REGS, SYNC_SREGS, KvmError, Vcpu
from xend_lite.kvm.vcpu import PORT_SHIFT
from xend_lite.machine.memory import mark_vcpu_thread

if TYPE_CHECKING:
    from xend_lite.machine.machine import Machine

log = logging.getLogger("xend_lite.vcpu")

# Runner states
CREATED, RUNNING, PAUSED, STOPPED = "created", "running", "paused", "stopped"

_PORT_BIT = (1 << PORT_SHIFT) - 1
_INTERRUPTED = (-errno.EINTR, -errno.EAGAIN)


class VcpuRunner:
    def __init__(self, machine: Machine, vcpu: Vcpu):
        self.machine = machine
        self.vcpu = vcpu
        self.index = vcpu.id
        self.state = CREATED
        self.exit_counts: collections.Counter[str] = collections.Counter()
        self.exits_total = 0
        self.last_rip = 0
        self._cond = threading.Condition()
        self._pause_req = False
        self._stop_req = False
        self._paused = False
        self.thread: threading.Thread | None = None
        self.error: str | None = None
        vcpu.enable_sync_regs(SYNC_REGS | SYNC_SREGS)

    # -- owner side ----------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)
        self.thread.start()

    def reset_thread_state(self) -> None:
        """Forget a finished thread so start() can run the vCPU again."""
        with self._cond:
            self._pause_req = self._stop_req = self._paused = False
            self.thread = None
            self.state = CREATED
            self.error = None
            self.vcpu.set_immediate_exit(False)

    def request_pause(self) -> None:
        with self._cond:
            self._pause_req = True
            self._cond.notify_all()
        self._interrupt()

    def wait_paused(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._paused and self.state not in (STOPPED, CREATED):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
                if not self._paused:
                    self._interrupt()  # a kick can land just before KVM_RUN: kick again
            return True

    def release(self) -> None:
        with self._cond:
            self._pause_req = False
            self.vcpu.set_immediate_exit(False)
            self._cond.notify_all()

    def request_stop(self) -> None:
        with self._cond:
            self._stop_req = True
            self._cond.notify_all()
        self._interrupt()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def _interrupt(self) -> None:
        if self.vcpu.fd < 0:
            return
        self.vcpu.set_immediate_exit(True)
        t = self.thread
        if t is not None and t.is_alive() and t.ident is not None:
            try:
                Vcpu.kick(t.ident)
            except (ProcessLookupError, OSError):
                pass

    # -- for handlers on this thread -----------------------------------------------------

    def should_yield(self) -> bool:
        """True when the owner wants this vCPU paused or stopped: a blocking handler returns."""
        return self._pause_req or self._stop_req

    def block(self, timeout: float | None, wake: Callable[[], bool]) -> bool:
        """Wait (for a blocking hypercall) until ``wake()`` is true, ``timeout`` passes, or the
        owner asks for a pause/stop. Returns wake()'s final value. Wake it with notify()."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not wake():
                if self._pause_req or self._stop_req:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left if left is not None else 1.0)
            return wake()

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- the loop ------------------------------------------------------------------------

    def _main(self) -> None:
        mark_vcpu_thread()
        report: Callable[[], None] | None = None
        try:
            report = self._loop()
        except BaseException as exc:  # noqa: BLE001 - the thread must report, never die silently
            log.exception("vcpu%d failed", self.index)
            error = self.error = f"{type(exc).__name__}: {exc}"
            report = lambda: self.machine.vcpu_failed(self, error)  # noqa: E731
        finally:
            with self._cond:
                self.state = STOPPED
                self._paused = False
                self._cond.notify_all()
        # a failure is reported once this vCPU shows as stopped, so whoever hears of it
        # (the SHUTDOWN event, query-vcpus) sees the state that goes with it
        if report is not None:
            try:
                report()
            except Exception:  # noqa: BLE001
                log.exception("vcpu%d: reporting its failure failed", self.index)

    def _park(self) -> bool:
        """Paused: wait for release or stop. Returns False when the runner must stop."""
        try:
            self.vcpu.flush_dirty_regs()
        except KvmError as exc:
            log.error("vcpu%d: %s", self.index, exc)
        with self._cond:
            self._paused = True
            self.state = PAUSED
            self._cond.notify_all()
            while self._pause_req and not self._stop_req:
                self._cond.wait()
            self._paused = False
            if self._stop_req:
                return False
            self.state = RUNNING
            return True

    def _loop(self) -> Callable[[], None] | None:
        """Run until stopped or the guest's run ends; a handler failure comes back as the
        call that reports it (made once the runner is marked stopped)."""
        vcpu = self.vcpu
        machine = self.machine
        doorbells = machine._doorbells
        counts = self.exit_counts
        run_plain, run_result = vcpu.run_fns(*machine.doorbell_hook)
        result = None      # a doorbell handler's value for RAX, given with the next KVM_RUN
        self.state = RUNNING
        while True:
            if self._pause_req or self._stop_req:
                if result is not None:     # paused or saved meanwhile: the result is state
                    vcpu.set_rax(result)
                    result = None
                if self._stop_req or not self._park():
                    return
                continue
            if result is None:
                reason = run_plain()
            else:
                reason = run_result(result)
                result = None
            if reason < 0:
                if reason not in _INTERRUPTED:
                    raise KvmError("KVM_RUN", -reason)
                reason = -1
            self.exits_total += 1
            # Hot path: a doorbell port (the hypercall stubs) needs no decoded exit.
            if reason > _PORT_BIT:
                h = doorbells.get((reason >> PORT_SHIFT) - 1)
                if h is not None:
                    try:
                        result = h(self)
                    except Exception as exc:  # noqa: BLE001 - a handler bug stops this VM, not the daemon
                        port = vcpu.exit_port()
                        return lambda e=exc: machine.handler_failed(self, port, e)
                    continue
            if reason < 0:
                counts["intr"] += 1
                continue
            ex = vcpu.decode_exit()
            counts[type(ex).__name__] += 1
            try:
                go_on = machine.handle_exit(self, ex)
            except Exception as exc:  # noqa: BLE001
                return lambda e=exc: machine.handler_failed(self, ex, e)
            if not go_on:
                return
