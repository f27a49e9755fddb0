"""Listeners and transport: the Unix socket's mode and life, TCP with a bearer token, and
the event stream's fan-out (a slow reader is dropped, the others carry on)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat

import aiohttp
import pytest

from tests.daemon.conftest import wait_for
from xend_lite.cli.ctl import Client, RpcError
from xend_lite.daemon.events import EventBus
from xend_lite.daemon.listen import ListenError, bind_unix
from xend_lite.daemon.service import ExitCode, StartError

TOKEN = "s3cret-token-0123456789abcdef"


async def test_socket_is_owner_only(daemon):
    st = os.stat(daemon.cfg.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_socket_directory_created_owner_only(short_tmp):
    path = os.path.join(short_tmp, "sub", "x.sock")
    lst = bind_unix(path)
    try:
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        lst.sock.close()


def test_stale_socket_is_replaced(short_tmp):
    path = os.path.join(short_tmp, "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # a file nobody listens on
    lst = bind_unix(path)
    lst.sock.close()


def test_live_socket_and_plain_file_are_refused(short_tmp):
    path = os.path.join(short_tmp, "live.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(1)
    try:
        with pytest.raises(ListenError, match="in use"):
            bind_unix(path)
    finally:
        s.close()
    plain = os.path.join(short_tmp, "plain")
    open(plain, "w").close()
    with pytest.raises(ListenError, match="not a socket"):
        bind_unix(plain)


async def test_second_daemon_on_the_same_socket_fails_to_start(start_daemon, daemon):
    with pytest.raises(StartError) as e:
        await start_daemon(socket=daemon.cfg.socket)
    assert e.value.code == ExitCode.SOCKET
    # the first one is untouched
    async with daemon.client() as c:
        assert (await c.call("query-status"))["status"] == "running"


async def test_socket_removed_on_stop(start_daemon):
    d = await start_daemon()
    path = d.cfg.socket
    await d.stop()
    assert not os.path.exists(path)


# -- TCP -----------------------------------------------------------------------------------

@pytest.fixture
def token_file(short_tmp):
    path = os.path.join(short_tmp, "token")
    with open(path, "w") as f:
        f.write(TOKEN + "\n")
    os.chmod(path, 0o600)
    return path


async def tcp_daemon(start_daemon, token_file):
    d = await start_daemon(tcp="127.0.0.1:0", token_file=token_file)
    return d, f"http://127.0.0.1:{d.daemon.tcp_port()}"


async def test_tcp_needs_the_token(start_daemon, token_file):
    d, url = await tcp_daemon(start_daemon, token_file)
    body = '{"jsonrpc":"2.0","id":1,"method":"query-status"}'
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
            async with s.post(f"{url}/rpc", data=body, headers=headers) as resp:
                assert resp.status == 401, headers
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert "Unauthorized" in (await resp.json())["error"]["message"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await s.ws_connect(f"{url}/events")
        assert e.value.status == 401
        async with s.post(f"{url}/rpc", data=body, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["result"]["status"] == "running"
    async with Client(tcp_url=url, token=TOKEN) as c:
        assert (await c.call("query-status"))["running"] is True
    # the Unix socket needs no token
    async with d.client() as c:
        assert (await c.call("query-status"))["running"] is True


async def test_the_token_is_checked_by_token_matches(start_daemon, token_file, monkeypatch):
    """The constant-time check that tests/reliability/test_token_timing.py measures is the
    one the daemon uses on every TCP request."""
    from xend_lite.daemon import server

    seen = []
    real = server.token_matches
    monkeypatch.setattr(server, "token_matches", lambda g, t: seen.append(g) or real(g, t))
    d, url = await tcp_daemon(start_daemon, token_file)
    async with aiohttp.ClientSession() as s:
        for given, status in (("wrong-token-wrong-token", 401), (TOKEN, 200)):
            async with s.post(f"{url}/rpc", data="{}", headers={"Authorization": f"Bearer {given}"}) as r:
                assert r.status == status
    assert seen == ["wrong-token-wrong-token", TOKEN]


async def test_tcp_events_with_token(start_daemon, token_file):
    d, url = await tcp_daemon(start_daemon, token_file)
    async with Client(tcp_url=url, token=TOKEN) as c:
        stream = c.events()
        first = asyncio.create_task(stream.__anext__())
        await wait_for(lambda: d.daemon.events.subscribers == 1)
        await c.call("stop")
        event = await asyncio.wait_for(first, 5)
        await stream.aclose()
    assert event["event"] == "STOP"


async def test_tcp_without_token_file_does_not_start(start_daemon, short_tmp):
    from xend_lite.errors import ConfigError

    with pytest.raises(ConfigError, match="token_file"):
        await start_daemon(tcp="127.0.0.1:0")
    with pytest.raises(StartError) as e:
        await start_daemon(tcp="127.0.0.1:0", token_file=os.path.join(short_tmp, "missing"))
    assert e.value.code == ExitCode.CONFIG
    short = os.path.join(short_tmp, "short")
    with open(short, "w") as f:
        f.write("abc")
    os.chmod(short, 0o600)
    with pytest.raises(StartError, match="shorter"):
        await start_daemon(tcp="127.0.0.1:0", token_file=short)


@pytest.mark.parametrize("mode", [0o666, 0o644, 0o640, 0o620, 0o602, 0o604])
async def test_a_token_file_others_can_read_or_write_is_refused(start_daemon, token_file, mode):
    os.chmod(token_file, mode)
    with pytest.raises(StartError, match="chmod 600") as e:
        await start_daemon(tcp="127.0.0.1:0", token_file=token_file)
    assert e.value.code == ExitCode.CONFIG and f"{mode:04o}" in str(e.value)
    os.chmod(token_file, 0o400)                                  # read-only for us is fine
    await start_daemon(tcp="127.0.0.1:0", token_file=token_file)


async def test_a_token_file_of_another_user_is_refused(start_daemon, token_file):
    os.chown(token_file, os.geteuid() + 1, -1)
    with pytest.raises(StartError, match="owned by uid") as e:
        await start_daemon(tcp="127.0.0.1:0", token_file=token_file)
    assert e.value.code == ExitCode.CONFIG


async def test_tcp_port_in_use(start_daemon, token_file):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        with pytest.raises(StartError) as e:
            await start_daemon(tcp=f"127.0.0.1:{s.getsockname()[1]}", token_file=token_file)
        assert e.value.code == ExitCode.SOCKET
    finally:
        s.close()


# -- the event stream ----------------------------------------------------------------------

async def test_slow_subscriber_is_dropped_and_others_continue(daemon):
    """A reader that stops reading fills its socket, then its queue, and is dropped; the
    reader that keeps up gets every event."""
    bus = daemon.daemon.events
    bus._queue_size = 8
    pad = "x" * 65536
    async with daemon.client() as fast_client, daemon.client() as slow_client:
        slow = await slow_client._session.ws_connect("http://x/events", max_msg_size=0)
        fast = await fast_client._session.ws_connect("http://x/events", max_msg_size=0)
        await wait_for(lambda: bus.subscribers == 2)
        got = []

        async def read_fast():
            async for msg in fast:
                got.append(msg.json()["data"]["i"])

        reader = asyncio.create_task(read_fast())
        sent = 0
        while bus.dropped == 0 and sent < 2000:
            bus.publish("TEST", {"i": sent, "pad": pad})
            sent += 1
            await asyncio.sleep(0.001)
        assert bus.dropped == 1, "the reader that never reads was not dropped"
        assert bus.subscribers == 1
        for i in range(sent, sent + 5):
            bus.publish("TEST", {"i": i, "pad": pad})
        await wait_for(lambda: len(got) == sent + 5, 10, "the fast reader's events")
        assert got == list(range(sent + 5))
        msg = await asyncio.wait_for(slow.receive(), 10)
        while msg.type == aiohttp.WSMsgType.TEXT:  # what was in flight, then the close
            msg = await asyncio.wait_for(slow.receive(), 10)
        assert slow.close_code == aiohttp.WSCloseCode.TRY_AGAIN_LATER
        reader.cancel()
        await fast.close()


async def test_bus_drops_a_full_queue_without_blocking():
    bus = EventBus(queue_size=4)
    slow, fast = bus.subscribe(), bus.subscribe()
    got = []
    for i in range(10):
        bus.publish("E", {"i": i})
        while not fast._queue.empty():
            got.append(await fast.get())
    assert bus.dropped == 1 and bus.subscribers == 1
    assert slow.reason.startswith("too slow")
    assert await slow.get() is None          # the dropped reader's stream just ends
    assert len(got) == 10


async def test_bus_close_delivers_pending_events_then_ends():
    bus = EventBus(queue_size=8)
    sub = bus.subscribe()
    bus.publish("A")
    bus.publish("B")
    bus.close()
    texts = [await sub.get(), await sub.get(), await sub.get()]
    assert '"A"' in texts[0] and '"B"' in texts[1] and texts[2] is None
    late = bus.subscribe()
    assert await late.get() is None


async def test_bus_close_with_a_full_queue():
    bus = EventBus(queue_size=2)
    sub = bus.subscribe()
    bus.publish("A")
    bus.publish("B")
    bus.close()
    assert [await sub.get(), await sub.get(), await sub.get()][2] is None


async def test_unserializable_event_data_is_sent_empty():
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish("X", {"bad": object()})
    import json

    assert json.loads(await sub.get())["data"] == {}


async def test_events_stream_ends_when_the_daemon_stops(start_daemon):
    d = await start_daemon()
    async with d.client() as c:
        ws = await c._session.ws_connect("http://x/events")
        await wait_for(lambda: d.daemon.events.subscribers == 1)
        stopper = asyncio.create_task(d.stop())
        names = []
        async for msg in ws:
            names.append(msg.json()["event"])
        await stopper
        assert names == ["SHUTDOWN"]
        assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY


async def test_websocket_slow_reader_is_closed(start_daemon):
    d = await start_daemon()
    bus = d.daemon.events
    bus._queue_size = 3
    async with d.client() as c:
        ws = await c._session.ws_connect("http://x/events")
        await wait_for(lambda: bus.subscribers == 1)
        sub = next(iter(bus._subs))
        for i in range(10):  # all at once, within one loop turn: the pump cannot keep up
            bus.publish("E", {"i": i})
        assert bus.dropped == 1 and sub.reason.startswith("too slow")
        msgs = []
        async for msg in ws:
            msgs.append(msg)
        assert ws.close_code == aiohttp.WSCloseCode.TRY_AGAIN_LATER
    async with d.client() as c:  # the daemon is fine
        assert (await c.call("query-status"))["running"]


async def test_rpc_error_type(daemon):
    with pytest.raises(RpcError):
        async with daemon.client() as c:
            await c.call("nope")


def test_notify_never_blocks_when_the_manager_stops_reading(tmp_path):
    """A NOTIFY_SOCKET nobody reads fills up; sending must fail fast, not hang the loop."""
    import socket as _socket
    import time as _time

    from xend_lite.daemon.systemd import Notifier

    path = str(tmp_path / "notify")
    peer = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    peer.bind(path)
    try:
        n = Notifier({"NOTIFY_SOCKET": path})
        t0 = _time.monotonic()
        results = [n.status("x" * 200) for _ in range(5000)]
        assert _time.monotonic() - t0 < 5
        assert results[0] is True and results[-1] is False   # the queue filled and sends failed
    finally:
        peer.close()
