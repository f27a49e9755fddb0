"""Connection limits, in process with small caps: a connection that sends no whole request
in time is closed, a newcomer at the cap replaces the oldest idle or tokenless connection,
and a connection being answered (or streaming events) is never the one replaced."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import pytest

from xend_lite.cli.ctl import Client
from xend_lite.daemon import connections as C

from .test_server import TOKEN, token_file  # noqa: F401 - the fixture

HALF = b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-"
QUERY = (b'POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 48\r\n'
         b'\r\n{"jsonrpc":"2.0","id":1,"method":"query-status"}')


@pytest.fixture
def small(monkeypatch):
    """Caps of at most 12 connections (3 without the token) and a 1 s request timeout."""
    real = C.Limits.for_fd_limit

    def for_fd_limit(nofile, in_use, listeners=1):
        return C.Limits(min(real(nofile, in_use, listeners).max_connections, 12), 3, 1.0)
    monkeypatch.setattr(C.Limits, "for_fd_limit", staticmethod(for_fd_limit))


async def opened(where, n: int, send: bytes = b"") -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX if isinstance(where, str) else socket.AF_INET)
        s.setblocking(False)
        await asyncio.get_running_loop().sock_connect(s, where)
        if send:
            s.send(send)
        out.append(s)
    await asyncio.sleep(0.05)            # let the daemon accept them
    return out


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def query(where) -> dict:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_UNIX if isinstance(where, str) else socket.AF_INET)
    s.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(s, where), 2)
        await loop.sock_sendall(s, QUERY)
        raw = await asyncio.wait_for(loop.sock_recv(s, 65536), 2)
    finally:
        s.close()
    assert raw.startswith(b"HTTP/1.1 200"), raw[:100]
    return raw


async def test_half_a_request_is_closed_after_the_timeout(small, start_daemon):
    d = await start_daemon()
    sock = d.cfg.socket
    silent, half = await opened(sock, 1), await opened(sock, 1, HALF)
    body = await opened(sock, 1, QUERY[:-10])          # the body stops 10 bytes short
    t0 = time.monotonic()
    conns = silent + half + body
    while not all(closed_by_peer(s) for s in conns):
        assert time.monotonic() - t0 < 3, "a connection without a whole request stayed open"
        await asyncio.sleep(0.05)
    assert time.monotonic() - t0 > 0.8
    for s in conns:
        s.close()
    await query(sock)
    guard = d.daemon.connections
    assert guard.counts["closed"] == 3


async def test_a_keep_alive_client_is_timed_per_request(small, start_daemon):
    d = await start_daemon()
    async with d.client() as c:              # one connection, kept alive between calls
        for _ in range(3):
            assert (await c.call("query-status"))["status"] == "running"
            await asyncio.sleep(0.4)


async def test_a_newcomer_at_the_cap_replaces_the_oldest_idle_connection(small, start_daemon):
    d = await start_daemon()
    guard = d.daemon.connections
    cap = guard.limits.max_connections
    first = await opened(d.cfg.socket, cap, HALF)
    assert guard.open == cap
    await query(d.cfg.socket)                         # gets in, is answered
    assert closed_by_peer(first[0]) and not closed_by_peer(first[-1])
    more = await opened(d.cfg.socket, 3 * cap, HALF)  # far more than the cap
    await query(d.cfg.socket)
    assert guard.open <= cap
    assert sum(not closed_by_peer(s) for s in first + more) <= cap
    for s in first + more:
        s.close()


async def test_a_connection_being_answered_is_never_replaced(small, start_daemon):
    d = await start_daemon()
    d.domain.slow_save = 2.0
    guard = d.daemon.connections
    async with d.client(timeout=10) as c, Client(d.cfg.socket) as events:
        stream = events.events()
        save = asyncio.create_task(c.call("snapshot-save", {"path": "slow.snap"}))
        first = await stream.__anext__()                # the stream is up: STOP
        assert first["event"] == "STOP"
        flood = await opened(d.cfg.socket, 4 * guard.limits.max_connections, HALF)
        saved = await save                             # answered, though the flood came after
        assert saved["path"].endswith("slow.snap")
        names = []
        while "SNAPSHOT_SAVED" not in names:
            names.append((await stream.__anext__())["event"])
        names = [n for n in names if n != "SNAPSHOT_PROGRESS"]
        assert names == ["RESUME", "SNAPSHOT_SAVED"]   # the event stream stayed too
        for s in flood:
            s.close()


async def test_tcp_without_the_token_is_capped_apart(small, start_daemon, token_file):  # noqa: F811
    d = await start_daemon(tcp="127.0.0.1:0", token_file=token_file)
    guard = d.daemon.connections
    where = ("127.0.0.1", d.daemon.tcp_port())
    idle_unix = await opened(d.cfg.socket, 4, HALF)
    tokenless = await opened(where, 10)
    assert guard.unauthenticated <= guard.limits.max_unauthenticated
    assert not any(closed_by_peer(s) for s in idle_unix), "Unix clients paid for TCP ones"
    async with Client(tcp_url=f"http://{where[0]}:{where[1]}", token=TOKEN) as c:
        assert (await c.call("query-status"))["status"] == "running"
    for s in idle_unix + tokenless:
        s.close()


def test_accept_errors_are_logged_at_a_bounded_rate(caplog):
    guard = C.ConnectionGuard()
    loop = asyncio.new_event_loop()
    try:
        guard.install_exception_handler(loop)
        caplog.set_level(logging.DEBUG)
        logging.getLogger("xend_lite").propagate = True
        for _ in range(10_000):
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(24, os.strerror(24))})
        accept = [r for r in caplog.records if "accept" in r.getMessage()]
        assert 1 <= len(accept) <= 5
        loop.call_exception_handler({"message": "something else"})
        assert any("something else" in r.getMessage() for r in caplog.records)
    finally:
        logging.getLogger("xend_lite").propagate = False
        loop.close()


def test_rate_limited_log_says_how_many_it_left_out(caplog):
    caplog.set_level(logging.INFO)
    say = C.RateLimitedLog(logging.getLogger("t"), burst=2, interval=0.05)
    sent = [say(logging.INFO, "m") for _ in range(10)]
    assert sent[:2] == [True, True] and not any(sent[2:])
    time.sleep(0.06)
    assert say(logging.INFO, "m")
    assert "8 more like this" in caplog.records[-1].getMessage()


def test_limits_follow_the_descriptor_limit():
    assert C.Limits.for_fd_limit(1024, 30, 2).max_connections == \
        1024 - 30 - C.FD_RESERVE - 2 * C.ACCEPTS_PER_TURN
    assert C.Limits.for_fd_limit(1 << 20, 30).max_connections == C.MAX_CONNECTIONS
    assert C.Limits.for_fd_limit(50, 40).max_connections >= 1


async def test_a_request_after_an_earlier_one_gets_the_whole_timeout(small, start_daemon):
    """The clock's timer, set for the first request, runs out before the deadline of a half
    request sent later on the same connection: that one is still given its whole second,
    and then closed."""
    d = await start_daemon()
    loop = asyncio.get_running_loop()
    s = (await opened(d.cfg.socket, 1))[0]
    try:
        await loop.sock_sendall(s, QUERY)
        assert (await asyncio.wait_for(loop.sock_recv(s, 65536), 2)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.5)
        await loop.sock_sendall(s, HALF)
        t_half = time.monotonic()
        while not closed_by_peer(s):
            assert time.monotonic() - t_half < 3, "the half request was never timed out"
            await asyncio.sleep(0.02)
        assert 0.9 < time.monotonic() - t_half < 2.0
    finally:
        s.close()


async def test_back_to_back_requests_share_one_clock_timer(small, start_daemon, monkeypatch):
    """A keep-alive client's requests start the clock without making a timer each."""
    d = await start_daemon()
    loop = asyncio.get_running_loop()
    made = []
    real = loop.call_at

    def call_at(when, callback, *args, **kw):
        if getattr(callback, "__func__", None) is C.Connection._expired:
            made.append(when)
        return real(when, callback, *args, **kw)

    monkeypatch.setattr(loop, "call_at", call_at)
    async with d.client() as c:
        for _ in range(50):
            assert (await c.call("query-status"))["status"] == "running"
    assert 1 <= len(made) <= 2, made
