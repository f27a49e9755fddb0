"""The control-plane client every `xend-lite-ctl` command uses: JSON-RPC over HTTP on the
daemon's Unix socket (or TCP with a token), and its WebSocket streams."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any, AsyncIterator

import aiohttp

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
