"""JSON-RPC 2.0 over POST /rpc against a real daemon on a temporary socket (FakeDomain):
every method, protocol faults, parameter checks, batches, notifications, error mapping."""

from __future__ import annotations

import json

import pytest

from xend_lite.cli.ctl import RpcError
from xend_lite.daemon import params, rpc
from xend_lite.errors import (ConfigError, GuestMemoryError, InternalError, InvalidArgument, LoaderError,
                              NotFound, NotSupported, SnapshotError, StateError, XendLiteError)


def req(method, params=None, id_=1):
    r = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        r["params"] = params
    if id_ is not None:
        r["id"] = id_
    return r


async def post(daemon, doc):
    async with daemon.client() as c:
        body = doc if isinstance(doc, bytes) else json.dumps(doc)
        return await c.post(body)


async def call(daemon, method, params=None):
    async with daemon.client() as c:
        return await c.call(method, params)


# -- every method answers ------------------------------------------------------------------

async def test_query_methods(daemon):
    assert await call(daemon, "query-status") == {"status": "running", "running": True, "singlestep": False,
                                                "qmp-status": "running"}
    v = await call(daemon, "query-version")
    assert v["xen"] == "4.16" and set(v["xend-lite"]) == {"major", "minor", "micro"}
    assert (await call(daemon, "query-capabilities"))["backend"] == "fake"
    assert (await call(daemon, "query-vcpus"))[0]["cpu"] == 0
    assert (await call(daemon, "query-memory-map"))[0] == {"kind": "ram", "gpa": 0, "size": 128 << 20}
    assert "booted" in (await call(daemon, "query-console"))["data"]
    assert (await call(daemon, "query-console", {"max_bytes": 6}))["data"] == "ooted\n"
    assert (await call(daemon, "query-console", {"max_bytes": 0}))["data"] == ""
    assert (await call(daemon, "query-hypercalls"))["xen_version"] == 1
    assert {"page": "shared_info", "gpa": None} in await call(daemon, "query-xen-overlay")
    names = {m["name"] for m in await call(daemon, "query-commands")}
    assert {"query-status", "stop", "cont", "system_reset", "quit", "xen-overlay-map",
            "xen-overlay-unmap", "snapshot-save", "snapshot-load", "query-snapshot"} <= names


async def test_queries_run_on_the_vm_owner_thread(daemon):
    await call(daemon, "query-vcpus")
    await call(daemon, "stop")
    await call(daemon, "xen-overlay-map", {"page": "shared_info", "gpa": 0x400000})
    threads = {t for _name, t in daemon.domain.calls}
    assert threads == {"vm-owner"}


async def test_overlay_map_and_unmap(daemon):
    r = await call(daemon, "xen-overlay-map", {"page": "shared_info", "gpa": 0x400000})
    assert r == {"page": "shared_info", "gpa": 0x400000}
    assert {"page": "shared_info", "gpa": 0x400000} in await call(daemon, "query-xen-overlay")
    # address 0 is an address, not "none"
    assert (await call(daemon, "xen-overlay-map", {"page": "grant0", "gpa": 0}))["gpa"] == 0
    assert (await call(daemon, "xen-overlay-unmap", {"page": "shared_info"}))["gpa"] is None
    r = await call(daemon, "xen-overlay-map", {"page": "grant0", "gpa": params.U64_MAX})
    assert r["gpa"] is None


async def test_domain_errors_keep_their_code_and_class(daemon):
    with pytest.raises(RpcError) as e:
        await call(daemon, "xen-overlay-map", {"page": "nope", "gpa": 0})
    assert (e.value.code, e.value.error_class) == (1002, "NotFound")
    assert "nope" in e.value.message
    with pytest.raises(RpcError) as e:
        await call(daemon, "xen-overlay-map", {"page": "shared_info", "gpa": 0x400001})
    assert (e.value.code, e.value.error_class) == (1001, "InvalidArgument")


# -- parameters ----------------------------------------------------------------------------

