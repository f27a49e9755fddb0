"""JSON-RPC 2.0 for the control plane, dispatched by jsonrpcserver.

Each request object goes through one of jsonrpcserver's documented entry points (see
below for which) with the documented hooks set:

- ``deserializer``: the body is decoded once here (NaN and Infinity are refused, as JSON
  has no such values), and each element of a batch is handed to jsonrpcserver on its own,
  so a malformed element gets its own Invalid Request and the others still run, in order
  (jsonrpcserver would refuse a whole batch for one bad element);
- ``validator``: the request schema checked directly, with the same rules as
  jsonrpcserver's bundled JSON Schema (a test compares the two); with the general schema
  validator a query-status took 97 us to dispatch here, with this one 38 us;
- ``context``: the RpcContext every method receives.

Every request goes through the synchronous entry point (``dispatch_to_response`` with
jsonrpcserver's own ``to_serializable_one`` as ``post_process``: what
``dispatch_to_serializable`` does, without the typing cast it evaluates on every call, 3 us
here). The asynchronous one (``async_dispatch_to_serializable``) gathers each request as a
task of its own, which costs three more turns of the event loop per request on the way in
and three on the way out (about 60 us of a query-status round trip here, 90 us of a stop).
A method registered ``on_loop`` answers from the daemon's own state without awaiting
anything (query-status and the like) and is run to its end there. Any other method (one
that awaits the VM owner) has its parameters bound and refused there too, and its coroutine
is then awaited by ``Dispatcher.one`` in the request's own task; that is also how a
notification's method still runs to its end though it gets no reply. The replies are byte
for byte those of the asynchronous entry point, which is kept as the reference (tests
compare the two).

Methods are small async functions registered with ``@method(name, params...)``
(methods.py); one adapter binds their parameters (-32602 naming the bad one) and maps every
failure: a XendLiteError to its stable code with the class name in ``data``, anything else
to -32603 with the details in the daemon's log only.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from typing import Any, Awaitable, Callable

from jsonrpcserver import JsonRpcError, Success, async_dispatch_to_serializable, dispatch_to_response
from jsonrpcserver.response import to_serializable_one
from jsonrpcserver.sentinels import NODATA

from xend_lite.daemon.params import Param, ParamError, bind_params
from xend_lite.errors import GuestMemoryError, StateError, XendLiteError
from xend_lite.record import Frozen, Record
from xend_lite.record import set_field as _set

log = logging.getLogger("xend_lite.rpc")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
MAX_BODY = 1 << 20


class RpcContext(Record):
    """What a method sees: the daemon's services, and actions to run once the HTTP reply
    has been sent (quit stops the daemon only after it answered)."""

    __slots__ = ("controller", "daemon", "after_reply")

    def __init__(self, controller: Any, daemon: Any = None,
                 after_reply: list[Callable[[], Any]] | None = None):
        self.controller = controller
        self.daemon = daemon
        self.after_reply = [] if after_reply is None else after_reply


MethodFn = Callable[..., Awaitable[Any]]


class RpcMethod(Frozen):
    __slots__ = ("name", "fn", "params", "doc", "on_loop")
    name: str
    fn: MethodFn
    params: tuple[Param, ...]
    doc: str
    on_loop: bool        # answers without awaiting: dispatched without a task

    def __init__(self, name: str, fn: MethodFn, params: tuple[Param, ...], doc: str,
                 on_loop: bool = False):
        _set(self, "name", name)
        _set(self, "fn", fn)
        _set(self, "params", params)
        _set(self, "doc", doc)
        _set(self, "on_loop", on_loop)


METHODS: dict[str, RpcMethod] = {}


def method(name: str, *params: Param, on_loop: bool = False) -> Callable[[MethodFn], MethodFn]:
    """Register a control method. ``on_loop``: it never awaits (it answers from state the
    loop owns), so it is run to its end at once (a method that does await anyway fails with
    an internal error, never half done)."""
    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = RpcMethod(name, fn, params, (fn.__doc__ or "").strip(), on_loop)
        return fn
    return deco


def error_for(exc: BaseException) -> JsonRpcError:
    """The one place failures become JSON-RPC errors."""
    if isinstance(exc, JsonRpcError):
        return exc
    if isinstance(exc, ParamError):
        data = {"class": "InvalidParams", "param": exc.param} if exc.param else {"class": "InvalidParams"}
        return JsonRpcError(INVALID_PARAMS, f"Invalid params: {exc}", data)
    if isinstance(exc, XendLiteError):
        data: dict[str, Any] = {"class": exc.error_class}
        if isinstance(exc, StateError):
            data["state"] = exc.state
            data["allowed"] = list(exc.allowed)
        elif isinstance(exc, GuestMemoryError):
            data["gpa"] = exc.gpa
            data["length"] = exc.length
        if exc.extra:
            data.update({k: v for k, v in exc.extra.items() if k != "class"})
        return JsonRpcError(exc.code, str(exc) or exc.error_class, data)
    log.error("internal error in a control method", exc_info=exc)
    return JsonRpcError(INTERNAL_ERROR, "Internal error: see the daemon's log", {"class": "InternalError"})


def _observe(context: RpcContext, name: str, t0: float, ok: bool) -> None:
    """Count the call in the daemon's metrics (when it has them)."""
    metrics = getattr(context.daemon, "metrics", None)
    if metrics is not None:
        metrics.rpc_done(name, time.perf_counter() - t0, ok)


