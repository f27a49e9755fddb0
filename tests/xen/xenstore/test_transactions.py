"""Transactions: a private view, committed only when nothing it touched has changed."""

from __future__ import annotations

from tests.xen.xenstore.helpers import z
from xend_lite.xen.xenstore.protocol import XsType


def test_commit_applies_and_fires_once_committed(guest):
    guest.watch("data", "w")
    assert guest.take_events() == [(b"data", b"w")]
    t = guest.start()
    guest.write("data/a", "1", tx=t)
    guest.write("data/b/c", "2", tx=t)
    assert guest.read("data/a", tx=t) == b"1"                  # sees its own writes
    assert guest.error(XsType.READ, z("data/a")) == "ENOENT"   # others do not
    assert guest.take_events() == []
    guest.end(t)
    assert guest.read("data/a") == b"1" and guest.read("data/b/c") == b"2"
    assert sorted(guest.take_events()) == [(b"data/a", b"w"), (b"data/b/c", b"w")]
    assert guest.server.conn.transactions == {}


def test_abort_discards(guest):
    before = dict(guest.server.store.nodes)
    t = guest.start()
    guest.write("data/a", "1", tx=t)
    guest.rm("data", tx=t)
    guest.end(t, commit=False)
    assert guest.server.store.nodes == before
    assert guest.error(XsType.READ, z("data/a"), tx=t) == "ENOENT"   # the id is gone


def test_conflicting_write_gets_eagain_and_changes_nothing(guest):
    guest.write("data/x", "old")
    t = guest.start()
    assert guest.read("data/x", tx=t) == b"old"
    guest.write("data/y", "from tx", tx=t)
    guest.server.write("data/x", "changed")          # the toolstack changes what it read
    before = dict(guest.server.store.nodes)
    assert guest.error(XsType.TRANSACTION_END, z("T"), tx=t) == "EAGAIN"
    assert guest.server.store.nodes == before
    assert guest.server.conn.transactions == {}      # ended: the guest retries with a new one
    t = guest.start()
    guest.read("data/x", tx=t)
    guest.write("data/y", "from tx", tx=t)
    guest.end(t)
    assert guest.read("data/y") == b"from tx"


def test_conflicts_on_removal_and_creation(guest):
    guest.write("data/gone", "1")
    t = guest.start()
    guest.read("data/gone", tx=t)
    guest.server.rm("data/gone")
    assert guest.error(XsType.TRANSACTION_END, z("T"), tx=t) == "EAGAIN"

    t = guest.start()
    assert guest.error(XsType.READ, z("data/new"), tx=t) == "ENOENT"
    guest.server.write("data/new", "made meanwhile")
    assert guest.error(XsType.TRANSACTION_END, z("T"), tx=t) == "EAGAIN"

    # a child added below a directory the transaction wrote into
    t = guest.start()
    guest.write("data/dir/a", "1", tx=t)
    guest.server.write("data/dir2", "x")             # changes data's child list
    assert guest.error(XsType.TRANSACTION_END, z("T"), tx=t) == "EAGAIN"
    assert guest.error(XsType.READ, z("data/dir/a")) == "ENOENT"


def test_unrelated_changes_do_not_conflict(guest):
    guest.write("data/mine", "1")
    t = guest.start()
    guest.read("data/mine", tx=t)
    guest.write("data/mine", "2", tx=t)
    guest.server.write("/local/domain/5/attr/other", "x")   # elsewhere
    guest.end(t)
    assert guest.read("data/mine") == b"2"


def test_two_transactions_first_commit_wins(guest):
    guest.write("data/a", "0")
    guest.write("data/b", "0")
    t1, t2 = guest.start(), guest.start()
    assert t1 != t2
    guest.read("data/a", tx=t1)
    guest.read("data/b", tx=t2)
    guest.write("data/b", "1", tx=t1)
    guest.write("data/a", "2", tx=t2)
    guest.end(t1)
    assert guest.error(XsType.TRANSACTION_END, z("T"), tx=t2) == "EAGAIN"
    assert (guest.read("data/a"), guest.read("data/b")) == (b"0", b"1")


def test_transaction_errors(guest):
    t = guest.start()
    assert guest.error(XsType.TRANSACTION_START, b"\0", tx=t) == "EBUSY"
    assert guest.error(XsType.TRANSACTION_END, z("maybe"), tx=t) == "EINVAL"
    assert t in guest.server.conn.transactions        # a bad end leaves it open
    guest.end(t, commit=False)


def test_rm_in_transaction(guest):
    guest.write("data/t/a", "1")
    guest.watch("data/t/a", "exact")
    guest.take_events()
    t = guest.start()
    guest.rm("data/t", tx=t)
    assert guest.error(XsType.READ, z("data/t/a"), tx=t) == "ENOENT"
    assert guest.read("data/t/a") == b"1"
    guest.end(t)
    assert guest.error(XsType.READ, z("data/t/a")) == "ENOENT"
    assert guest.take_events() == [(b"data/t/a", b"exact")]


def test_reset_watches_drops_transactions(guest):
    t = guest.start()
    guest.write("data/a", "1", tx=t)
    assert guest.call(XsType.RESET_WATCHES, b"\0") == b"OK\0"
    assert guest.error(XsType.TRANSACTION_END, z("T"), tx=t) == "ENOENT"
    assert guest.error(XsType.READ, z("data/a")) == "ENOENT"


def test_ids_are_not_reused_while_open(guest):
    ids = [guest.start() for _ in range(5)]
    guest.end(ids[2], commit=False)
    more = [guest.start() for _ in range(3)]
    assert len(set(ids + more)) == 8 and 0 not in ids + more
