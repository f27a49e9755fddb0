"""One thread per vCPU, a small state machine that runs its own vCPU and nothing else.

States (``VcpuState``), as ``query-vcpus`` reports them:

- ``created``: the thread is not running guest code yet (not started, or a secondary vCPU
  the guest has not started: it waits in KVM for INIT/SIPI);
- ``running``: in KVM_RUN or handling one of its exits;
- ``halted``: waiting inside a blocking hypercall (SCHEDOP_block/poll) or a HLT for an event;
- ``paused``: parked at the top of its loop at the owner's request, every result of its last
  exit already in its registers (a consistent state to save);
- ``stopped``: the thread has ended.

Only the VM owner asks a runner to pause, resume or stop (flag, then immediate_exit, then the
kick signal, in that order, so a runner about to enter KVM_RUN cannot miss it). A handler that
needs a VM-wide change asks the owner (:meth:`VcpuRunner.ask_owner`) and, while it waits,
counts as out of KVM_RUN (``waiting``), so the owner can change the memory map around it.

Locking: ``_cond`` guards this runner's flags and state; the owner is notified of every state
change after it is made.
"""

from __future__ import annotations

import collections
import enum
import errno
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, TypeVar

from xend_lite.kvm import PORT_SHIFT, SYNC_REGS, SYNC_SREGS, KvmError, Vcpu, const
from xend_lite.machine.backing import mark_ram_thread

if TYPE_CHECKING:
    from xend_lite.machine.exitmap import ExitMap
    from xend_lite.machine.owner import VmOwner

log = logging.getLogger("xend_lite.vcpu")

T = TypeVar("T")
_PORT_BIT = (1 << PORT_SHIFT) - 1
_INTERRUPTED = (-errno.EINTR, -errno.EAGAIN)


