"""The HTTP side of the control plane: the aiohttp application (POST /rpc, GET /events) and
the bearer-token check for TCP clients. The sockets it serves on are made in listen.py.

Handlers only read the request and hand it on: JSON-RPC bodies to the Dispatcher, event
subscribers to the EventBus.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from xend_lite.daemon.connections import hold, on_response_prepare
from xend_lite.daemon.console_stream import WriterBusy
from xend_lite.daemon.events import EventBus
from xend_lite.daemon.methods import CONSOLE_WRITE_MAX, METHODS
from xend_lite.daemon.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from xend_lite.daemon.rpc import INVALID_REQUEST, MAX_BODY, Dispatcher, RpcContext, error_reply
from xend_lite.daemon.tokens import token_matches
from xend_lite.errors import XendLiteError

log = logging.getLogger("xend_lite.server")

DISPATCHER = web.AppKey("dispatcher", Dispatcher)
EVENTS = web.AppKey("events", EventBus)
CONTROLLER = web.AppKey("controller", object)
DAEMON = web.AppKey("daemon", object)
TOKEN = web.AppKey("token", object)  # str | None
WEBSOCKETS = web.AppKey("websockets", set)


# -- the application -----------------------------------------------------------------------

def _is_tcp(request: web.Request) -> bool:
    """Whether the request came other than over a Unix socket (TCP, or unknown: refused
    alike). A Unix socket's own address is its path (str, or bytes when abstract); every
    other family's is a tuple, and an address that could not be read is None. Reading it
    costs a tenth of asking the socket its family."""
    transport = request.transport
    if transport is None:
        return True
    return not isinstance(transport.get_extra_info("sockname"), (str, bytes))


def _refusal(request: web.Request, token: str | None) -> web.Response | None:
    """None when the request may go on; else the 401 a TCP client without the token gets.
    Unix-socket clients are trusted by the socket's 0600 mode."""
    if not _is_tcp(request):
        return None
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if (token is not None and scheme.lower() == "bearer"
            and token_matches(value, token)):
        return None
    log.warning("refused a TCP request from %s: %s", request.remote,
                "no bearer token" if not given else "wrong bearer token")
    return web.json_response(
        error_reply(-32000, "Unauthorized: send Authorization: Bearer <token>"),
        status=401, headers={"WWW-Authenticate": 'Bearer realm="xend-lite"'})


@web.middleware
async def bearer_auth(request: web.Request, handler):
    """TCP clients must send the token on every path (an unknown path too gets 401, not
    404); Unix-socket clients are trusted by the 0600 mode."""
    refused = _refusal(request, request.app[TOKEN])
    if refused is not None:
        return refused
    return await handler(request)


def rpc_handler_for(dispatcher: Dispatcher, controller: Any, daemon: Any,
                    token: str | None) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """POST /rpc. With a token the app's middleware checks TCP clients; without one no TCP
    client can pass, and the handler refuses it itself (the daemon then listens on no TCP
    socket, but the app does not rely on that)."""
    check_tcp = token is None

    async def rpc_handler(request: web.Request) -> web.StreamResponse:
        if check_tcp and _is_tcp(request):
            return _refusal(request, None)  # type: ignore[return-value]
        length = request.content_length
        if length is not None:
            if length > MAX_BODY:
                return _too_large()
            content = request.content
            # a body of a declared length that is all here already (the usual case: it
            # came with the headers) is taken as it is, without read()'s chunk loop
            body = content.read_nowait() if content.is_eof() else None
        else:
            body = None
        if body is None:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _too_large()
            except ConnectionResetError:   # closed before the body was in (connections.py)
                return web.Response(status=408)
        hold(request)  # the whole request is in: off the request clock until the reply
        ctx = RpcContext(controller, daemon)
        reply = await dispatcher.handle(body, ctx)
        if reply is None:
            resp: web.StreamResponse = web.Response(status=204)
        else:
            resp = web.Response(body=reply, content_type="application/json")
        if ctx.after_reply:
            await resp.prepare(request)
            await resp.write_eof()
            for action in ctx.after_reply:
                action()
        return resp

    return rpc_handler


def _too_large() -> web.Response:
    return web.json_response(
        error_reply(INVALID_REQUEST, f"Invalid request: the body is larger than {MAX_BODY} bytes"),
        status=413)