@pytest.mark.parametrize("method,params,bad", [
    ("xen-overlay-map", {"page": "shared_info", "gpa": -1}, "gpa"),
    ("xen-overlay-map", {"page": "shared_info", "gpa": 1 << 64}, "gpa"),
    ("xen-overlay-map", {"page": "shared_info", "gpa": "0x1000"}, "gpa"),
    ("xen-overlay-map", {"page": "shared_info", "gpa": 4096.0}, "gpa"),
    ("xen-overlay-map", {"page": "shared_info", "gpa": True}, "gpa"),
    ("xen-overlay-map", {"page": 7, "gpa": 0}, "page"),
    ("xen-overlay-map", {"page": "", "gpa": 0}, "page"),
    ("xen-overlay-map", {"gpa": 0}, "page"),
    ("xen-overlay-map", {"page": "shared_info"}, "gpa"),
    ("xen-overlay-map", {"page": "shared_info", "gpa": 0, "extra": 1}, "extra"),
    ("xen-overlay-unmap", {"page": None}, "page"),
    ("query-console", {"max_bytes": "10"}, "max_bytes"),
    ("query-console", {"max_bytes": -1}, "max_bytes"),
    ("snapshot-save", {"path": 5}, "path"),
    ("snapshot-save", {"path": "a", "paused": "yes"}, "paused"),
    ("snapshot-load", {}, "path"),
    ("query-snapshot", {"path": ["x"]}, "path"),
    ("query-status", {"verbose": True}, "verbose"),
])
async def test_invalid_params_name_the_parameter(daemon, method, params, bad):
    status, reply = await post(daemon, req(method, params))
    assert status == 200
    err = reply["error"]
    assert err["code"] == -32602
    assert f"'{bad}'" in err["message"]
    assert err["data"]["param"] == bad
    assert reply["id"] == 1


async def test_positional_params_are_refused(daemon):
    _, reply = await post(daemon, req("xen-overlay-unmap", ["shared_info"]))
    assert reply["error"]["code"] == -32602
    assert "named" in reply["error"]["message"]
    # an empty array is no parameters
    _, reply = await post(daemon, req("query-status", []))
    assert reply["result"]["status"] == "running"


async def test_largest_gpa_accepted_as_unmap(daemon):
    _, reply = await post(daemon, req("xen-overlay-map", {"page": "shared_info", "gpa": (1 << 64) - 1}))
    assert "result" in reply


# -- protocol faults -----------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"{", b"not json", b"\xff\xfe", b"", b'{"jsonrpc": "2.0", "method": "x",}'])
async def test_parse_error(daemon, body):
    status, reply = await post(daemon, body)
    assert status == 200
    assert reply["error"]["code"] == -32700
    assert reply["id"] is None


@pytest.mark.parametrize("doc,why", [
    ({"method": "query-status", "id": 1}, "jsonrpc"),
    ({"jsonrpc": "1.0", "method": "query-status", "id": 1}, "jsonrpc"),
    ({"jsonrpc": "2.0", "id": 1}, "method"),
    ({"jsonrpc": "2.0", "method": 5, "id": 1}, "method"),
    ({"jsonrpc": "2.0", "method": "query-status", "params": "x", "id": 1}, "params"),
    ({"jsonrpc": "2.0", "method": "query-status", "id": {"a": 1}}, "id"),
    ({"jsonrpc": "2.0", "method": "query-status", "id": 1, "extra": 2}, "extra"),
    (42, "object"),
    ("query-status", "object"),
    (None, "object"),
    ([], "empty"),
])
async def test_invalid_request(daemon, doc, why):
    status, reply = await post(daemon, doc)
    assert status == 200
    assert reply["error"]["code"] == -32600
    assert why in reply["error"]["message"]


async def test_unknown_method(daemon):
    _, reply = await post(daemon, req("query-everything", id_="abc"))
    assert reply["error"]["code"] == -32601
    assert "query-everything" in reply["error"]["message"]
    assert reply["id"] == "abc"


async def test_oversized_body_is_refused(daemon):
    big = json.dumps(req("query-status", {"pad": "x" * (1 << 20)})).encode()
    status, reply = await post(daemon, big)
    assert status == 413
    assert reply["error"]["code"] == -32600
    assert "larger" in reply["error"]["message"]
    # the daemon still answers afterwards
    assert (await call(daemon, "query-status"))["status"] == "running"


async def test_body_just_under_the_limit_is_read(daemon):
    pad = "x" * ((1 << 20) - 200)
    status, reply = await post(daemon, json.dumps(req("query-status", {"pad": pad})).encode())
    assert status == 200 and reply["error"]["code"] == -32602  # read, then refused by name


async def test_wrong_http_method_and_path(daemon):
    async with daemon.client() as c:
        async with c._session.get("http://x/rpc") as resp:
            assert resp.status == 405
        async with c._session.post("http://x/other", data=b"{}") as resp:
            assert resp.status == 404


# -- batches and notifications -------------------------------------------------------------

