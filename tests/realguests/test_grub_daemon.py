"""Debian's PVH GRUB run by the xend-lite process as it ships, driven through its socket:
keys typed with console-write and over the console stream are answered at the prompt,
`xend-lite-ctl console` attaches a terminal, xenstore as the operator sees it, and a prompt
saved by one daemon answers in a fresh one started with --restore.

Answers are told apart from the echo of the typed keys by quoting: GRUB echoes
``echo "ans""wer"`` as typed and prints ``answer``, which no echo contains.
"""

from __future__ import annotations

import asyncio
import os
import re
import pty
import select
import signal
import tempfile
import time

import pytest

from tests.daemon.test_process import CTL, REAL, env, spawn, stop, wait_listening
from xend_lite.cli.ctl import Client, RpcError

from .build import GRUB_MODULES

pytestmark = pytest.mark.kvm

PROMPT = "grub> "


def rpc(sock: str, method: str, params: dict | None = None):
    async def go():
        async with Client(sock, timeout=20) as c:
            return await c.call(method, params)
    return asyncio.run(go())


def rpc_error(sock: str, method: str, params: dict | None = None) -> RpcError:
    with pytest.raises(RpcError) as e:
        rpc(sock, method, params)
    return e.value


def console(sock: str) -> str:
    return rpc(sock, "query-console", {"max_bytes": 65536})["data"]


def wait_console(sock: str, text: str, after: int = 0, timeout: float = 20.0) -> int:
    """Until ``text`` shows in query-console past ``after``; the offset of its end."""
    deadline = time.monotonic() + timeout
    while True:
        out = console(sock)
        at = out.find(text, after)
        if at >= 0:
            return at + len(text)
        assert time.monotonic() < deadline, f"no {text!r} on the console: {out[-400:]!r}"
        time.sleep(0.05)


class GrubDaemons:
    def __init__(self, image: str, tmp: str):
        self.image, self.tmp = image, tmp
        self.procs = []

    def start(self, *extra: str) -> str:
        sock = os.path.join(self.tmp, f"g{len(self.procs)}.sock")
        proc = spawn(["--socket", sock, "--snapshot-dir", self.tmp, "--memory", "64",
                      "--image", self.image, "--no-console-stdout", *extra], cmd=REAL)
        self.procs.append(proc)
        wait_listening(proc, sock, timeout=30)
        return sock

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                stop(p, signal.SIGTERM, timeout=20)


@pytest.fixture(scope="module")
def grub_daemons(grub_image):
    with tempfile.TemporaryDirectory(prefix="xg-") as tmp:
        d = GrubDaemons(str(grub_image("echo ready\n", GRUB_MODULES)), tmp)
        try:
            yield d
        finally:
            d.close()


@pytest.fixture(scope="module")
def grub(grub_daemons) -> str:
    """One daemon with GRUB at its prompt, shared by the tests that leave it there."""
    sock = grub_daemons.start()
    wait_console(sock, PROMPT)
    return sock


async def read_stream(ws, text: bytes, timeout: float = 20.0) -> bytes:
    got = b""
    async with asyncio.timeout(timeout):
        while text not in got:
            msg = await ws.receive()
            assert isinstance(msg.data, bytes), msg
            got += msg.data
    return got


def test_typed_keys_are_answered_in_query_console_and_the_stream(grub):
    async def go():
        async with Client(grub, timeout=20) as c:
            reader = await c.websocket("/console?mode=read", "the console")
            taken = await c.call("console-write", {"data": 'echo "ans""wer"\r'})
            assert taken["taken"] == 16
            got = await read_stream(reader, b"answer")
            # GRUB echoed the keys one by one (each after a cursor move), then answered
            assert re.sub(rb"\x1b\[[0-9;]*H", b"", got).find(b'echo "ans""wer"\n\ranswer') >= 0, got
            await read_stream(reader, PROMPT.encode())  # ... and is back at its prompt
            # bytes, through the stream's writer slot, and in base64
            writer = await c.websocket("/console?mode=write", "the console")
            with pytest.raises(RpcError) as e:
                await c.websocket("/console?mode=write", "the console")
            assert e.value.data["http_status"] == 409
            await writer.send_bytes(b'echo "str""eamed"\r')
            await read_stream(reader, b"streamed")
            await c.call("console-write", {"data-base64": "ZWNobyAiYjYiIjQiDQ=="})  # echo "b6""4"\r
            await read_stream(writer, b"b64")
            await writer.close()
            await reader.close()
    asyncio.run(go())
    out = console(grub)
    assert "answer" in out and "streamed" in out and "b64" in out


