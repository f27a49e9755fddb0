"""The control plane's methods and JSON-RPC 2.0 handling.

Methods are small async functions registered with ``@method(name, params...)``; each only
names its parameters and calls the controller. One adapter validates the parameters
(-32602 naming the bad one), calls the method and maps every failure: a XendLiteError to
its stable code with the class name in ``data``, anything else to -32603 with the details
in the daemon's log only.

jsonrpcserver does the per-request work (request schema, method lookup, calling, the
response envelope). Batches are split here so each element is answered on its own: a
malformed element gets its own Invalid Request and the rest still run, in order.
Notifications run but get no reply. Each reply is serialized on its own, so a result that
cannot be JSON becomes an Internal Error for that element alone.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from jsonrpcserver import Success
from oslash.either import Left  # type: ignore[import-untyped]
from jsonrpcserver.async_dispatcher import call as call_method
from jsonrpcserver.dispatcher import create_request, get_method, not_notification, to_response, validate_request
from jsonrpcserver.exceptions import JsonRpcError
from jsonrpcserver.response import to_serializable_one

import xend_lite
from xend_lite.errors import GuestMemoryError, StateError, XendLiteError

log = logging.getLogger("xend_lite.rpc")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
MAX_BODY = 1 << 20
U64_MAX = (1 << 64) - 1


class ParamError(Exception):
    """A parameter is missing, unknown or of the wrong type or range."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


# -- parameter checks ----------------------------------------------------------------------

