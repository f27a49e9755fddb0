"""The controller through the control plane: run-state refusals, the exact transitions, the
events each command produces and their order, snapshots, and the guest-stop policies."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from tests.daemon.conftest import wait_for
from xend_lite.cli.ctl import RpcError
from xend_lite.daemon.controller import GuestStop, exit_status_for
from xend_lite.daemon.runstate import RunState as R


class Events:
    """Collects the event stream in the background."""

    def __init__(self, client):
        self.client = client
        self.items: list[dict] = []
        self.ended = False
        self._task: asyncio.Task | None = None

    async def __aenter__(self):
        await self.client.__aenter__()
        connected = asyncio.Event()

        async def run():
            ws = await self.client._session.ws_connect("http://x/events")
            connected.set()
            async for msg in ws:
                self.items.append(msg.json())
            self.ended = True

        self._task = asyncio.create_task(run())
        await asyncio.wait_for(connected.wait(), 5)
        await wait_for(lambda: True)
        await asyncio.sleep(0.05)  # the server has registered the subscriber
        return self

    async def __aexit__(self, *exc):
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        await self.client.__aexit__(*exc)

    def names(self) -> list[str]:
        return [e["event"] for e in self.items]

    async def until(self, *names: str, timeout: float = 5.0) -> list[str]:
        await wait_for(lambda: all(n in self.names() for n in names), timeout, f"events {names}")
        return self.names()


async def call(daemon, method, params=None):
    async with daemon.client() as c:
        return await c.call(method, params)


async def status(daemon):
    return (await call(daemon, "query-status"))["status"]


# -- refusals ------------------------------------------------------------------------------

async def shut_down(start_daemon):
    d = await start_daemon(on_poweroff="pause")
    d.domain.guest_shutdown("poweroff", 0)
    await wait_for(lambda: d.controller.state == R.SHUTDOWN)
    return d


async def test_state_refusals_name_current_and_allowed_states(start_daemon):
    d = await shut_down(start_daemon)
    with pytest.raises(RpcError) as e:
        await call(d, "cont")
    assert e.value.code == 1003 and e.value.error_class == "StateError"
    assert e.value.data == {"class": "StateError", "state": "shutdown", "allowed": ["paused", "running"]}
    assert "shutdown" in e.value.message and "paused" in e.value.message


async def test_stop_when_paused_and_cont_when_running_are_no_ops(daemon):
    """As in QMP: they succeed, change nothing and send no event."""
    async with Events(daemon.client()) as ev:
        await call(daemon, "cont")
        await call(daemon, "stop")
        calls = list(daemon.domain.calls)
        await call(daemon, "stop")
        assert await status(daemon) == "paused" and daemon.domain.calls == calls
        await call(daemon, "cont")
        calls = list(daemon.domain.calls)
        await call(daemon, "cont")
        assert await status(daemon) == "running" and daemon.domain.calls == calls
        await asyncio.sleep(0.1)
    assert [e["event"] for e in ev.items] == ["STOP", "RESUME"]
    assert daemon.controller.transitions[-2:] == [(R.RUNNING, R.PAUSED), (R.PAUSED, R.RUNNING)]


async def test_query_status_names_the_state_as_qmp_does(start_daemon):
    d = await start_daemon(start_paused=True)
    st = await call(d, "query-status")
    assert st == {"status": "paused", "running": False, "singlestep": False, "qmp-status": "paused"}
    await call(d, "cont")
    assert (await call(d, "query-status"))["qmp-status"] == "running"
    d.domain.guest_shutdown("crash", 1)
    await wait_for(lambda: d.controller.state == R.SHUTDOWN)
    assert (await call(d, "query-status"))["qmp-status"] == "guest-panicked"


def test_every_run_state_has_a_qmp_name():
    from xend_lite.daemon.runstate import QMP_NAMES, qmp_name

    assert set(QMP_NAMES) == set(R)
    assert qmp_name(R.CREATED) == "prelaunch" and qmp_name(R.SAVING) == "save-vm"
    assert qmp_name(R.RESTORING) == "restore-vm" and qmp_name(R.SHUTDOWN, "poweroff") == "shutdown"


async def test_refusal_happens_before_the_vm_owner_is_asked(start_daemon):
    d = await shut_down(start_daemon)
    before = list(d.domain.calls)
    with pytest.raises(RpcError):
        await call(d, "cont")
    assert d.domain.calls == before


async def test_shut_down_vm_allows_only_reset_and_queries(start_daemon):
    d = await start_daemon(on_poweroff="pause")
    d.domain.guest_shutdown("poweroff", 0)
    await wait_for(lambda: d.controller.state == R.SHUTDOWN)
    for method, params in [("stop", None), ("cont", None),
                           ("xen-overlay-map", {"page": "shared_info", "gpa": 0}),
                           ("snapshot-save", {"path": "x"})]:
        with pytest.raises(RpcError) as e:
            await call(d, method, params)
        assert e.value.data["state"] == "shutdown", method
    assert await call(d, "query-vcpus")
    await call(d, "system_reset")
    assert await status(d) == "running"


async def test_commands_during_a_save_are_refused_at_once(daemon):
    daemon.domain.slow_save = 1.0
    async with daemon.client() as c:
        save = asyncio.create_task(c.call("snapshot-save", {"path": "slow.snap"}))
        await wait_for(lambda: daemon.controller.state == R.SAVING, what="saving")
        assert await status(daemon) == "saving"
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(RpcError) as e:
            await call(daemon, "cont")
        assert asyncio.get_running_loop().time() - t0 < 0.5  # not queued behind the save
        assert e.value.data["state"] == "saving"
        with pytest.raises(RpcError):
            await call(daemon, "system_reset")
        result = await save
    assert result["size"] > 0
    assert await status(daemon) == "running"


# -- transitions and events ----------------------------------------------------------------

async def test_stop_cont_reset_events_in_order(daemon):
    async with Events(daemon.client()) as ev:
        await call(daemon, "stop")
        await call(daemon, "cont")
        await call(daemon, "system_reset")
        await call(daemon, "stop")
        await call(daemon, "system_reset")        # a paused VM stays paused
        await ev.until("RESET")
        await wait_for(lambda: ev.names().count("RESET") == 2)
    assert ev.names() == ["STOP", "RESUME", "RESET", "STOP", "RESET"]
    assert await status(daemon) == "paused"
    for e in ev.items:
        assert set(e) == {"event", "timestamp", "data"}
        assert set(e["timestamp"]) == {"seconds", "microseconds"}
        assert 0 <= e["timestamp"]["microseconds"] < 1_000_000
    stamps = [(e["timestamp"]["seconds"], e["timestamp"]["microseconds"]) for e in ev.items]
    assert stamps == sorted(stamps)


async def test_transitions_are_exact(daemon):
    c = daemon.controller
    await call(daemon, "stop")
    await call(daemon, "cont")
    await call(daemon, "snapshot-save", {"path": "a.snap"})
    await call(daemon, "snapshot-save", {"path": "b.snap", "paused": True})
    await call(daemon, "snapshot-load", {"path": "a.snap"})
    assert [(a.value, b.value) for a, b in c.transitions] == [
        ("created", "running"),
        ("running", "paused"), ("paused", "running"),                     # stop, cont
        ("running", "paused"), ("paused", "saving"), ("saving", "paused"), ("paused", "running"),
        ("running", "paused"), ("paused", "saving"), ("saving", "paused"),  # paused: true
        ("paused", "restoring"), ("restoring", "paused"),                 # load keeps paused
    ]


async def test_guest_poweroff_event_and_exit_status(start_daemon):
    d = await start_daemon()
    async with Events(d.client()) as ev:
        d.domain.guest_shutdown("poweroff", 7)
        status_ = await asyncio.wait_for(d.daemon.wait(), 5)
        await ev.until("SHUTDOWN")
    assert status_ == 7
    shutdown = [e for e in ev.items if e["event"] == "SHUTDOWN"][0]
    assert shutdown["data"] == {"guest": True, "reason": "poweroff", "code": 7}
    assert d.controller.state == R.SHUTDOWN


async def test_quit_replies_then_stops_with_shutdown_event(start_daemon):
    d = await start_daemon()
    async with Events(d.client()) as ev:
        assert await call(d, "quit") == {}
        assert await asyncio.wait_for(d.daemon.wait(), 5) == 0
        await d.daemon.stop()
        await wait_for(lambda: ev.ended, what="stream end")
    assert ev.names()[-1] == "SHUTDOWN"
    assert ev.items[-1]["data"]["guest"] is False
    assert d.domain.closed
    assert not os.path.exists(d.cfg.socket)


async def test_on_poweroff_pause_stays_up(start_daemon):
    d = await start_daemon(on_poweroff="pause")
    d.domain.guest_shutdown("poweroff", 0)
    await wait_for(lambda: d.controller.state == R.SHUTDOWN)
    await asyncio.sleep(0.1)
    assert not d.daemon._exit.done()
    assert (await call(d, "query-status"))["status"] == "shutdown"


async def test_reboot_resets_by_default(start_daemon):
    d = await start_daemon()
    async with Events(d.client()) as ev:
        d.domain.guest_shutdown("reboot", 1)
        await ev.until("SHUTDOWN", "RESET")
    assert ev.names() == ["SHUTDOWN", "RESET"]
    assert ev.items[0]["data"]["reason"] == "reboot"
    await wait_for(lambda: d.controller.state == R.RUNNING)
    assert [(a.value, b.value) for a, b in d.controller.transitions][-2:] == [
        ("running", "shutdown"), ("shutdown", "running")]
    assert not d.daemon._exit.done()


async def test_reboot_exits_when_asked(start_daemon):
    d = await start_daemon(on_reboot="exit")
    d.domain.guest_shutdown("reboot", 1)
    assert await asyncio.wait_for(d.daemon.wait(), 5) == 0


async def test_crash_panics_and_exits_non_zero(start_daemon):
    d = await start_daemon()
    async with Events(d.client()) as ev:
        d.domain.guest_shutdown("crash", 0)
        assert await asyncio.wait_for(d.daemon.wait(), 5) == 1
        await ev.until("GUEST_PANICKED", "SHUTDOWN")
    assert ev.names()[:2] == ["GUEST_PANICKED", "SHUTDOWN"]


async def test_internal_error_state(start_daemon):
    d = await start_daemon(on_poweroff="pause")
    d.domain.guest_shutdown("internal-error", 0)
    await wait_for(lambda: d.controller.state == R.INTERNAL_ERROR)
    assert await status(d) == "internal-error"
    with pytest.raises(RpcError) as e:
        await call(d, "cont")
    assert e.value.data["state"] == "internal-error"
    await call(d, "system_reset")
    assert await status(d) == "running"


def test_exit_status_for_guest_stops():
    assert exit_status_for(GuestStop("poweroff", 0)) == 0
    assert exit_status_for(GuestStop("poweroff", 3)) == 3
    assert exit_status_for(GuestStop("poweroff", 999)) == 1
    assert exit_status_for(GuestStop("crash", 0)) == 1
    assert exit_status_for(GuestStop("watchdog", 4)) == 4
    assert exit_status_for(GuestStop("reboot", 1)) == 0


async def test_started_paused(start_daemon):
    d = await start_daemon(start_paused=True)
    assert await status(d) == "paused"
    await call(d, "cont")
    assert await status(d) == "running"


# -- overlay and snapshot events -----------------------------------------------------------

async def test_overlay_events(daemon):
    async with Events(daemon.client()) as ev:
        await call(daemon, "xen-overlay-map", {"page": "shared_info", "gpa": 0x400000})
        await call(daemon, "xen-overlay-unmap", {"page": "shared_info"})
        await ev.until("XEN_OVERLAY_UNMAPPED")
    assert [(e["event"], e["data"]) for e in ev.items] == [
        ("XEN_OVERLAY_MAPPED", {"page": "shared_info", "gpa": 0x400000}),
        ("XEN_OVERLAY_UNMAPPED", {"page": "shared_info"})]


async def test_snapshot_save_load_and_describe(daemon):
    async with Events(daemon.client()) as ev:
        await call(daemon, "xen-overlay-map", {"page": "shared_info", "gpa": 0x400000})
        saved = await call(daemon, "snapshot-save", {"path": "one.snap"})
        await ev.until("SNAPSHOT_SAVED")
        path = os.path.join(daemon.cfg.snapshot_dir, "one.snap")
        assert saved["path"] == path and saved["size"] == os.path.getsize(path)
        assert saved["seconds"] >= 0
        assert await status(daemon) == "running"
        await call(daemon, "xen-overlay-unmap", {"page": "shared_info"})
        with pytest.raises(RpcError) as e:               # a name, not a host path
            await call(daemon, "snapshot-load", {"path": path})
        assert e.value.error_class == "InvalidArgument" and "absolute" in e.value.message
        loaded = await call(daemon, "snapshot-load", {"path": "one.snap"})
        await ev.until("SNAPSHOT_LOADED")
    assert loaded["path"] == path
    assert {"page": "shared_info", "gpa": 0x400000} in await call(daemon, "query-xen-overlay")
    names = ev.names()
    assert [n for n in names if n != "SNAPSHOT_PROGRESS"] == [
        "XEN_OVERLAY_MAPPED", "STOP", "RESUME", "SNAPSHOT_SAVED",
        "XEN_OVERLAY_UNMAPPED", "STOP", "RESUME", "SNAPSHOT_LOADED"]
    assert names[names.index("STOP") + 1] == "SNAPSHOT_PROGRESS"    # while the VM is paused
    saved_event = [e for e in ev.items if e["event"] == "SNAPSHOT_SAVED"][0]
    assert saved_event["data"] == saved
    info = await call(daemon, "query-snapshot", {"path": "one.snap"})
    assert info["format"] == "fake"


async def test_snapshot_save_paused_stays_paused(daemon):
    await call(daemon, "snapshot-save", {"path": "p.snap", "paused": True})
    assert await status(daemon) == "paused"


async def test_snapshot_errors(daemon):
    with pytest.raises(RpcError) as e:
        await call(daemon, "snapshot-load", {"path": "missing.snap"})
    assert e.value.error_class == "NotFound"
    with pytest.raises(RpcError) as e:
        await call(daemon, "query-snapshot", {"path": "missing.snap"})
    assert e.value.error_class == "NotFound"
    bad = os.path.join(daemon.cfg.snapshot_dir, "bad.snap")
    with open(bad, "w") as f:
        f.write("garbage")
    with pytest.raises(RpcError) as e:
        await call(daemon, "snapshot-load", {"path": "bad.snap"})
    assert e.value.code == 1010 and e.value.error_class == "SnapshotError"
    assert await status(daemon) == "running"  # a failed load resumes what was running
    with pytest.raises(RpcError) as e:
        await call(daemon, "snapshot-save", {"path": "no/such/dir/x.snap"})
    assert e.value.error_class == "NotFound"
    assert await status(daemon) == "running"


async def test_save_progress_is_logged(daemon, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="xend_lite")
    logging.getLogger("xend_lite").propagate = True
    try:
        await call(daemon, "snapshot-save", {"path": "log.snap"})
    finally:
        logging.getLogger("xend_lite").propagate = False
    assert any("100%" in r.getMessage() for r in caplog.records)
    assert any("snapshot saved" in r.getMessage() for r in caplog.records)