async def test_mixed_batch_answers_each_element(daemon):
    batch = [
        req("stop", id_=1),
        42,
        req("query-status", id_=None),                       # notification: no reply
        req("nope", id_=3),
        req("xen-overlay-map", {"page": "shared_info", "gpa": -5}, id_=4),
        {"jsonrpc": "2.0", "id": 5},                         # invalid element
        req("query-status", id_=6),
        req("stop", id_=7),                                  # already paused: a no-op
        req("cont", id_=8),
    ]
    status, replies = await post(daemon, batch)
    assert status == 200
    by_id = {r["id"]: r for r in replies if r["id"] is not None}
    assert by_id[1]["result"] == {}
    assert by_id[3]["error"]["code"] == -32601
    assert by_id[4]["error"]["code"] == -32602
    assert by_id[5]["error"]["code"] == -32600
    assert by_id[6]["result"]["status"] == "paused"          # elements run in order
    assert by_id[7]["result"] == {}
    assert by_id[8]["result"] == {}
    assert [r["error"]["code"] for r in replies if r["id"] is None] == [-32600]
    assert len(replies) == 8
    assert (await call(daemon, "query-status"))["status"] == "running"


async def test_notification_runs_but_gets_no_reply(daemon):
    status, reply = await post(daemon, req("stop", id_=None))
    assert status == 204 and reply is None
    assert (await call(daemon, "query-status"))["status"] == "paused"
    # a failing notification is not answered either
    status, reply = await post(daemon, req("stop", id_=None))
    assert status == 204 and reply is None


async def test_batch_of_notifications_gets_no_reply(daemon):
    status, reply = await post(daemon, [req("stop", id_=None), req("cont", id_=None)])
    assert status == 204 and reply is None
    assert (await call(daemon, "query-status"))["status"] == "running"


async def test_null_id_is_answered(daemon):
    _, reply = await post(daemon, req("query-status", id_=None) | {"id": None})
    assert reply["result"]["status"] == "running" and reply["id"] is None


# -- failures inside methods ---------------------------------------------------------------

async def test_unexpected_exception_is_an_internal_error_without_details(daemon, monkeypatch, caplog):
    def boom():
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(daemon.domain, "query_vcpus", boom)
    _, reply = await post(daemon, req("query-vcpus"))
    err = reply["error"]
    assert err["code"] == -32603
    assert "secret" not in json.dumps(reply) and "Traceback" not in json.dumps(reply)
    assert err["data"] == {"class": "InternalError"}


async def test_unserializable_result_is_an_internal_error(daemon, monkeypatch):
    monkeypatch.setattr(daemon.domain, "query_hypercalls", lambda: {"x": object()})
    monkeypatch.setattr(daemon.domain, "query_vcpus", lambda: [float("nan")])
    status, replies = await post(daemon, [req("query-hypercalls", id_=1), req("query-vcpus", id_=2),
                                          req("query-status", id_=3)])
    assert status == 200
    assert replies[0]["error"]["code"] == -32603 and replies[0]["id"] == 1
    assert replies[1]["error"]["code"] == -32603 and replies[1]["id"] == 2
    assert replies[2]["result"]["status"] == "running"


@pytest.mark.parametrize("exc,code", [
    (InvalidArgument("bad"), 1001), (NotFound("gone"), 1002), (StateError("no", "paused", ("running",)), 1003),
    (NotSupported("nope"), 1004), (GuestMemoryError("oob", 0x1000, 8), 1005), (LoaderError("elf"), 1006),
    (SnapshotError("snap"), 1010), (ConfigError("cfg"), 1020), (InternalError("int"), 1099),
])
async def test_every_error_class_maps_to_its_code(daemon, monkeypatch, exc, code):
    def fail():
        raise exc

    monkeypatch.setattr(daemon.domain, "query_capabilities", fail)
    _, reply = await post(daemon, req("query-capabilities"))
    err = reply["error"]
    assert err["code"] == code
    assert err["data"]["class"] == type(exc).__name__
    assert err["message"] == str(exc)
    if isinstance(exc, StateError):
        assert err["data"]["state"] == "paused" and err["data"]["allowed"] == ["running"]
    if isinstance(exc, GuestMemoryError):
        assert err["data"]["gpa"] == 0x1000 and err["data"]["length"] == 8


def test_error_codes_are_distinct():
    classes = [InvalidArgument, NotFound, StateError, NotSupported, GuestMemoryError, LoaderError,
               SnapshotError, ConfigError, InternalError]
    codes = [c.code for c in classes]
    assert len(set(codes)) == len(codes)
    assert all(issubclass(c, XendLiteError) for c in classes)
    assert all(c > 0 for c in codes)  # never in JSON-RPC's reserved -32768..-32000