def _adapter(m: RpcMethod) -> Callable[..., Awaitable[Any]]:
    fn, params = m.fn, m.params

    name = m.name

    async def call(context: RpcContext, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            if args or kwargs or params:
                result = await fn(context, **bind_params(params, args, kwargs))
            else:  # nothing to bind (query-status and the other parameterless calls)
                result = await fn(context)
        except Exception as exc:  # noqa: BLE001 - mapped, never leaked
            raise _failed(context, name, t0, exc) from None
        return _succeeded(context, name, t0, result)
    return _named(call, name)


def _failed(context: RpcContext, name: str, t0: float, exc: Exception) -> JsonRpcError:
    _observe(context, name, t0, False)
    return error_for(exc)


def _succeeded(context: RpcContext, name: str, t0: float, result: Any) -> Any:
    return Success(_result(context, name, t0, result))


def _result(context: RpcContext, name: str, t0: float, result: Any) -> Any:
    _observe(context, name, t0, True)
    return {} if result is None else result


class _Awaited(RuntimeError):
    pass


def _to_the_end(coro: Any) -> Any:
    """The result of a coroutine that finishes without suspending."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise _Awaited("a method registered on_loop awaited")


def _now_adapter(m: RpcMethod) -> Callable[..., Any]:
    """The synchronous form of _adapter for an on_loop method: the same binding, errors and
    metrics, the coroutine run to its end at once."""
    fn, params, name = m.fn, m.params, m.name

    def call(context: RpcContext, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            bound = bind_params(params, args, kwargs) if args or kwargs or params else {}
            result = _to_the_end(fn(context, **bound))
        except Exception as exc:  # noqa: BLE001 - mapped, never leaked
            raise _failed(context, name, t0, exc) from None
        return _succeeded(context, name, t0, result)
    return _named(call, name)


class _Later(Record):
    """A method bound and begun on the synchronous entry point, its outcome still to come:
    ``Dispatcher.one`` awaits ``settle``."""

    __slots__ = ("coro", "context", "name", "t0")

    def __init__(self, coro: Awaitable[Any], context: RpcContext, name: str, t0: float):
        self.coro = coro
        self.context = context
        self.name = name
        self.t0 = t0

    async def settle(self) -> tuple[bool, Any]:
        """(True, the result) or (False, its JsonRpcError), as the adapters map them."""
        try:
            result = await self.coro
        except Exception as exc:  # noqa: BLE001 - mapped, never leaked
            return False, _failed(self.context, self.name, self.t0, exc)
        return True, _result(self.context, self.name, self.t0, result)


def _later_adapter(m: RpcMethod, pending: list[_Later]) -> Callable[..., Any]:
    """The synchronous form of _adapter for a method that awaits: its parameters bound (or
    refused, as _adapter refuses them) at once, its coroutine left in ``pending`` for
    ``Dispatcher.one`` to await; the result given to jsonrpcserver is a placeholder."""
    fn, params, name = m.fn, m.params, m.name

    def call(context: RpcContext, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            bound = bind_params(params, args, kwargs) if args or kwargs or params else {}
        except Exception as exc:  # noqa: BLE001 - mapped, never leaked
            raise _failed(context, name, t0, exc) from None
        pending.append(_Later(fn(context, **bound), context, name, t0))
        return _PLACEHOLDER
    return _named(call, name)


_PLACEHOLDER = Success(None)


def _named(call: Callable[..., Any], name: str) -> Callable[..., Any]:
    call.__name__ = name
    # jsonrpcserver binds the arguments to the method's signature on every call; giving it
    # the signature once spares computing it again each time
    call.__signature__ = inspect.signature(call)  # type: ignore[attr-defined]
    return call


# -- requests ------------------------------------------------------------------------------

def error_reply(code: int, message: str, id_: Any = None, data: Any = None) -> dict:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": id_}


_REQUEST_KEYS = frozenset(("jsonrpc", "method", "id", "params"))


def validate(request: Any) -> Any:
    """JSON-RPC 2.0's request schema, checked directly: jsonrpcserver's ``validator`` hook.
    The same rules as its bundled JSON Schema (jsonrpc "2.0", a string method, an id that
    is a string, number or null, params an array or object, nothing else). Raises
    ValueError when the request breaks one."""
    if type(request) is not dict or not request.keys() <= _REQUEST_KEYS:
        raise ValueError("not a request object")
    if request.get("jsonrpc") != "2.0" or type(request.get("jsonrpc")) is not str:
        raise ValueError("jsonrpc must be \"2.0\"")
    if type(request.get("method")) is not str:
        raise ValueError("method must be a string")
    if "id" in request:
        i = request["id"]
        if i is not None and type(i) not in (str, int, float):
            raise ValueError("id must be a string, a number or null")
    if "params" in request and type(request["params"]) not in (list, dict):
        raise ValueError("params must be an array or an object")
    return request


_validate = validate      # the name the schema-equivalence test uses


class Dispatcher:
    def __init__(self, methods: dict[str, RpcMethod] | None = None) -> None:
        table = METHODS if methods is None else methods
        # the asynchronous entry point's table: the reference the tests compare with
        self._methods = {name: _adapter(m) for name, m in table.items()}
        # the synchronous entry point's: every method (a test empties it to compare)
        self._later: list[_Later] = []
        self._now = {name: _now_adapter(m) if m.on_loop else _later_adapter(m, self._later)
                     for name, m in table.items()}

    async def handle(self, body: bytes, context: RpcContext) -> bytes | None:
        """One HTTP body in, the reply body out (None: nothing to send back)."""
        try:
            doc = _decode(body)
        except json.JSONDecodeError as exc:
            return _dump(error_reply(PARSE_ERROR, f"Parse error: {exc}"))
        except (ValueError, UnicodeDecodeError) as exc:
            why = str(exc) if isinstance(exc, _NotJson) else "the body is not valid UTF-8 JSON"
            return _dump(error_reply(PARSE_ERROR, f"Parse error: {why}"))
        except RecursionError:
            return _dump(error_reply(PARSE_ERROR, "Parse error: the body is nested too deeply"))
        if isinstance(doc, list):
            if not doc:
                return _dump(error_reply(INVALID_REQUEST, "Invalid request: empty batch"))
            replies = []
            for element in doc:
                reply = await self.one(element, context)
                if reply is not None:
                    replies.append(reply)
            if not replies:
                return None
            return ("[" + ",".join(replies) + "]").encode()
        reply = await self.one(doc, context)
        return None if reply is None else reply.encode()

    async def one(self, request: Any, context: RpcContext) -> str | None:
        """One request object (already parsed) in, its reply as JSON text out."""
        if not isinstance(request, dict):
            return json.dumps(error_reply(INVALID_REQUEST, "Invalid request: expected an object"))
        name = request.get("method")
        if type(name) is str and name in self._now:
            reply = dispatch_to_response(
                "", methods=self._now, context=context, validator=validate,
                deserializer=lambda _text: request, post_process=to_serializable_one)
            if self._later:    # the method awaits: its outcome, in this task
                ok, outcome = await self._later.pop().settle()
                if reply is not None:
                    reply = _reply(ok, outcome, reply["id"])
        else:
            reply = await async_dispatch_to_serializable(
                "", methods=self._methods, context=context, validator=validate,
                deserializer=lambda _text: request)
        if reply is None:            # a notification
            return None
        if "error" in reply:
            err = reply["error"]
            if err["code"] == METHOD_NOT_FOUND:
                err["message"] = f"Method not found: {request.get('method')}"
            elif err["code"] == INVALID_REQUEST:
                err["message"] = "Invalid request: " + _invalid_why(request)
                err.pop("data", None)
                reply["id"] = _valid_id(request.get("id"))
        try:
            return _encode(reply)
        except (TypeError, ValueError):
            log.error("method %s returned a result that is not JSON", request.get("method"))
            return json.dumps(error_reply(INTERNAL_ERROR, "Internal error: the result is not JSON",
                                          reply.get("id"), {"class": "InternalError"}))


class _NotJson(ValueError):
    pass


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON (Python's parser takes them by default)."""
    raise _NotJson(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    v = float(text)
    if v != v or v in (float("inf"), float("-inf")):
        raise _NotJson(f"the number {text[:40]} is out of range")
    return v


# One decoder and one encoder for every request: json.loads and json.dumps with options
# build a new one on each call.
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
_encode = json.JSONEncoder(allow_nan=False).encode


def _decode(body: bytes) -> Any:
    """json.loads(body, parse_constant=..., parse_float=...) with the one decoder: the same
    encoding detection (UTF-8, -16, -32, a UTF-8 BOM skipped) and the same errors."""
    # a body opening with "{" or "[" and then no NUL byte is UTF-8 to detect_encoding too
    first = body[:1]
    if (first == b"{" or first == b"[") and body[1:2] != b"\0":
        encoding = "utf-8"
    else:
        encoding = json.detect_encoding(body)
    return _DECODER.decode(body.decode(encoding, "surrogatepass"))


def _reply(ok: bool, outcome: Any, id_: Any) -> dict:
    """The reply jsonrpcserver makes of a method's result or its JsonRpcError."""
    if ok:
        return {"jsonrpc": "2.0", "result": outcome, "id": id_}
    err: dict[str, Any] = {"code": outcome.code, "message": outcome.message}
    if outcome.data is not NODATA:
        err["data"] = outcome.data
    return {"jsonrpc": "2.0", "error": err, "id": id_}


def _dump(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def _valid_id(v: Any) -> Any:
    return v if isinstance(v, (str, int, float)) and not isinstance(v, bool) else None


def _invalid_why(req: dict) -> str:
    if req.get("jsonrpc") != "2.0":
        return "'jsonrpc' must be \"2.0\""
    if not isinstance(req.get("method"), str):
        return "'method' must be a string"
    if "params" in req and not isinstance(req["params"], (list, dict)):
        return "'params' must be an object or an array"
    if "id" in req and not (req["id"] is None or _valid_id(req["id"]) is not None):
        return "'id' must be a string, a number or null"
    extra = set(req) - {"jsonrpc", "method", "params", "id"}
    if extra:
        return f"unknown member {sorted(extra)[0]!r}"
    return "does not match JSON-RPC 2.0"
