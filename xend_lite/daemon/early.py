"""The start before the daemon's own modules are loaded: the control sockets are bound, then
the VM is built on a thread while the main thread loads the rest (service.py and the HTTP
side), and Daemon.start() takes both over.

Building the VM waits in the kernel (KVM_SET_USER_MEMORY_REGION waits for an SRCU grace
period: about 5 ms here, whatever the guest's size) while loading modules keeps a CPU busy:
one after the other they added up, side by side the wait is hidden. The order a start has
always had is kept: sockets first (a socket in use stops the start before a VM exists or
the console log is opened), the VM's modules imported on the main thread before the build
begins (so the two threads never import at once), the guest run only once the daemon has
its loop (Daemon.start boots it, after a --restore or a save-on-stop reload). From the moment
the socket exists a stop signal is the daemon's to handle, as it was when the loop bound it:
SIGTERM and SIGINT are held until the loop's own handlers replace these (Daemon.run), then
handled there (a clean stop).

The cyclic garbage collector is off from here to READY=1 (for the `xend-lite` command, from
before the libraries are imported: cli/daemon.py): a start makes some fifty thousand
objects (modules, classes, the VM) that live as long as the daemon, and the collector went
over the young ones again and again (about 2.5 ms a start, and some 10 ms more while the
libraries were imported). At READY=1 they are frozen (gc.freeze: left out of every later
collection, which also shortens the pauses that hold the GIL from the vCPU threads) and the
collector is on again.
"""

from __future__ import annotations

import gc
import signal
import threading
from concurrent.futures import Future
from typing import Any, Callable

from xend_lite.daemon.listen import Listeners, open_listeners

DomainFactory = Callable[[Any, Callable[[str, dict], None]], Any]
Emit = Callable[[str, dict], None]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def real_domain_factory(cfg: Any, emit: Emit) -> Any:
    from xend_lite.vmm.domain import Domain

    return Domain(cfg, emit)


class EarlyStart:
    """Sockets bound and the VM building: made by main() once the configuration is checked.
    Raises StartError (nothing left open) when a socket cannot be made."""

    def __init__(self, cfg: Any, factory: DomainFactory, env: dict[str, str] | None = None,
                 collecting: bool | None = None):
        """``collecting``: the collector was on before the caller turned it off (None: as
        it is now); settle() turns it on again if so."""
        self._collecting: bool | None = gc.isenabled() if collecting is None else collecting
        gc.disable()                        # until settle()
        self.signals: list[int] = []        # stop signals received before the loop ran
        self._handlers = {sig: signal.signal(sig, self._hold) for sig in STOP_SIGNALS}
        self.listeners = Listeners()
        try:
            self.token = open_listeners(cfg, self.listeners, env)
        except BaseException:
            self.release_signals()
            self.settle(freeze=False)
            raise
        if factory is real_domain_factory:
            try:
                import xend_lite.vmm.domain  # noqa: F401 - here, not on the build thread
            except ImportError:
                pass        # the build meets it again and reports it, as a failed build
        self.domain: Future = Future()
        self.domain.set_running_or_notify_cancel()   # not cancellable: the build always ends
        self._lock = threading.Lock()
        self._emit: Emit | None = None
        self._held: list[tuple[str, dict]] = []
        threading.Thread(target=self._build, args=(factory, cfg), name="vm-build",
                         daemon=True).start()

    def _hold(self, sig: int, _frame: Any) -> None:
        self.signals.append(sig)

    def release_signals(self) -> None:
        """Give the stop signals their former handlers back (a start that ends here)."""
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)

    def _build(self, factory: DomainFactory, cfg: Any) -> None:
        try:
            domain = factory(cfg, self._event)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the build
            self.domain.set_exception(exc)
        else:
            self.domain.set_result(domain)

    def _event(self, name: str, data: dict) -> None:
        """The Domain's emit: held until the controller takes the VM over."""
        with self._lock:
            if self._emit is None:
                self._held.append((name, data))
                return
            emit = self._emit
        emit(name, data)

    def attach(self, emit: Emit) -> None:
        """From now on the Domain's events go to ``emit``, those held first, in order."""
        with self._lock:
            held, self._held = self._held, []
            for name, data in held:
                emit(name, data)
            self._emit = emit

    def discard(self) -> None:
        """For a start that fails before the VM is taken over: wait for the build and close
        what it made (a failed build left nothing open)."""
        try:
            domain = self.domain.result()
        except BaseException:  # noqa: BLE001 - the build's own failure is not this one's
            return
        domain.close()

    def settle(self, freeze: bool = True) -> None:
        """The start is over (READY=1, or a failure): what it made is frozen out of later
        collections, and the collector runs again. Once; later calls do nothing."""
        if self._collecting is None:
            return
        if freeze:
            gc.freeze()
        if self._collecting:
            gc.enable()
        self._collecting = None

    def abandon(self) -> None:
        """For a start that ends before the daemon took over: sockets closed, signals given
        back, the VM closed once built."""
        self.listeners.close()
        self.release_signals()
        self.discard()
        self.settle(freeze=False)