def test_bind_params_unit():
    want = (params.Param("a", params.u64), params.opt("b", params.boolean, False))
    assert params.bind_params(want, (), {"a": 3}) == {"a": 3, "b": False}
    with pytest.raises(params.ParamError, match="missing parameter 'a'"):
        params.bind_params(want, (), {})
    with pytest.raises(params.ParamError, match="unknown parameter 'c'"):
        params.bind_params(want, (), {"a": 1, "c": 2})


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8)
_request_like = st.dictionaries(
    st.sampled_from(["jsonrpc", "method", "id", "params", "extra"]),
    st.sampled_from(["2.0", "1.0", 2.0, "query-status", None, 1, 1.5, True, [], {}, [1], {"a": 1}])
    | _json_values, max_size=5)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_request_like, _json_values))
def test_request_check_agrees_with_the_bundled_json_schema(request):
    """Our direct request check accepts and refuses exactly what jsonrpcserver's own JSON
    Schema does (for single requests; batches are split before it runs)."""
    from jsonrpcserver.main import default_validator

    from xend_lite.daemon.rpc import _validate

    def verdict(fn):
        try:
            fn(request)
            return True
        except Exception:  # noqa: BLE001 - either refusal counts
            return False
    if isinstance(request, list):
        return   # batches never reach the per-request check
    assert verdict(_validate) == verdict(default_validator), request


# -- methods answered on the loop: the synchronous entry point, the same replies -------------

def _loop_requests(name):
    return [req(name), req(name, id_="s"), req(name, id_=None), req(name, {}),
            req(name, {"unexpected": 1}), req(name, [1]), {"jsonrpc": "2.0", "method": name, "id": [1]}]


async def test_on_loop_methods_answer_as_through_the_async_entry_point(daemon):
    """Each method registered on_loop gives, through jsonrpcserver's synchronous entry point,
    exactly the reply the asynchronous one gives (valid, bad params, notification, bad id)."""
    on_loop = sorted(n for n, m in rpc.METHODS.items() if m.on_loop and n != "quit")
    assert {"query-status", "query-version", "query-commands", "query-snapshot-job"} <= set(on_loop)
    both = rpc.Dispatcher()
    only_async = rpc.Dispatcher()
    only_async._now = {}
    for name in on_loop:
        for r in _loop_requests(name):
            ctx = lambda: rpc.RpcContext(daemon.controller, daemon.daemon)   # noqa: E731
            assert await both.one(r, ctx()) == await only_async.one(r, ctx()), r


async def test_an_on_loop_method_that_awaits_is_an_internal_error_not_half_done(daemon, caplog):
    import asyncio

    ran_on: list[str] = []

    async def awaits(ctx):
        ran_on.append("before")
        await asyncio.sleep(0)
        ran_on.append("after")
        return {}

    d = rpc.Dispatcher({"x-awaits": rpc.RpcMethod("x-awaits", awaits, (), "", on_loop=True)})
    reply = json.loads(await d.one(req("x-awaits"), rpc.RpcContext(daemon.controller)))
    assert reply["error"]["code"] == rpc.INTERNAL_ERROR and ran_on == ["before"]


def test_methods_registered_on_loop_never_await():
    """The flag is only on methods whose body has no await (checked in their source), so the
    synchronous path never meets a suspended method."""
    import ast
    import inspect
    import textwrap

    for name, m in rpc.METHODS.items():
        if m.on_loop:
            tree = ast.parse(textwrap.dedent(inspect.getsource(m.fn)))
            awaits = [n for n in ast.walk(tree) if isinstance(n, (ast.Await, ast.AsyncFor, ast.AsyncWith))]
            assert not awaits, name


# -- methods that await the VM owner: the synchronous entry point, their outcome awaited -------

