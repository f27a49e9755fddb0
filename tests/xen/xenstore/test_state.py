"""Save -> load -> compare, through the snapshot codec; a bad state changes nothing."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from tests.xen.xenstore.helpers import Guest, msg, z
from xend_lite.errors import SnapshotError
from xend_lite.snapshot.state import decode_state, encode_state, registered_states
from xend_lite.xen.xenstore.protocol import XsType
from xend_lite.xen.xenstore.state import (NodeData, OutRecord, WatchRecord, XenstoreState, capture,
                                           restore)
from xend_lite.xen.xenstore.toolstack import DomainInfo


def busy_guest() -> Guest:
    """A guest mid-conversation: watches, two open transactions, half a request read,
    and replies and events waiting because it has not read its ring."""
    g = Guest(5)
    g.server.write_domain_tree(DomainInfo("guest", 65536, vcpus=2))
    g.write("data/a", b"\x00binary\xff")
    g.set_perms("data/a", "n5", "r0", "b7")
    g.watch("data", "w1")
    g.watch("/local/domain/5/control", "w2")
    t1 = g.start()
    g.write("data/t1/x", "in tx", tx=t1)
    g.rm("data/a", tx=t1)
    t2 = g.start()
    g.read("name", tx=t2)
    g.take_events()
    g.server.write("data/big", b"B" * 2000)       # fills the ring: replies/events queue
    g.send_raw(msg(XsType.READ, z("data/big"), req_id=500))
    g.send_raw(msg(XsType.READ, z("data/big"), req_id=501))
    g.send_raw(msg(XsType.READ, z("name"), req_id=502)[:11])
    g.process()
    assert g.server.out and g.server.reader.partial() and g.server.out_offset
    g.t1, g.t2 = t1, t2
    return g


def clone(g: Guest) -> Guest:
    """A second server loaded from the first one's state through the codec, on a copy of
    its page (the page is guest memory, saved with RAM)."""
    state = capture(g.server)
    raw = encode_state(state)
    back = decode_state(XenstoreState, "xenstore", XenstoreState.VERSION, raw)
    assert back == state
    h = Guest(g.domid)
    h.page.buf[:] = g.page.buf
    h.next_id, h.rx = g.next_id, bytearray(g.rx)        # the guest's side, as it was
    restore(h.server, back)
    assert capture(h.server) == state
    return h


def test_registered():
    assert registered_states()["xenstore"] is XenstoreState


def test_save_load_compare_and_carry_on_alike():
    g = busy_guest()
    h = clone(g)
    h.t1, h.t2 = g.t1, g.t2
    for x in (g, h):
        x.send_raw(msg(XsType.READ, z("name"), req_id=502)[11:])
        x.pump()
        assert x.replies[500][1] == x.replies[501][1] == b"B" * 2000
        assert x.replies[502] == (XsType.READ, b"guest")
        x.end(x.t2)
        # t1 wrote below data/, which data/big changed since: a conflict either way
        assert x.error(XsType.TRANSACTION_END, z("T"), tx=x.t1) == "EAGAIN"
        assert x.error(XsType.READ, z("data/t1/x")) == "ENOENT"
        x.server.write("data/z", "1")
    assert sorted(g.take_events()) == sorted(h.take_events())
    assert capture(g.server) == capture(h.server)
    assert g.page.buf == h.page.buf


def test_conflict_detection_survives_a_restore():
    g = Guest(5)
    g.server.write_domain_tree(DomainInfo("guest", 65536))
    g.write("data/x", "1")
    t = g.start()
    g.read("data/x", tx=t)
    h = clone(g)
    h.server.write("data/x", "changed")
    assert h.error(XsType.TRANSACTION_END, z("T"), tx=t) == "EAGAIN"


def test_empty_store_round_trips():
    g = Guest(3)
    assert capture(clone(g).server) == capture(g.server)


def bad_states():
    base = capture(busy_guest().server)

    def change(fn):
        s = copy.deepcopy(base)
        fn(s)
        return s

    home = "/local/domain/5"
    yield "domid", change(lambda s: setattr(s, "domid", 6))
    yield "orphan", change(lambda s: s.nodes.__setitem__("/nowhere/x", NodeData(
        b"", ["n0"], [], 1)))
    yield "missing child", change(lambda s: s.nodes["/tool"].children.append("ghost"))
    yield "repeated child", change(lambda s: s.nodes["/tool"].children.append("xenstored"))
    yield "bad perms", change(lambda s: setattr(s.nodes["/tool"], "perms", ["x0"]))
    yield "no perms", change(lambda s: setattr(s.nodes["/tool"], "perms", []))
    yield "bad path", change(lambda s: s.nodes.__setitem__("/a b", NodeData(b"", ["n0"], [], 1)))
    yield "no root", change(lambda s: s.nodes.pop("/"))
    yield "no special", change(lambda s: s.nodes.pop("@releaseDomain"))
    yield "future gen", change(lambda s: setattr(s.nodes["/tool"], "generation", 10 ** 9))
    yield "huge value", change(lambda s: setattr(s.nodes["/tool"], "value", b"v" * 5000))
    yield "child name", change(lambda s: s.nodes["/"].children.append("a/b"))
    yield "many watches", change(lambda s: s.watches.extend(
        WatchRecord("/x", f"t{i}".encode(), False) for i in range(200)))
    yield "rel watch", change(lambda s: s.watches.append(WatchRecord("/elsewhere", b"t", True)))
    yield "dup watch", change(lambda s: s.watches.append(s.watches[0]))
    yield "nul token", change(lambda s: s.watches.append(WatchRecord(f"{home}/x", b"a\0", False)))
    yield "tx id 0", change(lambda s: setattr(s.transactions[0], "id", 0))
    yield "tx dup", change(lambda s: s.transactions.append(copy.deepcopy(s.transactions[0])))
    yield "tx path", change(lambda s: setattr(s.transactions[0].entries[0], "path", "x//y"))
    yield "tx unmodified differs", change(lambda s: setattr(
        s.transactions[1].entries[0], "node", NodeData(b"other", ["n0"], [], 1)))
    yield "partial too long", change(lambda s: setattr(s, "partial", b"\0" * 5000))
    yield "partial length", change(lambda s: setattr(
        s, "partial", msg(XsType.READ, b"", length=9999)))
    yield "partial complete", change(lambda s: setattr(s, "partial", msg(XsType.READ, b"ab\0")))
    yield "out framing", change(lambda s: s.out.append(OutRecord(True, b"short")))
    yield "out length", change(lambda s: s.out.append(OutRecord(True, msg(2, b"x", length=5))))
    yield "out kind", change(lambda s: s.out.append(OutRecord(True, msg(XsType.WATCH_EVENT,
                                                                       b"a\0b\0"))))
    yield "out offset", change(lambda s: setattr(s, "out_offset", 10 ** 6))
    yield "many replies", change(lambda s: s.out.extend(
        OutRecord(True, msg(XsType.READ, b"")) for _ in range(30)))
    yield "broken code", change(lambda s: setattr(s, "broken", 9))
    yield "generation", change(lambda s: setattr(s, "generation", 0))


@pytest.mark.parametrize("what,state", list(bad_states()), ids=lambda v: v if
                         isinstance(v, str) else "")
def test_a_bad_state_is_refused_and_changes_nothing(what, state):
    g = busy_guest()
    before = capture(g.server)
    with pytest.raises(SnapshotError):
        restore(g.server, state)
    assert capture(g.server) == before


def test_fields_are_plain_data():
    state = capture(busy_guest().server)
    for f in dataclasses.fields(state):
        assert f.name in ("domid", "generation", "nodes", "watches", "transactions", "next_tx",
                          "partial", "out", "out_offset", "events_dropped", "broken")
    encode_state(state)                  # the snapshot codec's type checks accept it
