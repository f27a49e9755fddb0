"""A hostile control-plane client against the real daemon (a subprocess running the default
guest): malformed JSON, wrong types, huge numbers, deep nesting, bodies over 1 MiB, mixed
batches, unknown methods and parameters of every wrong shape. Each input gets a correct
JSON-RPC reply (an error, or a result for a valid call), never a 500 or an Internal error;
the daemon keeps serving and the guest keeps running. TCP needs the exact token, and how
long a refusal takes does not depend on how much of the token was right."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import scaled
from .daemonproc import TOKEN, DaemonProc, http, wait_until

pytestmark = pytest.mark.kvm

MAX_BODY = 1 << 20
APP_CODES = range(1000, 1100)
PROTOCOL_CODES = (-32700, -32600, -32601, -32602)
# Methods that change the VM or the daemon: only ever sent with parameters they refuse.
DESTRUCTIVE = {"quit", "stop", "cont", "system_reset", "snapshot-save", "snapshot-load",
               "xen-overlay-map", "xen-overlay-unmap", "xen-event-inject", "pmemsave", "memsave",
               "x-write-memory"}


@pytest.fixture(scope="module")
def daemon():
    tmp = tempfile.mkdtemp(prefix="xl-")
    d = DaemonProc(tmp)
    try:
        wait_until(lambda: d.result("query-hypercalls")["hypercall_page"] is not None, 15,
                   "the default guest's hypercall page")
        d.methods = [m["name"] for m in d.result("query-commands")]
        yield d
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def healthy(d, hypercalls_before: int | None = None) -> int:
    assert d.alive(), d.log_text()[-2000:]
    assert d.result("query-status")["status"] == "running"
    hc = d.result("query-hypercalls")
    assert hc["internal_errors"] == 0
    if hypercalls_before is not None:
        assert hc["total"] >= hypercalls_before
    return hc["total"]


# -- what a correct reply looks like -------------------------------------------------------

def strict_json(body: bytes):
    def no_constant(name):
        raise ValueError(f"{name} in a reply")
    return json.loads(body, parse_constant=no_constant)


def check_one(reply, want_id=None) -> None:
    assert isinstance(reply, dict), reply
    assert reply.get("jsonrpc") == "2.0", reply
    assert "id" in reply, reply
    assert ("result" in reply) != ("error" in reply), reply
    if "error" in reply:
        err = reply["error"]
        assert isinstance(err.get("code"), int) and isinstance(err.get("message"), str), reply
        assert err["code"] in PROTOCOL_CODES or err["code"] in APP_CODES, \
            f"unexpected code (an Internal error is a daemon bug): {reply}"
        assert "Traceback" not in err["message"] and 'File "' not in err["message"], reply
    if want_id is not None:
        assert reply["id"] == want_id, (want_id, reply)


def depth(text: bytes) -> int:
    d = best = 0
    for ch in text:
        if ch in b"[{":
            d += 1
            best = max(best, d)
        elif ch in b"]}":
            d -= 1
    return best


def check_reply(sent: bytes, status: int, body: bytes, doc=None, want_id=None) -> None:
    """``doc`` is what we sent as a Python value (parsed here when not given)."""
    if doc is None:
        try:
            doc = strict_json(sent)
        except (ValueError, RecursionError):
            doc = None
    if len(sent) > MAX_BODY:
        assert status == 413, status
        check_one(strict_json(body))
        return
    assert status in (200, 204), (status, body[:300], sent[:200])
    if status == 204:
        assert body == b""
        is_note = isinstance(doc, dict) and "id" not in doc
        all_notes = isinstance(doc, list) and doc and all(isinstance(e, dict) and "id" not in e
                                                            for e in doc)
        assert is_note or all_notes, f"no reply to a request that wanted one: {sent[:200]!r}"
        return
    reply = strict_json(body)
    if isinstance(reply, dict) and reply.get("error", {}).get("code") == -32700 and depth(sent) > 900:
        doc = None      # the daemon's parser runs on a deeper stack than ours: too deep there
    if isinstance(doc, list) and doc:
        assert isinstance(reply, list) and 0 < len(reply) <= len(doc), (sent[:200], reply)
        for r in reply:
            check_one(r)
    else:
        check_one(reply, want_id)


# -- inputs --------------------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-(10 ** 300), 10 ** 300)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
JSON = st.recursive(JSON_SCALARS, lambda ch: st.lists(ch, max_size=4)
                    | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=12)
IDS = st.integers() | st.text(max_size=20) | st.none() | st.floats(allow_nan=False, allow_infinity=False)
BAD_IDS = st.booleans() | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)


def destructive_name(m) -> bool:
    return isinstance(m, str) and m in DESTRUCTIVE


def request_strategy(methods):
    safe = [m for m in methods if m not in DESTRUCTIVE]
    destructive = [m for m in methods if m in DESTRUCTIVE]
    unknown = st.text(max_size=40).filter(lambda s: s not in methods) | st.sampled_from(
        ["rpc.discover", "QUERY-STATUS", "query-status ", "query_status", "x" * 5000, ""])

    @st.composite
    def call(draw):
        kind = draw(st.sampled_from(["safe", "safe", "destructive", "unknown", "shape"]))
        req = {"jsonrpc": "2.0"}
        if kind == "safe":
            req["method"] = draw(st.sampled_from(safe))
            params = draw(st.none() | JSON | st.dictionaries(
                st.sampled_from(["page", "gpa", "path", "paused", "max_bytes", "x"]), JSON, max_size=3))
        elif kind == "destructive":
            req["method"] = draw(st.sampled_from(destructive))
            # always refused: an unknown member, or positional values
            params = draw(st.dictionaries(st.sampled_from(["page", "gpa", "path", "paused"]), JSON,
                                          max_size=3))
            params = dict(params, no_such_parameter=draw(JSON)) if draw(st.booleans()) \
                else [draw(JSON)] + draw(st.lists(JSON, max_size=2))
        elif kind == "unknown":
            req["method"] = draw(unknown)
            params = draw(st.none() | JSON)
        else:   # the envelope itself of the wrong shape
            req["method"] = draw(st.sampled_from(safe) | JSON)
            if draw(st.booleans()):
                req["jsonrpc"] = draw(JSON | st.sampled_from(["1.0", "2", "2.00", 2.0]))
            params = draw(st.none() | JSON)
            if draw(st.booleans()):
                req[draw(st.text(max_size=8))] = draw(JSON)
            if isinstance(params, list) and destructive_name(req["method"]) and not params:
                params = [1]
        if params is not None:
            req["params"] = params
        elif destructive_name(req.get("method")):
            req["params"] = {"no_such_parameter": 1}
        if draw(st.integers(0, 9)) == 0:
            pass                          # a notification
        elif draw(st.integers(0, 9)) == 0:
            req["id"] = draw(BAD_IDS)
        else:
            req["id"] = draw(IDS)
        if destructive_name(req.get("method")) and not isinstance(req.get("params"), (list, dict)):
            req["params"] = {"no_such_parameter": 1}
        if destructive_name(req.get("method")) and req["params"] in ([], {}):
            req["params"] = {"no_such_parameter": 1}
        return req

    return call()


def body_strategy(methods):
    req = request_strategy(methods)

    @st.composite
    def body(draw):
        kind = draw(st.sampled_from(["one", "one", "one", "batch", "raw", "truncated", "nested",
                                     "numbers", "constants"]))
        if kind == "one":
            doc = draw(req)
            return json.dumps(doc).encode(), doc
        if kind == "batch":
            doc = draw(st.lists(req | JSON, max_size=12))
            return json.dumps(doc).encode(), doc
        if kind == "raw":
            return draw(st.binary(max_size=200)), None
        if kind == "truncated":
            text = json.dumps(draw(req)).encode()
            return text[:draw(st.integers(0, max(0, len(text) - 1)))], None
        if kind == "nested":
            depth = draw(st.sampled_from([50, 500, 990, 1000, 5000, 100000]))
            shape = draw(st.sampled_from(["params", "bare", "object"]))
            if shape == "params":
                text = ('{"jsonrpc":"2.0","id":7,"method":"query-status","params":{"x":'
                        + "[" * depth + "]" * depth + "}}")
            elif shape == "bare":
                text = "[" * depth + "]" * depth
            else:
                text = '{"a":' * depth + "1" + "}" * depth
            return text.encode(), None
        if kind == "numbers":
            n = draw(st.sampled_from(["1e400", "-1e400", "1" * 4000, "9" * 5000, "1e-400",
                                      "123456789012345678901234567890", "-0", "0.0"]))
            field = draw(st.sampled_from(["id", "gpa", "max_bytes"]))
            if field == "id":
                text = f'{{"jsonrpc":"2.0","id":{n},"method":"query-version"}}'
            elif field == "gpa":
                text = f'{{"jsonrpc":"2.0","id":3,"method":"xen-overlay-map","params":{{"page":"grant:1","gpa":{n},"zz":1}}}}'
            else:
                text = f'{{"jsonrpc":"2.0","id":4,"method":"query-console","params":{{"max_bytes":{n}}}}}'
            return text.encode(), None
        c = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        return f'{{"jsonrpc":"2.0","id":{c},"method":"query-version"}}'.encode(), None

    return body()


def run_one(d, body: bytes, doc) -> None:
    want_id = None
    if isinstance(doc, dict) and isinstance(doc.get("id"), (int, str)) and not isinstance(doc["id"], bool):
        want_id = doc["id"]
    status, _h, reply = http(d.sock, body)
    check_reply(body, status, reply, doc, want_id)


# -- tests ---------------------------------------------------------------------------------

def test_generated_requests_get_correct_replies(daemon, request):
    d = daemon
    n = scaled(1000, 10000, request)
    before = healthy(d)
    count = [0]

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body_strategy(d.methods))
    def one(sample):
        body, doc = sample
        run_one(d, body, doc)
        count[0] += 1
        if count[0] % 200 == 0:
            healthy(d)

    t0 = time.monotonic()
    one()
    healthy(d, before)
    print(f"\n{count[0]} generated requests in {time.monotonic() - t0:.1f} s")
    assert count[0] == n


@pytest.mark.slow
def test_generated_requests_get_correct_replies_long(daemon, request):
    test_generated_requests_get_correct_replies(daemon, request)


def test_every_method_with_every_wrong_shape(daemon):
    """Each method by name, with params of each JSON type, and each declared parameter with
    a value of each wrong type: a -32602 naming the parameter (or a result for a right one)."""
    d = daemon
    shapes = [None, True, 0, -1, 1 << 64, 1.5, "", "x", "\0", [], [1], {}, {"": 1},
              {"zz": 1}, "a" * 100000]
    commands = d.result("query-commands")
    n = 0
    for m in commands:
        name = m["name"]
        for params in shapes[:-1] + [[shapes[-1]]]:
            if name in DESTRUCTIVE and (params in ([], {}) or not isinstance(params, (list, dict))):
                params = {"zz": params}
            req = {"jsonrpc": "2.0", "id": n, "method": name, "params": params}
            body = json.dumps(req).encode()
            status, _h, reply = http(d.sock, body)
            check_reply(body, status, reply, req, n)
            if not isinstance(params, (list, dict)):
                assert strict_json(reply)["error"]["code"] == -32600
            n += 1
        for p in m["params"]:
            for v in shapes:
                args = {q["name"]: v for q in m["params"] if q["required"]}
                args[p["name"]] = v
                if name in DESTRUCTIVE:
                    args["zz"] = 1      # never runs
                req = {"jsonrpc": "2.0", "id": n, "method": name, "params": args}
                body = json.dumps(req).encode()
                status, _h, reply = http(d.sock, body)
                check_reply(body, status, reply, req, n)
                n += 1
    healthy(d)
    print(f"\n{n} wrong-shape calls")
    assert n == len(shapes) * (len(commands) + sum(len(m["params"]) for m in commands))


@pytest.mark.parametrize("size", [MAX_BODY + 1, 2 * MAX_BODY, 8 * MAX_BODY])
def test_huge_bodies_are_refused(daemon, size):
    d = daemon
    pad = "x" * size
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "query-status", "params": {"p": pad}}).encode()
    status, _h, reply = http(d.sock, body)
    check_reply(body, status, reply)
    # a lying Content-Length (small) with a huge body, and a huge one with a small body
    status, _h, reply = http(d.sock, body[:100], content_length=size)
    assert status in (400, 413), status
    healthy(d)


def test_batches(daemon):
    d = daemon
    ok = {"jsonrpc": "2.0", "method": "query-status"}
    batch = [dict(ok, id=1), {"bad": 1}, 5, dict(ok), dict(ok, id="two", method="nope"), [],
             dict(ok, id=3, params=[1]), dict(ok, id=4)]
    status, _h, body = http(d.sock, json.dumps(batch).encode())
    reply = strict_json(body)
    assert status == 200
    ids = [r["id"] for r in reply]
    assert ids == [1, None, None, "two", None, 3, 4]     # in order, notification unanswered
    assert reply[0]["result"]["status"] == "running" and reply[-1]["result"]["status"] == "running"
    for body in (b"[]", json.dumps([ok] * 3).encode()):
        status, _h, raw = http(d.sock, body)
        check_reply(body, status, raw, json.loads(body))
    big = [dict(ok, id=i) for i in range(2000)]
    status, _h, raw = http(d.sock, json.dumps(big).encode())
    assert status == 200 and [r["id"] for r in strict_json(raw)] == list(range(2000))
    healthy(d)


def test_other_http_shapes(daemon):
    d = daemon
    for method, path in (("GET", "/rpc"), ("PUT", "/rpc"), ("POST", "/"), ("POST", "/rpc/x"),
                         ("POST", "/events"), ("GET", "/" + "a" * 4000)):
        status, _h, _b = http(d.sock, b"{}", method=method, path=path)
        assert 400 <= status < 500, (method, path, status)
    status, _h, body = http(d.sock, json.dumps({"jsonrpc": "2.0", "id": 1, "method": "query-status"}).encode(),
                            headers={"Content-Type": "text/plain"})
    assert status == 200 and strict_json(body)["result"]["status"] == "running"
    healthy(d)


# -- the socket and TCP --------------------------------------------------------------------

def test_unix_socket_is_private(daemon):
    st_ = os.stat(daemon.sock)
    assert stat.S_ISSOCK(st_.st_mode)
    assert stat.S_IMODE(st_.st_mode) == 0o600
    with open(f"/proc/{daemon.pid}/status") as f:
        uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    assert st_.st_uid == uid


def tcp(d):
    return ("127.0.0.1", d.port)


QUERY = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "query-status"}).encode()


@pytest.mark.parametrize("auth", [
    None, "", "Bearer", "Bearer ", "Bearer x", "Bearer " + TOKEN[:-1], "Bearer " + TOKEN + "x",
    "Bearer " + TOKEN[1:], "Bearer " + TOKEN.upper(), "Basic " + TOKEN, TOKEN,
    "Bearer " + "x" * 100000, "Bearer " + TOKEN[:-1] + "\u00e9",
])
def test_tcp_without_the_exact_token_is_refused(daemon, auth):
    headers = {} if auth is None else {"Authorization": auth}
    try:
        status, h, body = http(tcp(daemon), QUERY, headers=headers)
    except UnicodeEncodeError:
        pytest.skip("the header cannot be sent as latin-1")
    assert status in (400, 401, 431), status
    if status == 401:
        reply = strict_json(body)
        assert reply["error"]["code"] == -32000 and "result" not in reply
        assert h.get("www-authenticate", "").startswith("Bearer")
    status, _h, _b = http(tcp(daemon), b"", headers=headers, path="/events", method="GET")
    assert status in (400, 401, 431)
    healthy(daemon)


def test_tcp_with_the_token_works(daemon):
    for scheme in ("Bearer", "bearer", "BEARER"):
        status, _h, body = http(tcp(daemon), QUERY, headers={"Authorization": f"{scheme} {TOKEN}"})
        assert status == 200 and strict_json(body)["result"]["status"] == "running"
