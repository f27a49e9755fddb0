"""`xend-lite-ctl`: a small client for the daemon's control plane.

    xend-lite-ctl query-status
    xend-lite-ctl xen-overlay-map page=shared_info gpa=0x400000
    xend-lite-ctl snapshot-save path=before.snap paused=true
    xend-lite-ctl events                 # follow the event stream, one JSON object a line
    xend-lite-ctl console                # attach to the guest console (Ctrl-] leaves)
    xend-lite-ctl console read-only=true # watch it while another client types
    xend-lite-ctl --tcp http://127.0.0.1:8405 --token-file token query-status

Values are parsed as JSON when they parse (numbers, true/false, null, quoted strings,
objects), as 0x-prefixed hexadecimal integers, and are strings otherwise. Results are
printed as JSON; an error prints its message and exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
from typing import Any, AsyncIterator

import aiohttp

from xend_lite.cli.progress import JOBS as PROGRESS_JOBS, call_with_progress
from xend_lite.cli.tools import TOOLS, TOOLS_HELP, run_tool

EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    @property
    def error_class(self) -> str | None:
        return self.data.get("class") if isinstance(self.data, dict) else None


class ConnectError(Exception):
    pass


def default_socket() -> str:
    from xend_lite.daemon.config import default_socket_path

    return default_socket_path()


class Client:
    """JSON-RPC and events over the Unix socket (default) or TCP with a bearer token."""

    def __init__(self, socket_path: str | None = None, tcp_url: str | None = None,
                 token: str | None = None, timeout: float = 60.0):
        self.socket_path = socket_path or (None if tcp_url else default_socket())
        self.base = (tcp_url.rstrip("/") if tcp_url else "http://xend-lite")
        self.token = token
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None

    @property
    def where(self) -> str:
        return self.socket_path or self.base

    async def __aenter__(self) -> Client:
        connector = aiohttp.UnixConnector(path=self.socket_path) if self.socket_path else None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(connector=connector, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, body: bytes | str, headers: dict | None = None) -> tuple[int, Any]:
        """POST a raw body to /rpc: (HTTP status, parsed JSON reply or None)."""
        assert self._session is not None
        try:
            async with self._session.post(f"{self.base}/rpc", data=body, headers=headers) as resp:
                text = await resp.text()
                try:
                    return resp.status, json.loads(text) if text else None
                except ValueError:
                    return resp.status, text
        except aiohttp.ClientConnectionError as exc:
            raise ConnectError(f"cannot reach the daemon at {self.where}: {exc}") from None

    async def get_text(self, path: str) -> str:
        """GET a text page (/metrics); RpcError for a status other than 200."""
        assert self._session is not None
        try:
            async with self._session.get(f"{self.base}{path}") as resp:
                text = await resp.text()
        except aiohttp.ClientConnectionError as exc:
            raise ConnectError(f"cannot reach the daemon at {self.where}: {exc}") from None
        if resp.status != 200:
            raise RpcError(-32000, f"HTTP {resp.status} for {path}")
        return text

    async def call(self, method: str, params: dict | None = None) -> Any:
        req: dict[str, Any] = {"jsonrpc": "2.0", "id": next(self._ids), "method": method}
        if params:
            req["params"] = params
        status, reply = await self.post(json.dumps(req))
        if not isinstance(reply, dict):
            raise RpcError(-32000, f"HTTP {status}: unexpected reply {reply!r}")
        if "error" in reply:
            err = reply["error"]
            raise RpcError(err.get("code", 0), err.get("message", ""), err.get("data"))
        return reply.get("result")

    async def websocket(self, path: str, what: str) -> aiohttp.ClientWebSocketResponse:
        """A WebSocket to ``path`` (/events, /console?...); RpcError if refused."""
        assert self._session is not None
        try:
            return await self._session.ws_connect(f"{self.base}{path}",
                                                  timeout=aiohttp.ClientWSTimeout(ws_close=5))
        except aiohttp.WSServerHandshakeError as exc:
            raise RpcError(-32000, f"{what} was refused: HTTP {exc.status} {exc.message}",
                           {"http_status": exc.status}) from None
        except aiohttp.ClientConnectionError as exc:
            raise ConnectError(f"cannot reach the daemon at {self.where}: {exc}") from None

    async def events(self, opened: asyncio.Event | None = None) -> AsyncIterator[dict]:
        """Events as they come, until the daemon closes the stream; ``opened`` is set once
        the stream is up."""
        ws = await self.websocket("/events", "the event stream")
        if opened is not None:
            opened.set()
        async with ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    yield json.loads(msg.data)
                elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                    break


def parse_value(text: str) -> Any:
    if text.lower().startswith(("0x", "-0x")):
        try:
            return int(text, 16)
        except ValueError:
            return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"parameter {pair!r} is not key=value")
        params[key] = parse_value(value)
    return params


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xend-lite-ctl", description="Talk to a running xend-lite.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Methods: query-commands lists them. `events` follows the "
                                       "event stream; `console` attaches to the guest console.\n"
                                       + TOOLS_HELP)
    p.add_argument("--socket", help="the daemon's Unix socket (default: the daemon's default)")
    p.add_argument("--tcp", metavar="URL", help="reach the daemon over TCP, e.g. http://127.0.0.1:8405")
    p.add_argument("--token-file", help="file with the bearer token (TCP)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a reply (600)")
    p.add_argument("--compact", action="store_true", help="print JSON on one line")
    p.add_argument("method", help="a method name, or `events`")
    p.add_argument("params", nargs="*", metavar="key=value")
    return p


async def _run(ns: argparse.Namespace, params: dict, token: str | None) -> int:
    client = Client(ns.socket, ns.tcp, token, timeout=ns.timeout)
    indent = None if ns.compact else 2
    async with client:
        if ns.method == "console":
            from xend_lite.cli.console import attach

            return await attach(client, read_only=params.get("read-only") is True)
        if ns.method == "events":
            async for event in client.events():
                print(json.dumps(event), flush=True)
            return 0
        if ns.method in TOOLS:
            return await run_tool(ns.method, client, indent, parse_params, RpcError)
        if ns.method in PROGRESS_JOBS and sys.stdout.isatty():
            result = await call_with_progress(client, ns.method, params, sys.stdout)
        else:
            result = await client.call(ns.method, params)
    print(json.dumps(result, indent=indent, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        params = parse_params(ns.params)
    except ValueError as exc:
        print(f"xend-lite-ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if ns.method in TOOLS and ns.method != "shell" and params:
        print(f"xend-lite-ctl: {ns.method} takes no parameters", file=sys.stderr)
        return EXIT_USAGE
    if ns.method == "events" and params:
        print("xend-lite-ctl: events takes no parameters", file=sys.stderr)
        return EXIT_USAGE
    if ns.method == "console" and not set(params) <= {"read-only"}:
        print("xend-lite-ctl: console takes only read-only=true", file=sys.stderr)
        return EXIT_USAGE
    token = None
    if ns.token_file:
        try:
            with open(ns.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            print(f"xend-lite-ctl: cannot read token file {ns.token_file}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
    elif ns.tcp and os.environ.get("XEND_LITE_TOKEN"):
        token = os.environ["XEND_LITE_TOKEN"]
    try:
        return asyncio.run(_run(ns, params, token))
    except RpcError as exc:
        cls = f" ({exc.error_class})" if exc.error_class else ""
        print(f"xend-lite-ctl: error {exc.code}{cls}: {exc.message}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except ConnectError as exc:
        print(f"xend-lite-ctl: {exc} (is xend-lite running? pass --socket)", file=sys.stderr)
        return EXIT_CONNECT
    except asyncio.TimeoutError:
        print(f"xend-lite-ctl: no reply within {ns.timeout:g} s", file=sys.stderr)
        return EXIT_CONNECT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
