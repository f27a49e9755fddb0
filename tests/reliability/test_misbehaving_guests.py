"""Guests that wreck themselves: the daemon reports how the run ended (run state and a
SHUTDOWN event with the reason) and stays controllable over RPC: query-status answers,
system_reset boots the guest again, quit stops the daemon."""

from __future__ import annotations

import asyncio

import pytest

from xend_lite.daemon.service import real_domain_factory

from .conftest import EventLog, wait_for

pytestmark = pytest.mark.kvm


async def start(start_daemon, guest_image, tmp_path, mode: str, **cfg):
    img = tmp_path / f"misbehave-{mode}.elf"
    img.write_bytes(guest_image("reliability/guests/misbehave.S", bits=32, **{mode: 1}))
    cfg.setdefault("on_poweroff", "pause")
    cfg.setdefault("start_paused", True)      # so the event stream is followed from the start
    d = await start_daemon(factory=real_domain_factory, image=str(img), memory_mib=32, **cfg)
    return d


async def follow_and_run(d, c, ev_client) -> EventLog:
    events = EventLog(ev_client)
    await wait_for(lambda: d.daemon.events.subscribers == 1, 5, "the event subscriber")
    await c.call("cont")
    return events


async def console(c) -> str:
    return (await c.call("query-console"))["data"]


@pytest.mark.parametrize("mode,reason", [("TRIPLE", "triple-fault"), ("HALT", "halted"),
                                         ("MSR_NOIDT", "triple-fault")])
async def test_dead_guest_is_reported_and_reset_boots_it_again(start_daemon, guest_image, tmp_path,
                                                               mode, reason):
    d = await start(start_daemon, guest_image, tmp_path, mode)
    async with d.client() as c, d.client(timeout=0) as ev_client:
        events = await follow_and_run(d, c, ev_client)
        try:
            await wait_for(lambda: d.controller.state.value == "shutdown", 10, f"{mode} to stop")
            status = await c.call("query-status")
            assert status["status"] == "shutdown" and not status["running"]
            shut = await events.wait("SHUTDOWN")
            assert shut[0]["data"]["reason"] == reason and shut[0]["data"]["guest"] is True
            assert (await console(c)).count("start") == 1
            # still controllable: queries answer, commands that need a running VM say so
            assert isinstance(await c.call("query-vcpus"), list)
            from xend_lite.cli.ctl import RpcError
            with pytest.raises(RpcError) as err:
                await c.call("stop")
            assert err.value.error_class == "StateError"
            # a reset boots it again, and it dies again the same way
            await c.call("system_reset")
            await events.wait("SHUTDOWN", 2)
            assert events.named("SHUTDOWN")[1]["data"]["reason"] == reason
            await wait_for(lambda: d.controller.state.value == "shutdown", 10)
            assert (await console(c)).count("start") == 2
            assert (await c.call("query-status"))["status"] == "shutdown"
        finally:
            await events.close()


async def test_triple_fault_with_default_policy_ends_the_daemon_with_failure(start_daemon, guest_image,
                                                                             tmp_path):
    d = await start(start_daemon, guest_image, tmp_path, "TRIPLE", on_poweroff="exit", start_paused=False)
    assert await asyncio.wait_for(d.daemon.wait(), 10) == 1
    assert "triple-fault" in d.daemon.exit_why


async def test_spinning_guest_stays_running_and_obeys(start_daemon, guest_image, tmp_path):
    d = await start(start_daemon, guest_image, tmp_path, "SPIN", start_paused=False)
    async with d.client() as c:
        await asyncio.sleep(1.5)          # long enough for the halt watcher to look at it
        assert (await c.call("query-status"))["status"] == "running"
        for _ in range(5):
            await c.call("stop")
            assert (await c.call("query-status"))["status"] == "paused"
            await c.call("cont")
            assert (await c.call("query-status"))["status"] == "running"
        await c.call("system_reset")
        await wait_for(lambda: d.domain.machine.console.text().count("start") == 2, 10)
        assert (await c.call("query-status"))["status"] == "running"
        assert d.domain.machine.status is None


async def test_garbage_in_the_hypercall_msr_is_refused_with_gp(start_daemon, guest_image, tmp_path):
    d = await start(start_daemon, guest_image, tmp_path, "MSR", start_paused=False)
    async with d.client() as c:
        await wait_for(lambda: "page=" in d.domain.machine.console.text(), 10, "the MSR guest to report")
        await asyncio.sleep(0.05)
        out = await console(c)
        assert "msr gp=00000007 page=000000b8" in out, out   # 7 refused, then the page filled
        assert (await c.call("query-status"))["status"] == "running"
        hc = await c.call("query-hypercalls")
        assert hc["hypercall_page"] == 0x200000 and hc["internal_errors"] == 0
        await c.call("system_reset")
        await wait_for(lambda: d.domain.machine.console.text().count("page=") == 2, 10)
        assert (await c.call("query-status"))["status"] == "running"
