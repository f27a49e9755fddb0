"""POST /rpc at the HTTP level, on a raw connection: a body that comes with its headers, after
them, in pieces or chunked; many requests on one kept-alive connection, pipelined ones; bodies
in the encodings JSON allows; and an app built without a token refusing TCP clients."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from xend_lite.daemon import rpc, server
from xend_lite.daemon.events import EventBus
from xend_lite.daemon.runstate import RunState
from xend_lite.daemon.server import make_app

STATUS = {"status": "running", "running": True, "singlestep": False, "qmp-status": "running"}


def request_head(length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else ""
    return (f"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{size}{extra}\r\n"
            .encode())


def body(id_, method: str = "query-status") -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": method, "id": id_}).encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    data = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return status, headers, data


@contextlib.asynccontextmanager
async def raw_connection(daemon):
    """A plain socket connection to the daemon's Unix socket: (reader, writer)."""
    reader, writer = await asyncio.open_unix_connection(daemon.cfg.socket)
    try:
        yield reader, writer
    finally:
        writer.close()


async def test_body_sent_with_the_headers(daemon):
    async with raw_connection(daemon) as (reader, writer):
        b = body(7)
        writer.write(request_head(len(b)) + b)
        status, headers, data = await read_response(reader)
        assert status == 200 and headers["content-type"].startswith("application/json")
        assert json.loads(data) == {"jsonrpc": "2.0", "result": STATUS, "id": 7}


async def test_body_sent_after_the_headers_and_in_pieces(daemon):
    async with raw_connection(daemon) as (reader, writer):
        b = body("late")
        writer.write(request_head(len(b)))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b[:10])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b[10:])
        status, _h, data = await read_response(reader)
        assert status == 200 and json.loads(data)["id"] == "late"
        assert json.loads(data)["result"] == STATUS


async def test_chunked_body(daemon):
    async with raw_connection(daemon) as (reader, writer):
        b = body(9)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (b[:5], b[5:])) + b"0\r\n\r\n"
        writer.write(request_head(None, "Transfer-Encoding: chunked\r\n") + chunks)
        status, _h, data = await read_response(reader)
        assert status == 200 and json.loads(data) == {"jsonrpc": "2.0", "result": STATUS, "id": 9}


async def test_many_requests_on_one_connection_and_pipelined(daemon):
    async with raw_connection(daemon) as (reader, writer):
        for i in range(200):
            b = body(i)
            writer.write(request_head(len(b)) + b)
            status, headers, data = await read_response(reader)
            assert status == 200 and json.loads(data)["id"] == i
            assert headers.get("connection", "keep-alive").lower() != "close"
        # three requests in one write: three replies, in order
        writer.write(b"".join(request_head(len(body(i))) + body(i) for i in ("a", "b", "c")))
        ids = [json.loads((await read_response(reader))[2])["id"] for _ in range(3)]
        assert ids == ["a", "b", "c"]
        # a notification in the middle gets 204 and no body; the next request still answers
        note = json.dumps({"jsonrpc": "2.0", "method": "query-status"}).encode()
        writer.write(request_head(len(note)) + note + request_head(len(body(1))) + body(1))
        status, _h, data = await read_response(reader)
        assert status == 204 and data == b""
        status, _h, data = await read_response(reader)
        assert status == 200 and json.loads(data)["id"] == 1


_HELD_BUFFERS = """
import ctypes, sys
from xend_lite.machine.native import set_mmap_threshold
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "set":
    set_mmap_threshold(1 << 20)
before = libc.mallinfo2().hblks
bufs = [bytearray(256 * 1024) for _ in range(40)]
print(libc.mallinfo2().hblks - before)
"""


def test_read_buffers_come_from_the_heap_not_from_a_mapping_each():
    """asyncio reads each connection into a fresh 256 KiB buffer. Above glibc's mmap
    threshold each such buffer gets a mapping of its own, mapped and unmapped with every
    request; the daemon sets a fixed 1 MiB threshold at start (service.py). Counted by glibc
    (mallinfo2().hblks) in fresh processes, on buffers held at once: one mapping each at
    glibc's starting threshold, none with the daemon's."""
    import subprocess
    import sys

    def mapped(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", _HELD_BUFFERS, how], capture_output=True,
                             text=True, check=True).stdout
        return int(out)
    assert mapped("default") >= 30          # the behaviour the threshold removes
    assert mapped("set") <= 2


