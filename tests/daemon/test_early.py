"""The early start (early.py): sockets bound before the VM is built on a thread, the daemon
taking both over. Events of the build reach the daemon in order, a stop signal that comes
before the loop is handled cleanly, a failed start closes what was built, a socket that
cannot be made stops the start before any VM exists, and the garbage collector, off during
the start, is on again after it (with the start's objects frozen only when it succeeded)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import threading

import pytest

from tests.daemon.conftest import make_config
from tests.daemon.fakes import FakeDomain
from xend_lite.daemon.early import EarlyStart
from xend_lite.daemon.exitcodes import ExitCode, StartError
from xend_lite.daemon.service import Daemon
from xend_lite.daemon.systemd import Notifier


@pytest.fixture(autouse=True)
def collector():
    """Each test starts with the collector on and must leave it on; frozen objects are
    given back to it, for the tests that follow."""
    assert gc.isenabled()
    yield
    gc.unfreeze()
    assert gc.isenabled(), "the start left the garbage collector off"


class Recorder(FakeDomain):
    """A FakeDomain that emits while it is built and says on which thread it was."""

    def __init__(self, config, emit=None):
        super().__init__(config, emit)
        self.built_on = threading.current_thread().name
        for i in range(3):
            self._emit("BUILD_STEP", {"i": i})


def _early(short_tmp, factory=Recorder, **kw) -> tuple[EarlyStart, object]:
    cfg = make_config(short_tmp, **kw)
    os.makedirs(cfg.snapshot_dir, exist_ok=True)
    return EarlyStart(cfg, factory, env={}), cfg


async def test_the_daemon_takes_over_the_early_build_and_its_events(short_tmp):
    early, cfg = _early(short_tmp)
    assert os.path.exists(cfg.socket)                 # bound before the daemon exists
    assert not gc.isenabled()                         # off while the start runs
    early.domain.result(10)                           # built, its events held meanwhile
    d = Daemon(cfg, Recorder, notifier=Notifier({}), env={}, early=early)
    seen = []
    d.events.observers.append(lambda ev: seen.append(ev))
    try:
        await d.start()
        assert d.controller.domain is early.domain.result()
        assert d.controller.domain.built_on == "vm-build"
        await asyncio.sleep(0.05)
        steps = [ev for ev in seen if ev.get("event") == "BUILD_STEP"]
        assert [ev["data"]["i"] for ev in steps] == [0, 1, 2]
        assert d.controller.state.value == "running"
        assert gc.isenabled() and gc.get_freeze_count() > 0   # READY=1: frozen, back on
    finally:
        d.request_exit(0, "test done")
        await d.stop()
    assert not os.path.exists(cfg.socket)


async def test_a_stop_signal_before_the_loop_is_held_then_stops_the_daemon(short_tmp):
    early, cfg = _early(short_tmp)
    try:
        os.kill(os.getpid(), signal.SIGTERM)          # would kill the test process unheld
        await asyncio.sleep(0)
        assert early.signals == [signal.SIGTERM]
        d = Daemon(cfg, Recorder, notifier=Notifier({}), env={}, early=early)
        status = await asyncio.wait_for(d.run(), 10)
    finally:
        early.release_signals()
    assert status == ExitCode.OK
    assert d.exit_why == "SIGTERM received"
    assert early.domain.result().closed
    assert not os.path.exists(cfg.socket)


async def test_a_start_failing_before_the_build_is_used_closes_the_vm(short_tmp):
    early, cfg = _early(short_tmp)
    d = Daemon(cfg, Recorder, notifier=Notifier({}), env={}, early=early)

    def refuse() -> int:
        raise OSError("snapshot directory gone")
    d.controller.snapshots.prepare = refuse           # fails after the sockets, before the build
    try:
        with pytest.raises(OSError):
            await d.run(install_signals=False)
    finally:
        early.release_signals()
    assert d.controller.domain is None
    assert early.domain.result().closed
    assert not os.path.exists(cfg.socket)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_socket_in_use_stops_the_start_before_any_vm(short_tmp):
    path = os.path.join(short_tmp, "ctl.sock")
    busy = socket.socket(socket.AF_UNIX)
    busy.bind(path)
    busy.listen(1)
    built = []
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(StartError) as info:
            _early(short_tmp, factory=lambda cfg, emit: built.append(cfg))
    finally:
        busy.close()
    assert info.value.code == ExitCode.SOCKET
    assert built == []
    assert signal.getsignal(signal.SIGTERM) is before   # handlers given back
    assert gc.isenabled() and gc.get_freeze_count() == 0


async def test_the_collector_a_caller_turned_off_is_on_again_after_ready(short_tmp):
    cfg = make_config(short_tmp)
    os.makedirs(cfg.snapshot_dir, exist_ok=True)
    gc.disable()                                      # as the xend-lite command does
    early = EarlyStart(cfg, Recorder, env={}, collecting=True)
    d = Daemon(cfg, Recorder, notifier=Notifier({}), env={}, early=early)
    try:
        await d.start()
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.enable()
        d.request_exit(0, "test done")
        await d.stop()
