"""The console stream's fan-out: every reader gets the output, a slow one is bounded (its
backlog replaced by a marker saying how much was dropped), one writer at a time; and the
GET /console endpoint over the daemon's socket with a FakeDomain."""

from __future__ import annotations

import asyncio

import pytest

from tests.daemon.conftest import wait_for
from xend_lite.cli.ctl import RpcError
from xend_lite.daemon.console_stream import ConsoleHub, WriterBusy, dropped_marker


async def test_every_reader_gets_the_output_in_order():
    hub = ConsoleHub()
    a, b = hub.attach(write=False), hub.attach(write=True)
    for chunk in (b"one ", b"two ", b"three"):
        hub.publish(chunk)
    assert await a.get() == await b.get() == b"one two three"


async def test_a_slow_reader_is_bounded_and_told_what_it_lost():
    """Without the bound the reader would hold all 1 MiB published; with it, at most the
    limit, then a marker naming the bytes dropped and what came after."""
    hub = ConsoleHub(reader_limit=4096)
    slow, fast = hub.attach(write=False), hub.attach(write=False)
    total = 0
    for _ in range(256):
        hub.publish(b"x" * 4096)
        total += 4096
        assert slow.pending <= 4096 + len(dropped_marker(total))
        assert await fast.get() == b"x" * 4096       # a fast reader loses nothing
    hub.publish(b"after")
    got = await slow.get()
    assert got.startswith(b"\r\n[xend-lite: ") and b"bytes of console output dropped" in got
    assert got.endswith(b"after") and slow.dropped >= total - 4096


async def test_one_writer_at_a_time():
    hub = ConsoleHub()
    w = hub.attach(write=True)
    with pytest.raises(WriterBusy):
        hub.attach(write=True)
    hub.attach(write=False)                 # readers are still welcome
    hub.detach(w)
    hub.attach(write=True)                  # the slot is free again


async def test_closing_ends_every_reader():
    hub = ConsoleHub()
    r = hub.attach(write=False)
    hub.close()
    assert await r.get() is None and r.reason == "the daemon is stopping"
    assert await hub.attach(write=False).get() is None


async def test_console_endpoint_streams_output_and_refuses_a_second_writer(daemon):
    async with daemon.client() as c:
        ws = await c.websocket("/console?mode=write", "the console")
        await wait_for(lambda: daemon.controller.console.readers == 1, what="attached")
        for fn in daemon.domain.console_listeners:
            fn(b"guest says hi")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.data == b"guest says hi"
        with pytest.raises(RpcError) as e:
            await c.websocket("/console?mode=write", "the console")
        assert e.value.data["http_status"] == 409
        # keys from the writer go to console-write: the fake VM has no console ring
        await ws.send_bytes(b"k")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.json()["error"]["class"] == "NotSupported"
        await ws.close()
        await wait_for(lambda: daemon.controller.console.writer is None, what="detached")
        with pytest.raises(RpcError) as e:
            await c.websocket("/console?mode=sideways", "the console")
        assert e.value.data["http_status"] == 400


async def test_an_oversized_key_message_closes_the_writer(daemon):
    """A message past console-write's 64 KiB bound is not taken: the socket closes (1009)."""
    async with daemon.client() as c:
        ws = await c.websocket("/console?mode=write", "the console")
        await ws.send_bytes(b"k" * (64 * 1024 + 1))
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type.name in ("CLOSE", "CLOSED", "CLOSING")
        await wait_for(lambda: daemon.controller.console.writer is None, what="detached")
        assert ws.close_code == 1009 or msg.data == 1009
