"""Load: 100 concurrent RPC clients and 50 event subscribers (half of which never read a
byte) against the real daemon while its guest runs. No request is lost or stuck, readers
keep their stream, non-readers are dropped rather than holding memory, and the daemon's
RSS stays bounded."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import time

import aiohttp
import pytest

from .conftest import scaled
from .daemonproc import DaemonProc, wait_until

pytestmark = pytest.mark.kvm

CLIENTS = 100
READERS = 25
NON_READERS = 25
EVENT_MAKERS = 40
QUERIES = ("query-status", "query-hypercalls", "query-vcpus", "query-console", "query-xen-overlay",
           "query-version", "query-memory-map")


@pytest.fixture
def daemon():
    tmp = tempfile.mkdtemp(prefix="xl-")
    d = DaemonProc(tmp, tcp=False)
    try:
        wait_until(lambda: d.result("query-hypercalls")["hypercall_page"] is not None, 15,
                   "the default guest's hypercall page")
        yield d
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def client(sock: str, n: int, stop_at: float, stats: dict, events: bool) -> None:
    conn = aiohttp.UnixConnector(path=sock)
    async with aiohttp.ClientSession(connector=conn) as s:
        i = 0
        while time.monotonic() < stop_at:
            rid = n * 10_000_000 + i
            if events and i % 2:
                # map and unmap a grant page above RAM: events for every subscriber, vCPUs run on
                gpa = (1 << 32) if i % 4 == 1 else (1 << 64) - 1
                req = {"jsonrpc": "2.0", "id": rid, "method": "xen-overlay-map",
                       "params": {"page": "grant:7", "gpa": gpa}}
            else:
                req = {"jsonrpc": "2.0", "id": rid, "method": QUERIES[(n + i) % len(QUERIES)]}
            t0 = time.monotonic()
            async with asyncio.timeout(30):
                async with s.post("http://xend-lite/rpc", data=json.dumps(req)) as r:
                    body = await r.json()
            stats["max_latency"] = max(stats["max_latency"], time.monotonic() - t0)
            assert r.status == 200 and body["id"] == rid and "result" in body, body
            stats["requests"] += 1
            i += 1


async def reader(sock: str, stats: dict, started: asyncio.Event) -> None:
    conn = aiohttp.UnixConnector(path=sock)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.ws_connect("http://xend-lite/events") as ws:
            stats["readers_connected"] += 1
            started.set()
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    stats["events_read"] += 1
                else:
                    break
            stats["reader_closes"].append(ws.close_code)


def non_reader(path: str) -> socket.socket:
    """A WebSocket handshake, then nothing: this client never reads."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(path)
    s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    return s


async def load(d: DaemonProc, seconds: float) -> dict:
    stats = {"requests": 0, "max_latency": 0.0, "events_read": 0, "readers_connected": 0,
             "reader_closes": []}
    dropped_before = d.log_text().count("event subscriber dropped")
    silent = [non_reader(d.sock) for _ in range(NON_READERS)]
    started = asyncio.Event()
    readers = [asyncio.create_task(reader(d.sock, stats, started)) for _ in range(READERS)]
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.5)
    stop_at = time.monotonic() + seconds
    clients = [asyncio.create_task(client(d.sock, n, stop_at, stats, events=n < EVENT_MAKERS))
               for n in range(CLIENTS)]
    results = await asyncio.gather(*clients, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"
    stats["readers_alive"] = sum(not t.done() for t in readers)
    # Subscribers that never read must be dropped once their queue is full, whatever the
    # machine's speed: publish until they are (each holds at most its queue and the socket
    # buffer), or give up after far more events than that.
    stats["drain_events"] = 0
    end = time.monotonic() + 60
    def dropped() -> int:
        return d.log_text().count("event subscriber dropped") - dropped_before

    while dropped() < NON_READERS and time.monotonic() < end:
        await client(d.sock, 99, time.monotonic() + 0.5, stats, events=True)
        stats["drain_events"] += 1
    stats["dropped"] = dropped()
    for t in readers:
        t.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    for s in silent:
        s.close()
    return stats


def rss_limit_kib(requests: int) -> int:
    """What a load of ``requests`` may add to the daemon's RSS: 1 MiB of slack for the
    allocator, plus 32 bytes a request. Keeping each request's body alone is about 125 bytes
    a request, and so is one small object per request."""
    return 1024 + requests * 32 // 1024


def growth_within_limit(d: DaemonProc, grown: int, requests: int) -> None:
    """The RSS grew ``grown`` KiB over ``requests``. Over the limit, a second, shorter load
    tells a leak (which grows again with every request) from the allocator settling at a
    new high-water mark (which does not grow again)."""
    limit = rss_limit_kib(requests)
    print(f"RSS grew {grown} KiB (limit {limit} KiB for {requests} requests)")
    if grown < limit:
        return
    before = d.rss_kib()
    again = asyncio.run(load(d, 5))["requests"]
    grown_again = d.rss_kib() - before
    print(f"and {grown_again} KiB more over {again} more requests (limit {rss_limit_kib(again)})")
    assert grown_again < rss_limit_kib(again), "the daemon's memory grew under load"


def test_many_clients_and_subscribers(daemon, request):
    d = daemon
    seconds = scaled(10, 60, request)
    asyncio.run(load(d, 2))                      # warm up: allocator, caches, first events
    rss_before = d.rss_kib()
    hc_before = d.result("query-hypercalls")["total"]
    t0 = time.monotonic()
    stats = asyncio.run(load(d, seconds))
    took = time.monotonic() - t0
    rss_after = d.rss_kib()
    hc_after = d.result("query-hypercalls")
    print(f"\n{CLIENTS} clients, {READERS}+{NON_READERS} subscribers for {seconds} s: "
          f"{stats['requests']} requests ({stats['requests'] / took:.0f}/s), max latency "
          f"{stats['max_latency'] * 1000:.0f} ms, {stats['events_read']} events read, RSS "
          f"{rss_before} -> {rss_after} KiB")
    assert stats["requests"] > CLIENTS * 5
    assert stats["readers_connected"] == READERS
    assert stats["readers_alive"] == READERS, "a reading subscriber lost its stream"
    assert stats["events_read"] > 0
    assert d.result("query-status")["status"] == "running"
    assert hc_after["internal_errors"] == 0 and hc_after["total"] > hc_before
    growth_within_limit(d, rss_after - rss_before, stats["requests"])
    assert d.alive()
    log = d.log_text()
    assert "Traceback" not in log
    dropped = stats["dropped"]
    print(f"non-readers dropped: {dropped} of {NON_READERS} (after {stats['drain_events']} "
          "extra half-second bursts)")
    assert dropped >= NON_READERS, "a subscriber that never reads was kept: its queue would grow"


@pytest.mark.slow
def test_many_clients_and_subscribers_long(daemon, request):
    test_many_clients_and_subscribers(daemon, request)