def u64(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= U64_MAX:
        raise ValueError("must be an integer in 0..2^64-1")
    return v


def int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise ValueError(f"must be an integer in {lo}..{hi}")
        return v
    return check


def string(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("must be a non-empty string")
    if "\0" in v:
        raise ValueError("must not contain NUL")
    return v


def boolean(v: Any) -> bool:
    if type(v) is not bool:
        raise ValueError("must be true or false")
    return v


@dataclass(frozen=True)
class Param:
    name: str
    check: Callable[[Any], Any]
    required: bool = True
    default: Any = None


def opt(name: str, check: Callable[[Any], Any], default: Any) -> Param:
    return Param(name, check, required=False, default=default)


def bind_params(params: tuple[Param, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    if args:
        raise ParamError(None, "params must be an object of named parameters")
    known = {p.name for p in params}
    for name in kwargs:
        if name not in known:
            expected = ", ".join(sorted(known)) or "none"
            raise ParamError(name, f"unknown parameter '{name}' (expected: {expected})")
    out = {}
    for p in params:
        if p.name not in kwargs:
            if p.required:
                raise ParamError(p.name, f"missing parameter '{p.name}'")
            out[p.name] = p.default
            continue
        try:
            out[p.name] = p.check(kwargs[p.name])
        except (TypeError, ValueError) as exc:
            raise ParamError(p.name, f"'{p.name}' {exc}") from None
    return out


# -- the method table ----------------------------------------------------------------------

@dataclass
class RpcContext:
    """What a method sees: the daemon's services, and actions to run once the HTTP reply
    has been sent (quit stops the daemon only after it answered)."""

    controller: Any
    daemon: Any = None
    after_reply: list[Callable[[], Any]] = field(default_factory=list)


MethodFn = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class RpcMethod:
    name: str
    fn: MethodFn
    params: tuple[Param, ...]
    doc: str


METHODS: dict[str, RpcMethod] = {}


def method(name: str, *params: Param) -> Callable[[MethodFn], MethodFn]:
    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = RpcMethod(name, fn, params, (fn.__doc__ or "").strip())
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
        return JsonRpcError(exc.code, str(exc) or exc.error_class, data)
    log.error("internal error in a control method", exc_info=exc)
    return JsonRpcError(INTERNAL_ERROR, "Internal error: see the daemon's log", {"class": "InternalError"})


def _adapter(m: RpcMethod) -> Callable[..., Awaitable[Any]]:
    fn, params = m.fn, m.params

    async def call(context: RpcContext, *args: Any, **kwargs: Any) -> Any:
        try:
            if args or kwargs or params:
                result = await fn(context, **bind_params(params, args, kwargs))
            else:  # nothing to bind (query-status and the other parameterless calls)
                result = await fn(context)
        except Exception as exc:  # noqa: BLE001 - mapped, never leaked
            raise error_for(exc) from None
        return Success({} if result is None else result)
    call.__name__ = m.name
    # jsonrpcserver checks the arguments against the method's signature on every call;
    # computing it once saves most of a request's dispatch time
    call.__signature__ = inspect.signature(call)
    return call


def jsonrpc_methods() -> dict[str, Callable[..., Awaitable[Any]]]:
    return {name: _adapter(m) for name, m in METHODS.items()}


# -- requests ------------------------------------------------------------------------------

def error_reply(code: int, message: str, id_: Any = None, data: Any = None) -> dict:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": id_}


_REQUEST_KEYS = frozenset(("jsonrpc", "method", "id", "params"))


def _validate(request: Any) -> Any:
    """JSON-RPC 2.0's request schema, checked directly: the same rules as jsonrpcserver's
    bundled JSON Schema (jsonrpc "2.0", a string method, an id that is a string, number or
    null, params an array or object, nothing else), at a fraction of a general schema
    validator's cost per request. Raises ValueError when the request breaks one."""
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


class Dispatcher:
    def __init__(self) -> None:
        self._methods = jsonrpc_methods()

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
        # jsonrpcserver's own steps for one request (validate, look up, call, wrap the
        # result), without the task its batch-oriented entry point makes. Its check of the
        # arguments against the method's signature is left out: every method here is an
        # adapter taking (context, *args, **kwargs), which any arguments fit, and the
        # adapter checks the parameters itself (bind_params).
        checked = validate_request(_validate, request)
        if isinstance(checked, Left):
            response = checked
        else:
            req = create_request(request)
            found = get_method(self._methods, req.method)
            result = found if isinstance(found, Left) else await call_method(req, context, found._value)
            if not not_notification((req, result)):
                return None
            response = to_response(req, result)
        reply = to_serializable_one(response)
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


# -- the methods ---------------------------------------------------------------------------

@method("query-version")
async def query_version(ctx: RpcContext) -> dict:
    """The daemon's version and the Xen version the guest sees."""
    parts = [int(p) if p.isdigit() else 0 for p in (xend_lite_version().split(".") + ["0", "0"])[:3]]
    spec = getattr(ctx.controller, "_spec", None)
    return {"xend-lite": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
            "package": f"xend-lite {xend_lite_version()}",
            "xen": getattr(spec, "xen_version", None)}


def xend_lite_version() -> str:
    v = getattr(xend_lite, "__version__", None)
    if v:
        return str(v)
    try:
        from importlib.metadata import version

        return version("xend-lite")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0.0.0"


@method("query-status")
async def query_status(ctx: RpcContext) -> dict:
    """The run state, answered from the loop so it is seen even during a save."""
    state = ctx.controller.state
    return {"status": state.value, "running": state.value == "running", "singlestep": False}


@method("query-capabilities")
async def query_capabilities(ctx: RpcContext) -> Any:
    return await ctx.controller.query("query_capabilities")


@method("query-vcpus")
async def query_vcpus(ctx: RpcContext) -> Any:
    return await ctx.controller.query("query_vcpus")


@method("query-memory-map")
async def query_memory_map(ctx: RpcContext) -> Any:
    return await ctx.controller.query("query_memory_map")


@method("query-console", opt("max_bytes", int_range(0, 1 << 20), 4096))
async def query_console(ctx: RpcContext, max_bytes: int) -> Any:
    """The last max_bytes of guest console output (UTF-8, invalid bytes replaced)."""
    return {"data": await ctx.controller.query("query_console", max_bytes)}


@method("query-hypercalls")
async def query_hypercalls(ctx: RpcContext) -> Any:
    return await ctx.controller.query("query_hypercalls")


@method("stop")
async def stop(ctx: RpcContext) -> None:
    await ctx.controller.stop()


@method("cont")
async def cont(ctx: RpcContext) -> None:
    await ctx.controller.cont()


@method("system_reset")
async def system_reset(ctx: RpcContext) -> None:
    await ctx.controller.system_reset()


@method("quit")
async def quit_(ctx: RpcContext) -> None:
    """Stop the daemon (exit status 0) once this reply has been sent."""
    if ctx.daemon is not None:
        ctx.after_reply.append(lambda: ctx.daemon.request_exit(0, "quit requested over RPC"))


@method("query-xen-overlay")
async def query_xen_overlay(ctx: RpcContext) -> Any:
    return await ctx.controller.query("query_xen_overlay")


@method("xen-overlay-map", Param("page", string), Param("gpa", u64), opt("force", boolean, False))
async def xen_overlay_map(ctx: RpcContext, page: str, gpa: int, force: bool) -> Any:
    """Map or move a page; one the guest mapped itself needs force=true (it is not told)."""
    return await ctx.controller.overlay_map(page, gpa, force)


@method("xen-overlay-unmap", Param("page", string), opt("force", boolean, False))
async def xen_overlay_unmap(ctx: RpcContext, page: str, force: bool) -> Any:
    return await ctx.controller.overlay_unmap(page, force)


@method("snapshot-save", Param("path", string), opt("paused", boolean, False))
async def snapshot_save(ctx: RpcContext, path: str, paused: bool) -> Any:
    """Pause, save, and resume unless paused=true (or it was paused already)."""
    return await ctx.controller.snapshot_save(path, paused)


@method("snapshot-load", Param("path", string), opt("verify", boolean, True))
async def snapshot_load(ctx: RpcContext, path: str, verify: bool) -> Any:
    """Load a snapshot; verify=false skips the guest-memory checksums (the fastest restore)."""
    return await ctx.controller.snapshot_load(path, verify)


@method("query-snapshot", Param("path", string))
async def query_snapshot(ctx: RpcContext, path: str) -> Any:
    return await ctx.controller.snapshot_describe(path)


@method("query-commands")
async def query_commands(ctx: RpcContext) -> list[dict]:
    """Every method with its parameters (QMP has the same)."""
    return [{"name": m.name, "params": [{"name": p.name, "required": p.required} for p in m.params]}
            for m in sorted(METHODS.values(), key=lambda m: m.name)]
