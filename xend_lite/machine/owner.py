"""The VM owner: the one thread that changes VM-wide state.

Every change that concerns more than one vCPU (the memory map and its overlays, pausing and
resuming, reset, save and restore, starting or stopping a vCPU, a guest's shutdown) runs on
this thread, one at a time, as a request. Other threads hand it a callable and wait for the
answer:

- the control plane (the daemon's event loop, tests) with :meth:`VmOwner.run` or
  :meth:`VmOwner.submit` (a concurrent Future to await);
- a vCPU thread, from inside a hypercall that needs a VM-wide change, with
  :meth:`VmOwner.request`. These requests go ahead of queued commands, and the owner also
  serves them while it waits for the vCPUs to pause (:meth:`VmOwner.wait_until`): a vCPU
  waiting for its request would otherwise never reach its pause, and the two would wait for
  each other.

Periodic work that must look at the whole VM (the halted-guest check) is scheduled on the
thread too (:meth:`VmOwner.every`).

Locking: ``_cond`` guards the two queues, the timers and ``_closed``; it is held only to
queue or take an item, never while one runs. Runner state changes notify it (:meth:`notify`)
so :meth:`wait_until` wakes at once.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, TypeVar

from xend_lite.errors import StateError
from xend_lite.machine.backing import mark_ram_thread

log = logging.getLogger("xend_lite.owner")

T = TypeVar("T")
_Item = tuple[Callable[..., Any], tuple, concurrent.futures.Future]
_Timer = tuple[float, int, float | None, Callable[[], Any]]   # due, sequence, period (None: once), work


class OwnerClosed(StateError):
    """The VM owner has stopped: nothing more runs on it."""

    def __init__(self) -> None:
        super().__init__("the VM is closed", "closed")


class VmOwner:
    def __init__(self, name: str = "vm-owner"):
        self._cond = threading.Condition()
        self._commands: deque[_Item] = deque()
        self._requests: deque[_Item] = deque()      # from vCPU threads: served first
        self._timers: list[_Timer] = []
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._ident: int | None = None
        #: what the owner is doing now (the command's name), for diagnostics
        self.busy: str | None = None
        self._thread.start()

    # -- any thread ----------------------------------------------------------------------

    def on_owner(self) -> bool:
        return threading.get_ident() == self._ident

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future:
        """Queue ``fn(*args)`` to run on the owner; its Future carries the result."""
        return self._put(self._commands, fn, args)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the owner and return its result (at once when called on
        the owner itself)."""
        if self.on_owner():
            return fn(*args)
        return self.submit(fn, *args).result()

    def request(self, fn: Callable[..., T], *args: Any) -> T:
        """From a vCPU thread: run ``fn(*args)`` on the owner ahead of queued commands and
        wait for it. The caller must hold no lock the owner could need."""
        if self.on_owner():
            return fn(*args)
        return self._put(self._requests, fn, args).result()

    def notify(self) -> None:
        """Wake the owner if it waits in wait_until (a runner's state changed)."""
        with self._cond:
            self._cond.notify_all()

    def every(self, seconds: float, fn: Callable[[], float | None]) -> None:
        """Run ``fn`` on the owner every ``seconds`` until it closes. When ``fn`` returns a
        number, that many seconds pass before the next run instead (periodic work that
        backs off while there is nothing to do)."""
        with self._cond:
            heapq.heappush(self._timers, (time.monotonic() + seconds, next(self._seq), seconds, fn))
            self._cond.notify_all()

    def after(self, seconds: float, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the owner once, ``seconds`` from now (unless it closes first)."""
        with self._cond:
            heapq.heappush(self._timers, (time.monotonic() + seconds, next(self._seq), None, fn))
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work; what is queued fails with OwnerClosed; the thread ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not self.on_owner():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("the VM owner did not stop within %.0f s (busy with %s)", timeout, self.busy)

    # -- the owner thread ----------------------------------------------------------------

    def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """On the owner: wait until ``done()`` (checked whenever a runner's state changes),
        serving vCPU requests meanwhile. False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while True:
            if done():
                return True
            item = None
            with self._cond:
                if self._requests:
                    item = self._requests.popleft()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return done()
                    self._cond.wait(min(left, 0.05))
            if item is not None:
                self._execute(item)

    def _put(self, queue: deque[_Item], fn: Callable[..., Any], args: tuple) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise OwnerClosed()
            queue.append((fn, args, fut))
            self._cond.notify_all()
        return fut

    def _next(self) -> _Item | _Timer | None:
        with self._cond:
            while True:
                if self._requests:
                    return self._requests.popleft()
                if self._commands:
                    return self._commands.popleft()
                if self._closed:
                    return None
                now = time.monotonic()
                if self._timers and self._timers[0][0] <= now:
                    return heapq.heappop(self._timers)  # queued again once it has run
                wait = self._timers[0][0] - now if self._timers else None
                self._cond.wait(wait)

    def _serve(self) -> None:
        self._ident = threading.get_ident()
        mark_ram_thread()
        while True:
            item = self._next()
            if item is None:
                break
            if len(item) == 4:
                self._run_timer(item)
                continue
            self._execute(item)
        with self._cond:
            left = list(self._requests) + list(self._commands)
            self._requests.clear()
            self._commands.clear()
        for _fn, _args, fut in left:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(OwnerClosed())

    def _run_timer(self, timer: _Timer) -> None:
        _due, seq, period, fn = timer
        wait = period
        try:
            asked = fn()
            if isinstance(asked, (int, float)) and not isinstance(asked, bool) and asked > 0:
                wait = float(asked)
        except Exception:  # noqa: BLE001 - a periodic check must not end the owner
            log.exception("periodic work on the VM owner failed")
        if period is None:           # once (after)
            return
        with self._cond:
            heapq.heappush(self._timers, (time.monotonic() + wait, seq, period, fn))

    def _execute(self, item: _Item) -> None:
        fn, args, fut = item
        if not fut.set_running_or_notify_cancel():
            return
        self.busy = getattr(fn, "__name__", "work")
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            fut.set_exception(exc)
        finally:
            self.busy = None