async def test_a_body_of_the_largest_size_arrives_whole(daemon):
    async with raw_connection(daemon) as (reader, writer):
        for i in range(2):
            b = body(i)
            writer.write(request_head(len(b)) + b)
            assert (await read_response(reader))[0] == 200
        # a body of the largest size allowed still arrives whole, in several reads
        pad = "x" * ((1 << 20) - 200)
        big = json.dumps({"jsonrpc": "2.0", "method": "query-status", "id": 1, "params": {"pad": pad}}).encode()
        writer.write(request_head(len(big)) + big)
        status, _h, data = await read_response(reader)
        assert status == 200 and json.loads(data)["error"]["code"] == rpc.INVALID_PARAMS


async def test_empty_body_with_a_length_of_zero(daemon):
    async with raw_connection(daemon) as (reader, writer):
        writer.write(request_head(0))
        status, _h, data = await read_response(reader)
        assert status == 200 and json.loads(data)["error"]["code"] == rpc.PARSE_ERROR


async def test_expect_100_continue_gets_its_interim_answer(daemon):
    """curl sends Expect: 100-continue for bodies over 1 KiB and waits for the 100 first."""
    async with raw_connection(daemon) as (reader, writer):
        b = json.dumps({"jsonrpc": "2.0", "method": "query-status", "id": 3, "params": {}}).encode()
        writer.write(request_head(len(b), "Expect: 100-continue\r\n"))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b)
        status, _h, data = await read_response(reader)
        assert status == 200 and json.loads(data) == {"jsonrpc": "2.0", "result": STATUS, "id": 3}


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/rpc?x=1", 200), ("POST", "/rpc/", 404), ("POST", "/RPC", 404), ("POST", "/rpc2", 404),
    ("GET", "/rpc", 405), ("PUT", "/rpc", 405), ("HEAD", "/rpc", 405), ("POST", "/events", 405),
    ("POST", "//rpc", 404),
])
async def test_every_other_method_and_path_answers_as_the_router_does(daemon, method, path, status):
    async with raw_connection(daemon) as (reader, writer):
        b = body(5)
        writer.write(request_head(len(b)).replace(b"POST /rpc ", f"{method} {path} ".encode()) + b)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert int(head.split()[1]) == status, head
        if status == 200:
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            assert json.loads(await reader.readexactly(length))["result"] == STATUS


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be",
                                      "utf-32", "utf-32-le", "utf-32-be"])
async def test_bodies_in_every_json_encoding(daemon, encoding):
    text = json.dumps({"jsonrpc": "2.0", "method": "query-status", "id": "é"})
    async with raw_connection(daemon) as (reader, writer):
        b = text.encode(encoding)
        writer.write(request_head(len(b)) + b)
        status, _h, data = await read_response(reader)
        assert status == 200 and json.loads(data) == {"jsonrpc": "2.0", "result": STATUS, "id": "é"}


@pytest.mark.parametrize("raw", [b"\xff\xfe\xfd", b'{"a": NaN}', b'{"a": 1e999}', b"[" * 100000, b"",
                                 b'\xef\xbb\xbf\xef\xbb\xbf{}'])
async def test_the_decoder_refuses_what_json_loads_refused(raw):
    """The one decoder the dispatcher keeps answers every body as json.loads with the same
    options did: a Parse error wherever that raised."""
    d = rpc.Dispatcher()
    reply = json.loads(await d.handle(raw, rpc.RpcContext(controller=None)))
    assert reply["error"]["code"] == rpc.PARSE_ERROR and reply["id"] is None


class _Controller:
    state = RunState.RUNNING


async def test_an_app_without_a_token_refuses_tcp_clients():
    """make_app without a token has no TCP clients in mind: on TCP it answers 401 rather than
    trusting the client as it trusts a Unix-socket one."""
    server = TestServer(make_app(_Controller(), EventBus(), token=None))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(server.make_url("/rpc"), data=body(1)) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert "Unauthorized" in (await resp.json())["error"]["message"]
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await s.ws_connect(server.make_url("/events"))
            assert e.value.status == 401
    finally:
        await server.close()


async def test_an_app_with_a_token_checks_every_tcp_path():
    token = "t0ken-t0ken-t0ken-t0ken"
    server = TestServer(make_app(_Controller(), EventBus(), token=token))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            for path in ("/rpc", "/other"):
                async with s.post(server.make_url(path), data=body(1)) as resp:
                    assert resp.status == 401, path
            async with s.post(server.make_url("/rpc"), data=body(1),
                              headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200
                assert (await resp.json())["result"] == STATUS
    finally:
        await server.close()
