"""Property tests: hostile bytes and request storms never raise and never grow memory past
the quotas; the tree behaves like a plain model of paths and values."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.xen.xenstore.helpers import REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD, U32, Guest, msg
from xend_lite.errors import NotFound
from xend_lite.xen.page import BytesPage
from xend_lite.xen.xenstore.protocol import HEADER_SIZE, PAYLOAD_MAX, XsType
from xend_lite.xen.xenstore.server import XenstoreServer
from xend_lite.xen.xenstore.store import Quotas
from xend_lite.xen.xenstore.toolstack import DomainInfo

QUOTAS = Quotas(nodes=40, watches=6, transactions=3, transaction_nodes=30, outstanding=4,
                queued_events=12)


def make() -> Guest:
    g = Guest(5, QUOTAS)
    g.server.write_domain_tree(DomainInfo("guest", 65536))
    return g


def check_bounds(g: Guest, produced: int = 0) -> None:
    s, q = g.server, QUOTAS
    assert s.replies <= q.outstanding
    assert len(s.out) - s.replies <= q.queued_events
    assert sum(len(o.data) for o in s.out) <= (q.outstanding + q.queued_events) * \
        (HEADER_SIZE + PAYLOAD_MAX)
    assert len(s.reader.partial()) < HEADER_SIZE + PAYLOAD_MAX
    assert s.store.counts.get(5, 0) <= q.nodes
    assert len(s.conn.watches) <= q.watches
    assert len(s.conn.transactions) <= q.transactions
    assert all(len(t.nodes) <= q.transaction_nodes for t in s.conn.transactions.values())
    if produced:                                    # never written past the guest's consumer
        assert (g.get(RSP_PROD) - g.get(RSP_CONS)) % U32 <= 1024


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=1100),
                          st.tuples(st.sampled_from([REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD]),
                                    st.integers(0, U32 - 1))), max_size=25))
def test_hostile_bytes_and_indices(steps):
    g = make()
    for step in steps:
        if isinstance(step, tuple):
            g.set(*step)                            # the guest scribbles on an index
        else:
            g.send_raw(step)
        check_bounds(g, g.process().produced)
        if (g.get(RSP_PROD) - g.get(RSP_CONS)) % U32 <= 1024:
            g.set(RSP_CONS, g.get(RSP_PROD))        # the guest takes its replies


PATHS = st.sampled_from(["data", "data/a", "data/a/b", "data/c", "/local/domain/5",
                         "name", "/tool", "/local/domain/0/x", "@releaseDomain", "",
                         "data/" + "z" * 40, "/", "control/shutdown"])
TYPES = st.sampled_from(list(XsType) + [99])


@st.composite
def requests(draw):
    t = draw(TYPES)
    parts = [p.encode() for p in draw(st.lists(PATHS | st.text("rbn0123456789", max_size=4),
                                               max_size=3))]
    payload = b"".join(p + b"\0" for p in parts)
    if draw(st.booleans()):
        payload += draw(st.binary(max_size=300))
    tx = draw(st.sampled_from([0, 0, 1, 2, 3, 7]))
    return msg(t, payload, req_id=draw(st.integers(0, 9)), tx_id=tx)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(requests(), st.booleans()), max_size=40))
def test_request_storms(reqs):
    g = make()
    for data, read_replies in reqs:
        while data:
            n = g.send_raw(data)
            data = data[n:]
            res = g.process()
            check_bounds(g, res.produced)
            assert not res.broken                   # well-formed framing never breaks
            if n == 0:
                g.pump()
        if read_replies:
            g.pump()
        check_bounds(g)
    g.pump()
    assert all(p != b"EIO\0" for _, p in g.replies.values())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "mkdir", "rm", "read"]),
                          st.sampled_from(["/m", "/m/a", "/m/a/b", "/m/c", "/m/a/d"]),
                          st.binary(max_size=8)), max_size=30))
def test_tree_matches_a_model(ops):
    s = XenstoreServer(3, BytesPage(), lambda: None)
    model: dict[str, bytes] = {}

    def parents(p: str) -> list[str]:
        out = []
        while p.count("/") > 1:
            p = p.rsplit("/", 1)[0]
            out.append(p)
        return out

    for op, path, value in ops:
        if op == "write":
            s.write(path, value)
            model[path] = value
            for q in parents(path):
                model.setdefault(q, b"")
        elif op == "mkdir":
            s.mkdir(path)
            for q in [path] + parents(path):
                model.setdefault(q, b"")
        elif op == "rm":
            parent_there = path.rsplit("/", 1)[0] in model or path.count("/") == 1
            try:
                s.rm(path)
                assert path in model or parent_there
            except NotFound:
                assert path not in model and not parent_there
            for q in [q for q in model if q == path or q.startswith(path + "/")]:
                del model[q]
        else:
            try:
                assert s.read(path) == model[path]
            except NotFound:
                assert path not in model
        for q in model:
            assert s.read(q) == model[q]
        listing = s.ls("/m")["children"] if "/m" in model else {}
        assert set(listing) == {q.split("/")[2] for q in model if q.count("/") == 2}
