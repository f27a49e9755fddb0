"""The way back from the VM owner to the event loop: a command's events, its run state and its
reply reach the loop in order on one wake; a long command's events as they happen; a call
that fails there does not lose the others; a command cancelled before it runs never runs."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from tests.daemon.conftest import wait_for
from xend_lite.daemon.runstate import RunState as R


def watch(monkeypatch, controller):
    """What reaches the loop, in order: ("wake", thread), ("event", name), ("state", state)."""
    seen: list[tuple] = []
    loop = asyncio.get_running_loop()
    real = loop.call_soon_threadsafe

    def wake(fn, *args, **kw):
        seen.append(("wake", threading.current_thread().name))
        return real(fn, *args, **kw)

    publish, on_state = controller._publish, controller._on_state
    monkeypatch.setattr(loop, "call_soon_threadsafe", wake)
    monkeypatch.setattr(controller, "_publish", lambda n, d, t: (seen.append(("event", n)), publish(n, d, t)))
    monkeypatch.setattr(controller, "_on_state", lambda s: (seen.append(("state", s)), on_state(s)))
    return seen


@pytest.mark.parametrize("command,event,state", [
    ("stop", "STOP", R.PAUSED),
    ("overlay", "XEN_OVERLAY_MAPPED", None),
])
async def test_a_command_wakes_the_loop_once_for_its_events_state_and_reply(daemon, monkeypatch,
                                                                          command, event, state):
    c = daemon.controller
    seen = watch(monkeypatch, c)
    if command == "stop":
        await c.stop()
    else:
        await c.overlay_map("shared_info", 0x400000)
    seen.append(("reply",))
    await asyncio.sleep(0)           # the run state's listener runs a turn after the reply
    wakes = [s for s in seen if s[0] == "wake"]
    assert len(wakes) == 1 and wakes[0][1] == "vm-owner", seen
    rest = [s for s in seen if s[0] != "wake"]
    assert rest == [("event", event), ("reply",)] + ([("state", state)] if state else []), seen


async def test_back_to_back_commands_keep_their_order(daemon, monkeypatch):
    c = daemon.controller
    seen = watch(monkeypatch, c)
    await asyncio.gather(c.stop(), c.cont(), c.stop(), c.cont())
    await asyncio.sleep(0)
    assert [s[1] for s in seen if s[0] == "event"] == ["STOP", "RESUME", "STOP", "RESUME"]
    assert [s[1] for s in seen if s[0] == "state"] == [R.PAUSED, R.RUNNING, R.PAUSED, R.RUNNING]
    assert c.transitions[-4:] == [(R.RUNNING, R.PAUSED), (R.PAUSED, R.RUNNING)] * 2


async def test_a_long_command_sends_its_events_as_they_happen(daemon, monkeypatch):
    """A save's STOP and progress reach the loop while it still runs, not with its reply."""
    daemon.domain.slow_save = 0.8
    c = daemon.controller
    seen = watch(monkeypatch, c)
    save = asyncio.create_task(c.snapshot_save("slow.xls"))
    await wait_for(lambda: ("event", "SNAPSHOT_PROGRESS") in seen, 5, "progress during the save")
    assert not save.done() and ("event", "STOP") in seen and ("state", R.SAVING) in seen
    await save
    assert seen[-1] != ("event", "SNAPSHOT_PROGRESS")


async def test_a_failing_call_on_the_loop_does_not_lose_the_others(daemon, caplog):
    c = daemon.controller
    got: list[int] = []

    def boom() -> None:
        raise RuntimeError("listener failed")

    def from_a_thread() -> None:
        c._to_loop(got.append, 1)
        c._to_loop(boom)
        c._to_loop(got.append, 2)

    with caplog.at_level(logging.ERROR, "xend_lite.controller"):
        await asyncio.to_thread(from_a_thread)
        await wait_for(lambda: got == [1, 2], 5, "the calls after the failing one")
    assert "listener failed" in caplog.text


async def test_a_command_cancelled_before_the_owner_takes_it_never_runs(daemon):
    """Queued behind a save, then cancelled (its client went away): it never runs."""
    daemon.domain.slow_save = 0.6
    c = daemon.controller
    save = asyncio.create_task(c.snapshot_save("queued.xls"))
    await wait_for(lambda: c.job is not None, 5, "the save to start")
    queued = asyncio.create_task(c.query("query_vcpus"))
    await asyncio.sleep(0.02)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    await save
    assert await c.query("query_hypercalls")       # the owner goes on
    assert "query_vcpus" not in [n for n, _t in daemon.domain.calls]
