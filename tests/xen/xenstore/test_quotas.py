"""Quotas: a request that would exceed one fails whole, with xenstored's errno, and
changes nothing."""

from __future__ import annotations

import pytest

from tests.xen.xenstore.helpers import Guest, XsFailed, msg, z
from xend_lite.xen.xenstore.protocol import XsType
from xend_lite.xen.xenstore.store import Quotas
from xend_lite.xen.xenstore.toolstack import DomainInfo


def small(**kw) -> Guest:
    g = Guest(5, Quotas(**kw))
    g.server.write_domain_tree(DomainInfo("guest", 65536))
    return g


def frozen(g: Guest):
    s, c = g.server.store, g.server.conn
    return (dict(s.nodes), dict(s.counts), s.generation, dict(c.watches),
            {i: (dict(t.nodes), dict(t.modified)) for i, t in c.transactions.items()})


def refused(g: Guest, t: int, payload: bytes, name: str, tx: int = 0) -> None:
    before = frozen(g)
    assert g.error(t, payload, tx) == name
    assert frozen(g) == before


def test_node_quota_default_1000(guest):
    have = guest.server.store.counts.get(5, 0)
    limit = guest.server.quotas.nodes
    made = 0
    while made < limit - have - 1:          # 20 per directory: a node's child list is bounded
        guest.write(f"data/d{made // 21}" if made % 21 == 0 else
                    f"data/d{made // 21}/n{made % 21}", "")
        made += 1
    assert guest.server.store.counts[5] == limit - 1
    # three new nodes with one place left: none is made
    refused(guest, XsType.WRITE, z("data/a/b/c") + b"v", "ENOSPC")
    refused(guest, XsType.MKDIR, z("data/a/b"), "ENOSPC")
    guest.write("data/last", "")
    assert guest.server.store.counts[5] == limit
    refused(guest, XsType.WRITE, z("data/more") + b"", "ENOSPC")
    guest.write("data/last", "rewriting is fine")
    guest.rm("data/d0/n1")
    guest.write("data/again", "")                     # freed one


def test_node_quota_inside_a_transaction_and_at_commit():
    g = small(nodes=14)
    have = g.server.store.counts[5]
    t = g.start()
    for i in range(14 - have):
        g.write(f"data/t{i}", "", tx=t)
    refused(g, XsType.WRITE, z("data/over") + b"", "ENOSPC", tx=t)
    g.end(t, commit=False)
    # filled outside while a transaction holds new nodes: the commit is ENOSPC
    t = g.start()
    g.write("data/in-tx", "", tx=t)
    for i in range(14 - have):
        g.write(f"attr/o{i}", "")
    before = frozen(g)
    assert g.error(XsType.TRANSACTION_END, z("T"), tx=t) == "ENOSPC"
    assert frozen(g)[:3] == before[:3]


def test_node_size(guest):
    limit = guest.server.quotas.node_size
    # 16-byte header, 8 bytes per permission (data/x has one), then the value
    guest.write("data/x", b"v" * (limit - 16 - 8))
    refused(guest, XsType.WRITE, z("data/x") + b"v" * (limit - 16 - 8 + 1), "ENOSPC")
    assert len(guest.read("data/x")) == limit - 24
    # a child list that would outgrow its node: 16 + 8 + 8 names of 21 bytes and a NUL
    g = small(node_size=200)
    for i in range(8):
        g.write(f"data/{'c' * 20}{i}", "")
    refused(g, XsType.WRITE, z(f"data/{'c' * 20}X") + b"", "ENOSPC")
    g.rm(f"data/{'c' * 20}0")
    g.write(f"data/{'c' * 20}X", "")


def test_the_toolstack_is_not_held_to_node_size(guest):
    guest.server.write("data/big", b"b" * 4096)
    assert len(guest.read("data/big")) == 4096
    with pytest.raises(Exception, match="E2BIG"):
        guest.server.write("data/bigger", b"b" * 4097)


def test_path_length(guest):
    ok = "data/" + "/".join(["p" * 31] * 64)[:2048 - len("data/")]
    assert len(ok) == 2048 and not ok.endswith("/")
    guest.write(ok, "")
    refused(guest, XsType.WRITE, z(ok + "q") + b"", "EINVAL")
    refused(guest, XsType.WATCH, z(ok + "q", "t"), "EINVAL")


def test_permissions_per_node(guest):
    guest.write("data/p", "")
    guest.set_perms("data/p", "n5", "r1", "r2", "r3", "r4")
    refused(guest, XsType.SET_PERMS, z("data/p", "n5", "r1", "r2", "r3", "r4", "r6"), "ENOSPC")
    assert guest.perms("data/p") == ["n5", "r1", "r2", "r3", "r4"]


def test_watches():
    g = small(watches=3)
    for i in range(3):
        g.watch("data", str(i))
    refused(g, XsType.WATCH, z("data", "x"), "E2BIG")
    g.unwatch("data", "0")
    g.watch("data", "x")


def test_open_transactions():
    g = small(transactions=2)
    a, b = g.start(), g.start()
    refused(g, XsType.TRANSACTION_START, b"\0", "ENOSPC")
    g.end(a, commit=False)
    g.end(g.start(), commit=False)
    g.end(b)


def test_nodes_a_transaction_may_touch():
    g = small(transaction_nodes=8)
    t = g.start()
    g.write("data/a", "1", tx=t)            # touches data/a and data
    for i in range(4):
        g.write(f"data/b{i}", "", tx=t)
    assert len(g.server.conn.transactions[t].nodes) == 6
    refused(g, XsType.WRITE, z("data/c/d/e") + b"", "ENOSPC", tx=t)
    g.write("data/c", "", tx=t)             # 7 ...
    g.read("data/a", tx=t)                  # already touched: free
    g.write("data/e", "", tx=t)             # 8
    refused(g, XsType.READ, z("name"), "ENOSPC", tx=t)
    g.end(t)
    assert g.read("data/e") == b"" and g.read("data/a") == b"1"


def test_never_ended_transactions_stay_bounded():
    q = Quotas(transactions=4, transaction_nodes=50)
    g = Guest(5, q)
    g.server.write_domain_tree(DomainInfo("guest", 65536))
    ids = []
    for _ in range(20):
        try:
            ids.append(g.start())
        except XsFailed as err:
            assert err.name == "ENOSPC"
    assert len(ids) == 4
    for t in ids:
        for i in range(200):
            try:
                g.write(f"data/t{t}/n{i}", "x" * 100, tx=t)
            except XsFailed as err:
                assert err.name == "ENOSPC"
    held = sum(len(t.nodes) for t in g.server.conn.transactions.values())
    assert held <= 4 * 50


def test_outstanding_replies_stop_reading_requests():
    g = small(outstanding=3)
    # requests the guest sends without reading any reply, more than the reply ring holds
    g.server.write("data/big", b"b" * 300)
    reqs = b"".join(msg(XsType.READ, z("data/big"), req_id=i) for i in range(60))
    sent = g.send_raw(reqs)
    g.process()
    # three replies fill the reply ring (1024 bytes), three more wait; the rest of the
    # requests stay in the request ring
    assert g.server.replies == 3
    left = (g.get(2052) - g.get(2048)) % (1 << 32)
    assert 0 < left < sent
    g.pump()                                       # reading replies lets it continue
    reqs = reqs[sent:]
    while reqs:
        n = g.send_raw(reqs)
        reqs = reqs[n:]
        g.pump()
    g.pump()
    assert sorted(g.replies) == list(range(60))
    assert g.server.replies == 0
