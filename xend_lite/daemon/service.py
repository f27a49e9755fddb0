"""The daemon's life cycle: start (sockets, VM, control plane, READY=1), the guest-stop
policy, signals, the watchdog, and a clean stop (STOPPING=1, vCPUs stopped, console flushed,
last events delivered, listeners closed, socket file removed).

A failure while starting is a ``StartError`` carrying a distinct exit status and one line
saying what went wrong and how to fix it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
import time
from typing import Any

from aiohttp import web

from xend_lite.daemon.config import DaemonConfig
from xend_lite.daemon.connections import ConnectionGuard, start_guard
from xend_lite.daemon.controller import REBOOT_REASONS, Controller, GuestStop, exit_status_for
from xend_lite.daemon.early import DomainFactory, EarlyStart, real_domain_factory
from xend_lite.daemon.events import EventBus
from xend_lite.daemon.exitcodes import ExitCode, StartError
from xend_lite.daemon.listen import Listeners, open_listeners
from xend_lite.daemon.metrics import Metrics
from xend_lite.daemon.runstate import RunState
from xend_lite.daemon.server import WEBSOCKETS, make_app
from xend_lite.daemon.systemd import Notifier
from xend_lite.machine.native import set_mmap_threshold
from xend_lite.errors import (ConfigError, InvalidArgument, LoaderError, NotFound, NotSupported,
                              SnapshotError, XendLiteError)

__all__ = ["Daemon", "DomainFactory", "ExitCode", "StartError", "classify_build_error",
           "real_domain_factory"]

log = logging.getLogger("xend_lite.daemon")

RECLAIM_WAIT = 30.0    # seconds a stopping daemon waits for replaced snapshots to be freed


def classify_build_error(exc: BaseException, cfg: DaemonConfig) -> StartError:
    """The exit status and the line to print when the VM cannot be built."""
    if isinstance(exc, LoaderError):
        return StartError(ExitCode.IMAGE, f"{exc}: give a loadable image with --image (or none "
                                          "for the embedded default guest)")
    if isinstance(exc, (InvalidArgument, ConfigError)):
        return StartError(ExitCode.CONFIG, f"invalid guest configuration: {exc}")
    if isinstance(exc, NotSupported):
        return StartError(ExitCode.KVM, f"{exc} (run `xend-lite --check` for a host report)")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENODEV,
                                                  errno.ENXIO):
        return StartError(ExitCode.KVM, f"cannot use {cfg.kvm_path}: {exc.strerror or exc}: load the "
                                        "kvm module, or run as root / in the kvm group "
                                        "(`xend-lite --check` tells which)")
    if type(exc).__name__ == "KvmError":
        return StartError(ExitCode.KVM, f"KVM refused to build the VM: {exc} "
                                        "(run `xend-lite --check` for a host report)")
    if isinstance(exc, XendLiteError):
        return StartError(ExitCode.SOFTWARE, f"the VM could not be built: {exc}")
    return StartError(ExitCode.SOFTWARE, f"the VM could not be built: {type(exc).__name__}: {exc}")


class Daemon:
    def __init__(self, cfg: DaemonConfig, domain_factory: DomainFactory = real_domain_factory,
                 notifier: Notifier | None = None, env: dict[str, str] | None = None,
                 early: EarlyStart | None = None):
        self.cfg = cfg
        self._early = early
        self.events = EventBus()
        self.metrics = Metrics()
        self.events.observers.append(self.metrics.event)
        self.notifier = notifier or Notifier(env)
        self._env = env
        self.controller = Controller(domain_factory, cfg, snapshot_dir=cfg.snapshot_dir,
                                     publish=self.events.publish, on_guest_stop=self._guest_stopped,
                                     on_state=self._state_changed)
        self.listeners = Listeners()
        self.runner: web.AppRunner | None = None
        self.connections: ConnectionGuard | None = None
        self.exit_status: int | None = None
        self.exit_why = ""
        self._exit: asyncio.Future[int] | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopped = False

    # -- start ---------------------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        return [f"{lst.kind}:{lst.where}" for lst in self.listeners.items]

    def tcp_port(self) -> int | None:
        for lst in self.listeners.items:
            if lst.kind == "tcp":
                return lst.sock.getsockname()[1]
        return None

    async def start(self) -> None:
        """Listen, build and boot the VM (with --incoming: nothing, snapshot-load builds it),
        serve, and tell systemd we are ready."""
        loop = asyncio.get_running_loop()
        if self._exit is None:
            self._exit = loop.create_future()
        # asyncio reads each connection into a fresh 256 KiB buffer, shrunk to what came and
        # freed with the request. Above glibc's mmap threshold (128 KiB until a larger block
        # happens to be freed) every request mapped, remapped and unmapped one: three system
        # calls, a page fault, and a TLB flush interrupting the CPU that runs a vCPU; measured,
        # half of a control request's time. Below a fixed 1 MiB threshold they come from the heap.
        set_mmap_threshold(1 << 20)
        self.connections = start_guard()
        token = self._open_listeners()
        self.controller.snapshots.prepare()
        self.controller.attach_loop()
        # the application is made while an early build may still run (it needs no VM); it
        # serves only once the guest runs
        app = make_app(self.controller, self.events, daemon=self, token=token)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self.runner.setup()
        if self.cfg.incoming:
            state = RunState.INCOMING   # nothing is built until snapshot-load
            await self.controller.warm_up()
        else:
            state = await self._build_and_boot()
        await self.connections.serve(self.runner.server,
                                     [(lst.sock, lst.kind == "tcp") for lst in self.listeners.items])
        log.info("xend-lite serving on %s (pid %d), guest %s", ", ".join(self.addresses),
                 os.getpid(), state.value)
        self.notifier.ready(self._status_line(state))
        if self._early is not None:
            self._early.settle()
        interval = self.notifier.watchdog_interval
        if interval:
            self._spawn(self._watchdog(interval))

    async def _build_and_boot(self) -> RunState:
        try:
            await self.controller.build(self._early)
        except Exception as exc:  # noqa: BLE001 - each kind gets its own exit status
            raise classify_build_error(exc, self.cfg) from exc
        if self.cfg.restore:
            try:
                await self.controller.restore_at_start(self.cfg.restore)
            except (SnapshotError, NotFound, XendLiteError, OSError) as exc:
                raise StartError(ExitCode.SNAPSHOT, f"snapshot {self.cfg.restore} cannot be loaded: "
                                                    f"{exc}: check the path given with --restore") from exc
        elif self.cfg.save_on_stop:
            await self._restore_saved_on_stop()
        return await self.controller.boot(self.cfg.start_paused)

    def _save_on_stop_path(self) -> str:
        return self.controller.snapshots.name(self.cfg.save_on_stop)

    async def _restore_saved_on_stop(self) -> None:
        """Bring back what the last stop saved; a file that cannot be loaded is moved aside
        (PATH.unloadable) and the guest boots afresh rather than the service failing."""
        path = self._save_on_stop_path()
        try:
            if not self.controller.snapshots.exists(path):
                return
            await self.controller.restore_at_start(path)
            log.info("restored the VM saved at the last stop from %s", path)
        except (SnapshotError, XendLiteError, OSError) as exc:
            aside = path + ".unloadable"
            log.error("the VM saved at the last stop (%s) cannot be loaded: %s; moved to %s, "
                      "booting afresh", path, exc, aside)
            try:
                self.controller.snapshots.move_aside(path, ".unloadable")
            except (OSError, XendLiteError) as err:
                log.error("cannot move %s aside: %s", path, err)
            # a refused load changed nothing (it is validated first): boot the fresh VM

    async def _save_for_next_start(self) -> None:
        """On a stop: save the VM if the guest is up; otherwise drop an old save so the next
        start boots afresh."""
        path = self._save_on_stop_path()
        state = self.controller.state
        if state in (RunState.RUNNING, RunState.PAUSED):
            try:
                info = await self.controller.snapshot_save(path, paused=True)
                log.info("saved the VM for the next start: %s (%d bytes)", path, info.get("size", 0))
            except Exception as exc:  # noqa: BLE001 - the stop goes on; the error is reported
                log.error("saving the VM to %s on stop failed: %s", path, exc)
        elif self.controller.snapshots.exists(path):
            log.info("the guest is %s: removing %s so the next start boots afresh", state.value, path)
            try:
                self.controller.snapshots.remove(path)
            except (OSError, XendLiteError) as err:
                log.error("cannot remove %s: %s", path, err)

    def _open_listeners(self) -> str | None:
        if self._early is not None:      # bound by main() before the VM was built
            self.listeners = self._early.listeners
            return self._early.token
        return open_listeners(self.cfg, self.listeners, self._env)

    # -- running -------------------------------------------------------------------------

    def request_exit(self, status: int, why: str) -> None:
        """Ask the daemon to stop with ``status`` (the first request wins)."""
        if self._exit is None:
            self._exit = asyncio.get_running_loop().create_future()
        if self._exit.done():
            log.info("already stopping (%s)", self.exit_why)
            return
        self.exit_status, self.exit_why = status, why
        log.info("stopping: %s", why)
        self._exit.set_result(status)

    async def wait(self) -> int:
        if self._exit is None:
            self._exit = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self._exit)

    async def run(self, install_signals: bool = True) -> int:
        """Start, serve until asked to stop, then stop cleanly. Returns the exit status."""
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
            loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored: restart to reload"))
            if self._early is not None:   # the loop's handlers replaced those of main()
                for sig in self._early.signals:
                    self._on_signal(sig)
        try:
            try:
                await self.start()
            except BaseException:
                await self.stop()
                raise
            status = await self.wait()
            await self.stop()
            return status
        finally:
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            if self._early is not None:
                self._early.settle(freeze=False)    # a start that failed: collector back on

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._exit is not None and self._exit.done() and self.exit_why.endswith("received"):
            # a second signal while stopping: the user wants out now
            log.warning("%s received again: exiting without waiting for the VM", name)
            self.listeners.close()
            os._exit(ExitCode.FAILURE)
        self.request_exit(ExitCode.OK, f"{name} received")

    def _guest_stopped(self, stop: GuestStop) -> None:
        """The guest ended its run: apply on_reboot / on_poweroff."""
        if self._stopped or (self._exit is not None and self._exit.done()):
            return
        if stop.reason in REBOOT_REASONS:
            if self.cfg.on_reboot == "reset":
                log.info("guest rebooted: resetting it")
                self._spawn(self._reset_after_reboot())
            else:
                self.request_exit(ExitCode.OK, "guest rebooted (on_reboot = exit)")
            return
        if self.cfg.on_poweroff == "exit":
            self.request_exit(exit_status_for(stop), f"guest stopped: {stop.reason} (code {stop.code})")
        else:
            log.info("guest stopped: %s (code %d); staying up (on_poweroff = pause): system_reset "
                     "boots it again, quit stops the daemon", stop.reason, stop.code)

    async def _reset_after_reboot(self) -> None:
        try:
            await self.controller.system_reset()
        except Exception as exc:  # noqa: BLE001
            log.error("resetting the guest after its reboot failed: %s", exc)
            self.request_exit(ExitCode.FAILURE, "the guest's reboot could not be carried out")

    def _state_changed(self, state: RunState) -> None:
        self.notifier.status(self._status_line(state))

    def _status_line(self, state: RunState) -> str:
        return f"guest {state.value}; control on {', '.join(self.addresses) or 'nothing'}"

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 while the event loop turns and the VM owner thread lives; a stuck loop
        or a dead owner stops the pings, and the service manager restarts us."""
        while True:
            if self.controller.owner_alive:
                self.notifier.watchdog()
            else:
                log.error("the VM owner thread is gone: no more watchdog pings")
            await asyncio.sleep(interval)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- stop ----------------------------------------------------------------------------

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        self.notifier.stopping(f"stopping: {self.exit_why or 'start failed'}")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.cfg.save_on_stop and self.controller.domain is not None:
            await self._save_for_next_start()
        if self._early is not None and self.controller.domain is None:
            await asyncio.to_thread(self._early.discard)   # a start that failed before the VM
        await self.controller.close()
        await asyncio.sleep(0)  # let the events the close published reach the bus
        self.events.close()
        if self.connections is not None:
            self.connections.close()
        if self.runner is not None:
            await self._wait_websockets(2.0)
            await self.runner.cleanup()
        self.listeners.close()
        # files replaced by this run's saves are freed in the background: finish that here,
        # so no temporary file is left behind in the snapshot directory (a run that never
        # saved never loaded the writer, and has nothing to wait for)
        writer = sys.modules.get("xend_lite.snapshot.target")
        if writer is not None and not await asyncio.to_thread(writer.wait_reclaimed, RECLAIM_WAIT):
            log.warning("old snapshot files are still being freed; the next save removes them")
        self.notifier.close()
        log.info("stopped in %.2f s", time.monotonic() - t0)

    async def _wait_websockets(self, timeout: float) -> None:
        app = self.runner.app if self.runner is not None else None
        if app is None:
            return
        deadline = time.monotonic() + timeout
        while app[WEBSOCKETS] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for ws in list(app[WEBSOCKETS]):
            await ws.close()
