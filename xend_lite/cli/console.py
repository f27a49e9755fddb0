"""`xend-lite-ctl console`: a terminal attached to the guest's console.

Output is streamed from the daemon's ``GET /console`` WebSocket as it arrives; keys typed go
back over the same socket (the daemon types them with console-write). When stdin is a
terminal it is put in raw mode (every key goes to the guest, Ctrl-C included) and restored
on the way out. Ctrl-] (0x1d, as telnet and virsh) leaves with status 0; so does the end of
stdin when it is not a terminal. One client at a time may write: a second one is refused
(exit status 1) unless it asks for read-only=true.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import termios
import tty
from typing import Any, BinaryIO

import aiohttp

from xend_lite.cli.client import Client, RpcError

ESCAPE = b"\x1d"          # Ctrl-]
EXIT_LEFT = 0
EXIT_REFUSED = 1
EXIT_CLOSED = 3           # the daemon ended the console (it is stopping)
READ_CHUNK = 4096


async def attach(client: Client, read_only: bool = False, stdin_fd: int | None = None,
                 stdout: BinaryIO | None = None) -> int:
    fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    out = stdout if stdout is not None else sys.stdout.buffer
    try:
        ws = await client.websocket(f"/console?mode={'read' if read_only else 'write'}",
                                    "the console")
    except RpcError as exc:
        if isinstance(exc.data, dict) and exc.data.get("http_status") == 409:
            print("xend-lite-ctl: another client is typing into this console; attach with "
                  "read-only=true to watch it", file=sys.stderr)
            return EXIT_REFUSED
        raise
    saved = _raw(fd)
    how = "read-only, " if read_only else ""
    print(f"[attached to the guest console ({how}Ctrl-] leaves)]", end="\r\n",
          file=sys.stderr, flush=True)
    try:
        async with ws:
            return await _session(ws, fd, out, read_only, saved is not None)
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        print("\n[detached]", file=sys.stderr, flush=True)


def _raw(fd: int) -> list[Any] | None:
    """Put a terminal in raw mode; its old settings (None when fd is not a terminal)."""
    if not os.isatty(fd):
        return None
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSADRAIN)
    return saved


async def _session(ws: aiohttp.ClientWebSocketResponse, fd: int, out: BinaryIO,
                   read_only: bool, is_tty: bool) -> int:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    keys: asyncio.Queue[bytes] = asyncio.Queue()

    def on_input() -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except OSError:
            data = b""
        if not data:                        # end of stdin
            loop.remove_reader(fd)
            if not is_tty and not done.done():
                done.set_result(EXIT_LEFT)
            return
        head, esc, _ = data.partition(ESCAPE)
        if head and not read_only:
            keys.put_nowait(head)
        if esc and not done.done():
            done.set_result(EXIT_LEFT)

    async def send() -> None:
        while True:
            await ws.send_bytes(await keys.get())

    async def receive() -> int:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                out.write(msg.data)
                out.flush()
            elif msg.type == aiohttp.WSMsgType.TEXT:
                err = json.loads(msg.data).get("error", {})
                print(f"\r\n[console-write failed: {err.get('message')}]", end="\r\n",
                      file=sys.stderr, flush=True)
            else:
                break
        print(f"\r\n[the daemon closed the console: {ws.close_code}]", end="\r\n",
              file=sys.stderr, flush=True)
        return EXIT_CLOSED

    loop.add_reader(fd, on_input)
    tasks = [asyncio.create_task(send()), asyncio.create_task(receive())]
    try:
        finished, _ = await asyncio.wait([done, tasks[1]], return_when=asyncio.FIRST_COMPLETED)
        if done in finished:
            # what was typed before the escape key still goes out
            while not keys.empty():
                await ws.send_bytes(keys.get_nowait())
            return done.result()
        return tasks[1].result()
    finally:
        loop.remove_reader(fd)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