class VcpuState(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    HALTED = "halted"
    PAUSED = "paused"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


S = VcpuState


class VcpuRunner:
    def __init__(self, vcpu: Vcpu, owner: VmOwner, exits: ExitMap):
        self.vcpu = vcpu
        self.index = vcpu.id
        self.owner = owner
        self._exits = exits
        self.state = S.CREATED
        self.waiting = False            # inside a handler, waiting for the owner
        self.started = False            # has run guest code (a secondary may wait for SIPI)
        self.exit_counts: collections.Counter[str] = collections.Counter()
        self._seen = 0                   # the exits this loop saw (exits_total adds C's)
        self._cond = threading.Condition()
        self._pause_req = False
        self._stop_req = False
        self.thread: threading.Thread | None = None
        self.error: str | None = None
        self.on_failure: Callable[[VcpuRunner, str], None] = lambda _r, _e: None
        vcpu.enable_sync_regs(SYNC_REGS | SYNC_SREGS)

    @property
    def exits_total(self) -> int:
        """Every exit, the ones the doorbell hook served in C included."""
        return self._seen + self.vcpu.hook_served()

    @exits_total.setter
    def exits_total(self, value: int) -> None:
        self._seen = value - self.vcpu.hook_served()

    def _set(self, state: VcpuState) -> None:
        """Change state (holding _cond) and tell the owner."""
        self.state = state
        self._cond.notify_all()

    @property
    def out_of_guest(self) -> bool:
        """Not in KVM_RUN and not about to enter it without asking: the memory map may change."""
        return self.state in (S.PAUSED, S.STOPPED) or self.waiting or self.thread is None

    # -- the owner's side ----------------------------------------------------------------

    def start(self, paused: bool = False,
              spawn: Callable[[Callable[[], None], str], threading.Thread] | None = None) -> None:
        """Start the vCPU's thread, with ``spawn(work, name)`` when given (Machine.spawn)."""
        self.started = False   # a secondary vCPU waiting for INIT/SIPI has not started
        self._refresh_started()
        with self._cond:
            self._pause_req = paused
            self._stop_req = False
        if spawn is not None:
            self.thread = spawn(self._main, f"vcpu{self.index}")
            return
        self.thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)
        self.thread.start()

    def reset_thread_state(self) -> None:
        """Forget a finished thread so start() can run the vCPU again."""
        with self._cond:
            self._pause_req = self._stop_req = False
            self.thread = None
            self.state = S.CREATED
            self.started = False
            self.error = None
            self.vcpu.set_immediate_exit(False)

    def request_pause(self) -> None:
        with self._cond:
            self._pause_req = True
            self._cond.notify_all()
        self._interrupt()

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

    def kick_again(self) -> None:
        """A kick can land just before KVM_RUN: the owner repeats it while it waits."""
        if self._pause_req or self._stop_req:
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

    def ask_owner(self, fn: Callable[..., T], *args: object) -> T:
        """Have the owner make a VM-wide change for this vCPU's handler and wait for it."""
        with self._cond:
            self.waiting = True
        self.owner.notify()
        try:
            return self.owner.request(fn, *args)
        finally:
            with self._cond:
                self.waiting = False

    def block(self, timeout: float | None, wake: Callable[[], bool]) -> bool:
        """Wait (for a blocking hypercall) until ``wake()`` is true, ``timeout`` passes, or the
        owner asks for a pause/stop; shown as halted meanwhile. Returns wake()'s final value.
        Wake it with notify()."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if wake():
                return True
            self._set(S.HALTED)
        self.owner.notify()
        try:
            with self._cond:
                while not wake():
                    if self._pause_req or self._stop_req:
                        break
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(left if left is not None else 1.0)
                return wake()
        finally:
            with self._cond:
                if self.state == S.HALTED:
                    self._set(S.RUNNING)

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- the loop ------------------------------------------------------------------------

    def _main(self) -> None:
        mark_ram_thread()
        error: str | None = None
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - the thread must report, never die silently
            log.exception("vcpu%d failed", self.index)
            # the type only: the message may be internal text, and this goes to clients
            error = self.error = f"the vCPU thread failed: {type(exc).__name__}"
        finally:
            with self._cond:
                self.waiting = False
                self._set(S.STOPPED)
            self.owner.notify()
        # a failure is reported once this vCPU shows as stopped, so whoever hears of it
        # (the SHUTDOWN event, query-vcpus) sees the state that goes with it
        if error is not None:
            try:
                self.on_failure(self, error)
            except Exception:  # noqa: BLE001
                log.exception("vcpu%d: reporting its failure failed", self.index)

    def _park(self) -> bool:
        """Paused: wait for release or stop. Returns False when the runner must stop."""
        try:
            self.vcpu.flush_dirty_regs()
        except KvmError as exc:
            log.error("vcpu%d: %s", self.index, exc)
        self._refresh_started()
        with self._cond:
            before = S.RUNNING if self.started else S.CREATED
            self._set(S.PAUSED)
        self.owner.notify()
        with self._cond:
            while self._pause_req and not self._stop_req:
                self._cond.wait()
            if self._stop_req:
                return False
            self._set(before)
        self.owner.notify()
        return True

    def _refresh_started(self) -> None:
        """Out of KVM_RUN: whether the guest started this vCPU (INIT/SIPI), even if it has
        made no exit since (its HLTs stay in the kernel)."""
        if self.started:
            return
        try:
            self.started = self.vcpu.get_mp_state() not in (const.KVM_MP_STATE_UNINITIALIZED,
                                                            const.KVM_MP_STATE_INIT_RECEIVED)
        except KvmError as exc:
            log.error("vcpu%d: %s", self.index, exc)

    def _loop(self) -> None:
        """Run until stopped or a handler ends the guest's run."""
        vcpu = self.vcpu
        exits = self._exits
        doorbells = exits.doorbells
        counts = self.exit_counts
        hook, port = exits.doorbell_hook
        # until the first exit has shown the vCPU started, the hook serves nothing natively
        run_plain, run_result = vcpu.run_fns(hook, port, exits.doorbell_ctx(self.index)
                                             if self.started else 0)
        result = None      # a doorbell handler's value for RAX, given with the next KVM_RUN
        with self._cond:
            self._set(S.RUNNING if self.started else S.CREATED)
        while True:
            if self._pause_req or self._stop_req:
                if result is not None:     # paused or saved meanwhile: the result is state
                    vcpu.set_rax(result)
                    result = None
                if self._stop_req or not self._park():
                    self._refresh_started()
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
                counts["intr"] += 1
                continue
            self._seen += 1
            if not self.started:
                self.started = True
                with self._cond:
                    if self.state == S.CREATED:
                        self._set(S.RUNNING)
                run_plain, run_result = vcpu.run_fns(hook, port, exits.doorbell_ctx(self.index))
            # Hot path: a doorbell port (the hypercall stubs) needs no decoded exit.
            if reason > _PORT_BIT:
                h = doorbells.get((reason >> PORT_SHIFT) - 1)
                if h is not None:
                    result = h(self)
                    continue
            ex = vcpu.decode_exit()
            counts[type(ex).__name__] += 1
            if not exits.handle(self, ex):
                return