async def events_handler(request: web.Request) -> web.StreamResponse:
    if request.app[TOKEN] is None and _is_tcp(request):
        return _refusal(request, None)  # type: ignore[return-value]
    hold(request)  # an event stream is never closed for a newcomer
    ws = web.WebSocketResponse(heartbeat=30.0)
    await ws.prepare(request)
    bus = request.app[EVENTS]
    sub = bus.subscribe()
    request.app[WEBSOCKETS].add(ws)
    log.debug("event subscriber connected (%d now)", bus.subscribers)

    async def pump() -> None:
        while True:
            text = await sub.get()
            if text is None:
                return
            await ws.send_str(text)

    async def incoming() -> None:
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                return

    sender, reader = asyncio.create_task(pump()), asyncio.create_task(incoming())
    try:
        await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (sender, reader):
            t.cancel()
        await asyncio.gather(sender, reader, return_exceptions=True)
        sub.close()
        request.app[WEBSOCKETS].discard(ws)
        if not ws.closed:
            if sub.reason.startswith("too slow"):
                await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow")
            else:
                await ws.close(code=WSCloseCode.GOING_AWAY, message=sub.reason.encode()[:120])
    return ws


async def console_handler(request: web.Request) -> web.StreamResponse:
    """GET /console: a WebSocket carrying the guest's console output as binary messages from
    the moment of attaching. With ?mode=write the client is also the one writer: its binary
    (or text) messages are typed into the console (console-write); a second writer gets 409.
    Errors of a write come back as a text message {"error": {...}}."""
    if request.app[TOKEN] is None and _is_tcp(request):
        return _refusal(request, None)  # type: ignore[return-value]
    mode = request.query.get("mode", "read")
    if mode not in ("read", "write"):
        return web.json_response(error_reply(-32602, "mode must be read or write"), status=400)
    controller = request.app[CONTROLLER]
    try:
        reader = controller.console.attach(write=mode == "write")
    except WriterBusy as exc:
        return web.json_response(error_reply(-32000, f"Conflict: {exc}"), status=409)
    hold(request)  # like the event stream, never closed for a newcomer
    # a message over console-write's bound closes the socket (1009) rather than being cut
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=CONSOLE_WRITE_MAX)
    try:
        await ws.prepare(request)
    except BaseException:
        controller.console.detach(reader)
        raise
    request.app[WEBSOCKETS].add(ws)

    async def pump() -> None:
        while (data := await reader.get()) is not None:
            await ws.send_bytes(data)

    async def incoming() -> None:
        async for msg in ws:
            if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                return
            if mode != "write":
                continue
            data = msg.data if msg.type == WSMsgType.BINARY else msg.data.encode("utf-8")
            try:
                await controller.console_write(data)
            except XendLiteError as exc:
                await ws.send_str(json.dumps({"error": {
                    "code": exc.code, "message": str(exc), "class": exc.error_class}}))

    sender, receiver = asyncio.create_task(pump()), asyncio.create_task(incoming())
    try:
        await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (sender, receiver):
            t.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)
        reason = reader.reason or "detached"
        controller.console.detach(reader)
        request.app[WEBSOCKETS].discard(ws)
        if not ws.closed:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=reason.encode()[:120])
    return ws
async def metrics_handler(request: web.Request) -> web.StreamResponse:
    """GET /metrics: Prometheus's text format, with the same access rules as /rpc."""
    if request.app[TOKEN] is None and _is_tcp(request):
        return _refusal(request, None)  # type: ignore[return-value]
    daemon = request.app[DAEMON]
    metrics = getattr(daemon, "metrics", None)
    if metrics is None:
        return web.Response(status=404, text="no metrics\n")
    controller = request.app[CONTROLLER]
    domain = controller.domain
    counters = None
    if domain is not None and hasattr(domain, "query_counters"):
        try:
            counters = domain.query_counters()
        except Exception:  # noqa: BLE001 - the daemon's own metrics are still worth sending
            log.exception("reading the VM's counters for /metrics failed")
    body = metrics.render(controller.state, counters)
    return web.Response(body=body.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


def make_app(controller: Any, events: EventBus, daemon: Any = None, token: str | None = None) -> web.Application:
    # The bearer-token middleware only where TCP clients are expected (a token is given):
    # a middleware costs every request a few microseconds, Unix-socket ones too.
    app = web.Application(client_max_size=MAX_BODY,
                          middlewares=[bearer_auth] if token is not None else [])
    dispatcher = Dispatcher(METHODS)
    app[DISPATCHER] = dispatcher
    app[EVENTS] = events
    app[CONTROLLER] = controller
    app[DAEMON] = daemon
    app[TOKEN] = token
    app[WEBSOCKETS] = set()
    app.router.add_post("/rpc", rpc_handler_for(dispatcher, controller, daemon, token))
    app.router.add_get("/events", events_handler)
    app.router.add_get("/console", console_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.on_response_prepare.append(on_response_prepare)  # connections.py: idle again
    return app