def _owner_sequence():
    """Request bodies, in order, that pass through every outcome a method awaiting the VM
    owner can have: results, bad params naming the param, state errors with their data,
    domain errors, an internal error, notifications (which must still run), batches."""
    b = lambda doc: json.dumps(doc).encode()   # noqa: E731
    seq = [
        b(req("query-status")),
        b(req("x-write-memory", {"gpa": 0, "data": "AA=="})),          # running: a StateError
        b(req("xen-overlay-map", {"page": "shared_info"})),            # missing gpa
        b(req("xen-overlay-map", {"page": "shared_info", "gpa": -5})),
        b(req("xen-overlay-map", {"page": "nope", "gpa": 4096})),       # NotFound from the domain
        b(req("xen-overlay-map", {"page": "shared_info", "gpa": 4097})),
        b(req("xen-overlay-map", {"page": "shared_info", "gpa": 0x400000}, id_="m")),
        b(req("xen-overlay-map", [1, 2])),
        b(req("console-write", {"data": "a", "data-base64": "YQ=="})),  # refused in the method
        b(req("query-vcpus", {"registers": "yes"})),
        b(req("stop", id_=None)),                                      # a notification: still runs
        b(req("x-write-memory", {"gpa": 0, "data": "AA=="}, id_=1.5)),  # paused now: done
        b(req("stop", id_="s")),
        b(req("query-snapshot", {"path": "missing.xls"})),
        b({"jsonrpc": "2.0", "method": "cont", "id": None}),
        b([req("stop", id_=1), req("query-status", id_=2), req("cont", id_=None), 7,
           req("query-status", id_=3), req("nope", id_=4), req("xen-overlay-unmap", {"page": "shared_info"}, id_=5),
           {"jsonrpc": "2.0", "id": 6}, req("stop", id_=7), req("cont", id_=8), req("query-vcpus", id_=9)]),
        b([req("stop", id_=None), req("cont", id_=None)]),              # no reply at all
        b([req("x-write-memory", {"gpa": 0, "data": "AA=="}, id_=None), req("query-hypercalls", id_=1)]),
    ]
    for name in sorted(rpc.METHODS):
        seq.append(b(req(name, {"zz-unknown": 1}, id_=name)))
        seq.append(b(req(name, {"zz-unknown": 1}, id_=None)))
    return seq


async def _replies(d, dispatcher, bodies):
    out = []
    for body in bodies:
        out.append(await dispatcher.handle(body, rpc.RpcContext(d.controller, d.daemon)))
    return out


async def test_owner_methods_answer_as_through_the_async_entry_point(start_daemon, short_tmp, monkeypatch):
    """The same requests against two daemons alike, one through the synchronous entry point
    (every method), one through the asynchronous one only: the reply bodies are the same
    bytes, request by request (errors with their data, notifications unanswered but run,
    batches in order), and the daemons count the same calls."""
    import os

    a = await start_daemon(socket=os.path.join(short_tmp, "a.sock"))
    b = await start_daemon(socket=os.path.join(short_tmp, "b.sock"))
    sync, only_async = rpc.Dispatcher(), rpc.Dispatcher()
    only_async._now = {}
    assert {n for n, m in rpc.METHODS.items() if not m.on_loop} <= set(sync._now)
    bodies = _owner_sequence()
    got = await _replies(a, sync, bodies)
    want = await _replies(b, only_async, bodies)
    for body, g, w in zip(bodies, got, want):
        assert g == w, body
    # an internal error, details kept out of the reply
    for d in (a, b):
        monkeypatch.setattr(d.domain, "query_vcpus", lambda: 1 / 0)
    body = [json.dumps(req("query-vcpus")).encode()]
    g, w = (await _replies(a, sync, body))[0], (await _replies(b, only_async, body))[0]
    assert g == w and json.loads(g)["error"] == {"code": rpc.INTERNAL_ERROR, "data": {"class": "InternalError"},
                                                 "message": "Internal error: see the daemon's log"}
    # the notifications ran: each stop and cont reached the domain alike
    assert [n for n, _t in a.domain.calls] == [n for n, _t in b.domain.calls]
    assert a.daemon.metrics.requests == b.daemon.metrics.requests
    assert a.daemon.metrics.requests[("stop", "ok")] >= 5


async def test_a_notification_of_an_owner_method_runs_to_its_end(daemon):
    """A notification gets no reply, yet its method runs, and its outcome is in before the
    (empty) reply goes back."""
    d = rpc.Dispatcher()
    ctx = rpc.RpcContext(daemon.controller, daemon.daemon)
    assert await d.handle(json.dumps(req("stop", id_=None)).encode(), ctx) is None
    assert daemon.controller.state.value == "paused"
    assert await d.handle(json.dumps([req("cont", id_=None), req("stop", id_=None)]).encode(), ctx) is None
    assert [t for t in daemon.controller.transitions[-3:]] == [
        (rpc_state("running"), rpc_state("paused")), (rpc_state("paused"), rpc_state("running")),
        (rpc_state("running"), rpc_state("paused"))]
    assert not d._later


def rpc_state(name):
    from xend_lite.daemon.runstate import RunState

    return RunState(name)
