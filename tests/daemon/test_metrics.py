"""GET /metrics: Prometheus text 0.0.4 checked by a strict parser, with counts that match
what the test did; the same access rules as /rpc. The VM's own counters come from a real
guest (a hypercall table that makes failing calls)."""

from __future__ import annotations

import asyncio
import struct

import aiohttp
import pytest

from tests.daemon.promtext import FormatError, parse
from tests.daemon.test_server import TOKEN, tcp_daemon, token_file  # noqa: F401 - fixture
from xend_lite.cli.ctl import RpcError
from xend_lite.daemon.metrics import CONTENT_TYPE


async def scrape(c) -> tuple[dict, str]:
    async with c._session.get(c.base + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == CONTENT_TYPE
        text = await r.text()
    return parse(text), text


@pytest.mark.parametrize("bad", [
    "x 1",                                               # no final newline
    "# TYPE x counter\nx{a=\"1} 1\n",                   # unterminated label
    "# TYPE x counter\nx 1\nx 2\n",                      # repeated sample
    "x 1\n",                                             # sample before TYPE
    "# TYPE x counter\nx one\n",                         # bad value
    "# TYPE x counter\n# TYPE y gauge\ny 1\nx 1\n",      # family split
    "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
    "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
    "# TYPE x counter\nx -1\n",
])
def test_the_parser_is_strict(bad):
    with pytest.raises(FormatError):
        parse(bad)


async def test_counts_match_what_was_done(daemon):
    async with daemon.client() as c:
        before, _ = await scrape(c)
        assert before["xend_lite_run_state"].value(state="running") == 1
        assert before["xend_lite_run_state"].value(state="paused") == 0
        for _ in range(7):
            await c.call("query-status")
        for _ in range(3):
            with pytest.raises(RpcError):
                await c.call("query-console", {"max_bytes": -1})
        await c.call("stop")
        fams, text = await scrape(c)
    req = fams["xend_lite_rpc_requests_total"]
    assert req.value(method="query-status", result="ok") == 7
    assert req.value(method="query-console", result="error") == 3
    assert req.value(method="stop", result="ok") == 1
    lat = fams["xend_lite_rpc_request_duration_seconds"]
    assert lat.type == "histogram"
    assert lat.value("_count", method="query-status") == 7
    assert lat.value("_bucket", method="query-status", le="+Inf") == 7
    assert 0 < lat.value("_sum", method="query-status") < 7 * 5
    assert fams["xend_lite_run_state"].value(state="paused") == 1
    assert fams["xend_lite_events_total"].value(event="STOP") == 1
    assert fams["xend_lite_uptime_seconds"].value() > 0
    assert 'method="query-status"' in text and fams["xend_lite_snapshot_saves_total"].value() == 0


async def test_snapshot_durations_and_bytes(daemon):
    async with daemon.client() as c:
        r1 = await c.call("snapshot-save", {"path": "a.xls"})
        r2 = await c.call("snapshot-save", {"path": "b.xls"})
        await c.call("snapshot-load", {"path": "a.xls"})
        fams, _ = await scrape(c)
    assert fams["xend_lite_snapshot_saves_total"].value() == 2
    assert fams["xend_lite_snapshot_save_bytes_total"].value() == r1["size"] + r2["size"]
    assert fams["xend_lite_snapshot_save_seconds_total"].value() == pytest.approx(
        r1["seconds"] + r2["seconds"])
    assert fams["xend_lite_snapshot_loads_total"].value() == 1


async def test_same_access_rules_as_rpc(start_daemon, token_file):  # noqa: F811
    d, url = await tcp_daemon(start_daemon, token_file)
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}):
            async with s.get(url + "/metrics", headers=headers) as r:
                assert r.status == 401
        async with s.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
            parse(await r.text())


@pytest.mark.kvm
async def test_vm_counters_from_a_real_guest(start_daemon, guest_image, tmp_path):
    from tests.xen.conftest import ENTRY, HCPAGE, TABLE
    from xend_lite.vmm.domain import Domain
    from xend_lite.xen.xenabi import X

    sched_op = getattr(X, "__HYPERVISOR_sched_op")
    img = tmp_path / "hcall64.elf"
    img.write_bytes(guest_image("xen/guests/hcall.S", bits=64))
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def factory(cfg, emit):
        dom = Domain(cfg, emit)
        calls = [(sched_op, 99, 0)] * 3 + [(sched_op, X.SCHEDOP_yield, 0)] * 2
        table = bytearray(struct.pack("<QQ", len(calls), HCPAGE).ljust(64, b"\0"))
        for nr, a1, a2 in calls:
            table += struct.pack("<6QQQ", nr, a1, a2, 0, 0, 0, 0, 0).ljust(ENTRY, b"\0")
        dom.machine.mem.write(TABLE, bytes(table))
        dom.machine.exits.register_io_out(0xF0, lambda _r, _e: loop.call_soon_threadsafe(done.set))
        return dom

    d = await start_daemon(factory=factory, image=str(img), memory_mib=64)
    await asyncio.wait_for(done.wait(), 20)
    async with d.client() as c:
        hc = await c.call("query-hypercalls")
        vcpus = await c.call("query-vcpus")
        fams, _ = await scrape(c)
    assert hc["hypercalls"]["sched_op"] == {"calls": 5, "errors": 3,
                                            "errnos": {str(X.XEN_ENOSYS): 3}}
    assert fams["xend_lite_hypercalls_total"].value(name="sched_op") == 5
    errs = fams["xend_lite_hypercall_errors_total"]
    assert errs.value(name="sched_op", errno=str(X.XEN_ENOSYS)) == 3
    assert len([k for k in errs.samples if dict(k[1])["name"] == "sched_op"]) == 1
    assert fams["xend_lite_event_channel_sends_total"].value() == hc["event_sends"]
    exits = fams["xend_lite_vcpu_exits_total"]
    # the exits scraped after query-vcpus are at least what it saw (the guest idles in pause)
    for reason, n in vcpus[0]["exits"].items():
        assert exits.value(vcpu="0", reason=reason) >= n
    assert exits.value(vcpu="0", reason="IoOut") >= 1         # the guest's done signal
    assert exits.value(vcpu="0", reason="MsrWrite") >= 1      # the hypercall page's MSR