def test_console_write_refuses_bad_input(grub):
    for params in ({}, {"data": "a", "data-base64": "YQ=="}):
        assert rpc_error(grub, "console-write", params).code == 1001
    for params in ({"data-base64": "not base64!"}, {"data": "x" * (64 * 1024 + 1)}, {"data": 5}):
        assert rpc_error(grub, "console-write", params).code == -32602


def test_ctl_console_types_through_a_terminal_and_leaves_on_ctrl_bracket(grub):
    pid, fd = pty.fork()
    if pid == 0:                                   # the child: the ctl on the pty
        os.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        os.execve(CTL[0], CTL + ["--socket", grub, "console"], env())
    try:
        seen = _read_until(fd, b"Ctrl-] leaves")
        os.write(fd, b'echo "pt""y works"\r')
        seen = _read_until(fd, b"pty works")
        assert b"pty works" in seen
        os.write(fd, b"\x1d")
        _read_until(fd, b"[detached]")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def _read_until(fd: int, text: bytes, timeout: float = 20.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while text not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} on the terminal: {got[-300:]!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    assert text in got, got[-300:]
    return got


def test_xenstore_as_the_operator_sees_it(grub):
    rpc(grub, "xenstore-write", {"path": "data/greeting", "value": "hi there"})
    assert rpc(grub, "xenstore-read", {"path": "data/greeting"}) == {"value": "hi there"}
    assert rpc(grub, "xenstore-read", {"path": "/local/domain/1/data/greeting"})["value"] == "hi there"
    assert rpc(grub, "xenstore-read", {"path": "name"})["value"]     # the toolstack's tree
    home = rpc(grub, "xenstore-ls", {"path": "/local/domain/1"})
    assert home["children"]["data"]["children"] == {}
    deep = rpc(grub, "xenstore-ls", {"path": "/local/domain/1", "recursive": True})
    assert deep["children"]["data"]["children"]["greeting"]["value"] == "hi there"
    # a new node takes its parent's permissions, as in xenstored: the guest owns data/
    assert deep["children"]["data"]["children"]["greeting"]["perms"] == ["n1"]
    rpc(grub, "xenstore-rm", {"path": "data/greeting"})
    e = rpc_error(grub, "xenstore-read", {"path": "data/greeting"})
    assert (e.code, e.data) == (1002, {"class": "NotFound", "errno": "ENOENT"})
    assert "greeting" not in rpc(grub, "xenstore-ls", {"path": "data"})["children"]


@pytest.mark.parametrize("path", ["data//x", "data/x/", "bad path", "/" + "a" * 3072, "@x"])
def test_xenstore_refuses_bad_paths(grub, path):
    e = rpc_error(grub, "xenstore-write", {"path": path, "value": "v"})
    assert (e.code, e.data["errno"]) == (1001, "EINVAL"), e.data


def test_xenstore_refuses_bad_values(grub):
    assert rpc_error(grub, "xenstore-write", {"path": "data/v", "value": "x" * 4097}).code == -32602
    assert rpc_error(grub, "xenstore-write", {"path": "data/v", "value": 1}).code == -32602
    assert rpc_error(grub, "xenstore-read", {"path": ""}).code == -32602
    rpc(grub, "xenstore-write", {"path": "data/v", "value": "x" * 4096})   # the largest value
    assert len(rpc(grub, "xenstore-read", {"path": "data/v"})["value"]) == 4096


def test_a_prompt_saved_by_one_daemon_answers_in_a_fresh_one(grub_daemons):
    a = grub_daemons.start()
    wait_console(a, PROMPT)
    rpc(a, "snapshot-save", {"path": "prompt.snap"})
    first = grub_daemons.procs[-1]
    assert stop(first, signal.SIGTERM, timeout=20)[0] == 0
    b = grub_daemons.start("--restore", os.path.join(grub_daemons.tmp, "prompt.snap"))
    at = len(console(b))                 # the restored console shows the old output
    rpc(b, "console-write", {"data": 'echo "re""stored"\r'})
    at = wait_console(b, "restored", at)
    wait_console(b, PROMPT, at)
    rpc(b, "console-write", {"data": "halt\r"})
    proc = grub_daemons.procs[-1]
    assert proc.wait(20) == 0            # halt is a poweroff: the daemon exits 0
