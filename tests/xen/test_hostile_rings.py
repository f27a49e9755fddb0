"""Hostile guests against the console and xenstore backends, through a real guest's rings and
event channels (guests/ringclient64.S): broken console indices, a xenstore request larger
than the ring and one larger than xenstore allows, broken xenstore indices, unterminated
strings, 10,000 watches and transactions never ended. After each the domain keeps serving
(a xenstore read through the ring is answered, a console line reaches the sink) and what
the daemon holds for the guest stays within its bounds.

The server's own unit tests (tests/xen/xenstore) cover the protocol; these check the path a
guest uses: the ring page, EVTCHNOP_send reaching the backend, the 50 ms safety net.
"""

from __future__ import annotations

import struct
import time

import pytest

from xend_lite.errors import InvalidArgument
from xend_lite.xen.console import MAX_PENDING_INPUT
from xend_lite.xen.console_ring import IN_SIZE
from xend_lite.xen.xenstore.protocol import HEADER_SIZE, PAYLOAD_MAX, XsType
from xend_lite.xen.xenstore.ring import ERROR_PROTO, ERROR_RINGIDX

from .ringclient import (
    CO_IN_CONS,
    CO_IN_PROD,
    CO_OUT_CONS,
    CO_OUT_PROD,
    POKE32,
    SEND_CONSOLE,
    SEND_STORE,
    WAIT32,
    XS_CONNECTION,
    XS_ERROR,
    XS_REQ_CONS,
    XS_REQ_PROD,
    RingGuest,
    xs_msg,
)

pytestmark = pytest.mark.kvm

POLL_WAIT = 0.15        # three rounds of the 50 ms safety net
_next_id = iter(range(50_000, 1 << 31))


@pytest.fixture
def guest(ring_guest):
    return ring_guest()


def u32(g: RingGuest, gpa: int) -> int:
    return struct.unpack("<I", g.mem.read(gpa, 4))[0]


def assert_serving(g: RingGuest) -> None:
    """The domain still answers xenstore through the ring and takes console output, and
    nothing the daemon keeps for the guest has grown past its bound."""
    assert g.ask(XsType.READ, b"domid", req_id=next(_next_id)) == (XsType.READ, b"1")
    mark = b"still serving %d\n" % next(_next_id)
    g.console_write(mark)
    g.wait(lambda: mark in g.machine.console.tail(4096), 5, "the console line")
    srv = g.xen.xenstore.server
    q = srv.quotas
    assert len(srv.out) <= q.outstanding + q.queued_events
    assert len(srv.reader.partial()) <= HEADER_SIZE + PAYLOAD_MAX
    assert len(srv.conn.watches) <= q.watches
    assert len(srv.conn.transactions) <= q.transactions
    assert g.xen.console.pending_input() <= MAX_PENDING_INPUT
    assert g.xen.internal_errors == 0 and g.machine.status is None


def test_console_indices_out_of_range(guest):
    g = guest
    cons = g.console_gpa
    assert_serving(g)
    before = g.machine.console.total
    out_cons, in_cons = u32(g, cons + CO_OUT_CONS), u32(g, cons + CO_IN_CONS)
    # the producer a whole ring and more ahead of the consumer, and one behind it
    for bad in (out_cons + 5000, out_cons - 1, out_cons + 0x8000_0000):
        g.run((POKE32, cons + CO_OUT_PROD, bad & 0xFFFF_FFFF), (SEND_CONSOLE,))
        time.sleep(POLL_WAIT)
        assert g.machine.console.total == before, "bytes read through broken indices"
        assert g.xen.console.ring.broken
        assert u32(g, cons + CO_OUT_CONS) == out_cons       # nothing consumed
    # input meets an in ring whose producer is far past its consumer: it waits, bounded
    g.run((POKE32, cons + CO_IN_PROD, (in_cons + 0x10000) & 0xFFFF_FFFF))
    assert g.xen.console.write_input(b"k" * 5000) == 5000
    time.sleep(POLL_WAIT)
    assert g.xen.console.pending_input() == 5000
    assert u32(g, cons + CO_IN_PROD) == (in_cons + 0x10000) & 0xFFFF_FFFF
    taken = g.xen.console.write_input(b"k" * (2 * MAX_PENDING_INPUT))
    assert taken == MAX_PENDING_INPUT - 5000
    with pytest.raises(InvalidArgument, match="input queue full"):
        g.xen.console.write_input(b"k")
    # the guest puts its indices right: output flows, and a ring's worth of input arrives
    g.run((POKE32, cons + CO_OUT_PROD, out_cons), (POKE32, cons + CO_IN_PROD, in_cons),
          (SEND_CONSOLE,))
    g.wait(lambda: u32(g, cons + CO_IN_PROD) - in_cons == IN_SIZE, 5, "input in the ring")
    assert g.xen.console.pending_input() == MAX_PENDING_INPUT - IN_SIZE
    assert_serving(g)
    assert not g.xen.console.ring.broken


def test_xenstore_request_larger_than_the_ring(guest):
    """Requests of 2 and 3 KiB cross the 1024-byte request ring in pieces and are taken
    whole (the larger one is over the node size quota), and a 1.9 KiB value read back
    crosses the reply ring in pieces."""
    g = guest
    value = (bytes(range(1, 256)) * 12)[:1900]
    g.xs_send(xs_msg(XsType.WRITE, raw=b"data/big\0" + (value * 2)[:3000], req_id=1)
              + xs_msg(XsType.WRITE, raw=b"data/big\0" + value, req_id=2))
    g.wait(lambda: 2 in g.answers(), 10, "the writes' replies")
    assert g.answers()[1] == (XsType.ERROR, b"ENOSPC\0")
    assert g.answers()[2] == (XsType.WRITE, b"OK\0")
    assert g.ask(XsType.READ, b"data/big", req_id=3) == (XsType.READ, value)
    assert_serving(g)


@pytest.mark.parametrize("how", ["payload over 4096", "request indices", "reply indices"])
def test_a_broken_xenstore_ring_stops_being_served_until_the_guest_reconnects(guest, how):
    g = guest
    store = g.store_gpa
    assert_serving(g)
    served = g.xen.xenstore.server.breaks
    if how == "payload over 4096":
        # a header that claims 64 KiB: refused at the header, nothing of it is buffered
        g.xs_send(xs_msg(XsType.WRITE, raw=b"data/x\0", length=0x10000, req_id=3))
        code = ERROR_PROTO
    elif how == "request indices":
        cons = u32(g, store + XS_REQ_CONS)
        g.run((POKE32, store + XS_REQ_PROD, cons + 5000), (SEND_STORE,))
        code = ERROR_RINGIDX
    else:
        g.run((POKE32, store + XS_REQ_PROD + 8, u32(g, store + XS_REQ_PROD + 4) + 3000),
              (SEND_STORE,))
        g.xs_send(xs_msg(XsType.READ, b"name", req_id=3))
        code = ERROR_RINGIDX
    g.wait(lambda: u32(g, store + XS_ERROR) == code, 5, "the ring's error field")
    srv = g.xen.xenstore.server
    assert srv.broken == code and srv.breaks == served + 1
    assert len(srv.reader.partial()) <= HEADER_SIZE and not srv.out
    # not served while broken, by event or by the safety net
    req = u32(g, store + XS_REQ_CONS)
    g.mem.write(store + XS_REQ_PROD, struct.pack("<I", req + 16))
    g.run((SEND_STORE,))
    time.sleep(POLL_WAIT)
    assert u32(g, store + XS_REQ_CONS) == req
    # the guest asks to reconnect; the server empties the ring, clears the error, serves
    g.run((POKE32, store + XS_CONNECTION, 1), (SEND_STORE,), (WAIT32, store + XS_CONNECTION, 0))
    assert u32(g, store + XS_ERROR) == 0 and srv.broken == 0
    assert_serving(g)


def test_unterminated_strings_get_einval(guest):
    g = guest
    cases = [(XsType.READ, b"name"),                    # no NUL at all
             (XsType.WRITE, b"data/x"),                 # the path never ends
             (XsType.DIRECTORY, b"data\0junk"),         # bytes after the last NUL
             (XsType.WATCH, b"data\0token"),            # the token never ends
             (XsType.MKDIR, b""),                       # nothing at all
             (XsType.GET_PERMS, b"\0\0")]               # two strings where one is wanted
    blob = b"".join(xs_msg(t, raw=raw, req_id=10 + i) for i, (t, raw) in enumerate(cases))
    g.xs_send(blob)
    g.wait(lambda: all(10 + i in g.answers() for i in range(len(cases))), 10, "the replies")
    got = g.answers()
    for i in range(len(cases)):
        assert got[10 + i] == (XsType.ERROR, b"EINVAL\0"), cases[i]
    assert_serving(g)


def test_ten_thousand_watches(guest):
    """Each watch is answered; past the quota with E2BIG. Events fire once for each watch
    that was set, and the daemon holds no more than the quota of watches."""
    g = guest
    n = 10_000
    blob = b"".join(xs_msg(XsType.WATCH, b"data/w", b"t%05d" % i, req_id=100 + i)
                    for i in range(n))
    t0 = time.monotonic()
    g.xs_send(blob, timeout=60)
    assert g.ask(XsType.READ, b"domid", req_id=99, timeout=30) == (XsType.READ, b"1")
    took = time.monotonic() - t0
    replies = g.replies()
    answers = {rid: (t, p) for t, rid, _tx, p in replies if t != XsType.WATCH_EVENT}
    quota = g.xen.xenstore.server.quotas.watches
    assert [answers[100 + i] for i in range(n)] == \
        [(XsType.WATCH, b"OK\0")] * quota + [(XsType.ERROR, b"E2BIG\0")] * (n - quota)
    events = [p for t, _r, _x, p in replies if t == XsType.WATCH_EVENT]
    assert sorted(events) == sorted(b"data/w\0t%05d\0" % i for i in range(quota))
    assert len(g.xen.xenstore.server.conn.watches) == quota
    assert took < 30, f"10,000 watches took {took:.1f} s"
    assert_serving(g)


def test_transactions_never_ended(guest):
    """Open transactions are bounded by the quota, each by its node quota; the guest's
    other requests go on being answered while they stay open."""
    g = guest
    q = g.xen.xenstore.server.quotas
    starts = b"".join(xs_msg(XsType.TRANSACTION_START, b"", req_id=200 + i)
                      for i in range(q.transactions + 1))
    g.xs_send(starts)
    g.wait(lambda: 200 + q.transactions in g.answers(), 10, "the transaction replies")
    got = g.answers()
    tx_ids = [int(got[200 + i][1].rstrip(b"\0")) for i in range(q.transactions)]
    assert all(got[200 + i][0] == XsType.TRANSACTION_START for i in range(q.transactions))
    assert got[200 + q.transactions] == (XsType.ERROR, b"ENOSPC\0")
    # fill one transaction past its node quota; it stays open, nothing reaches the store
    writes = 1100
    blob = b"".join(xs_msg(XsType.WRITE, raw=b"data/t%04d\0v" % i, req_id=1000 + i,
                           tx_id=tx_ids[0]) for i in range(writes))
    g.xs_send(blob, timeout=30)
    g.wait(lambda: 1000 + writes - 1 in g.answers(), 30, "the writes' replies")
    got = g.answers()
    kinds = {got[1000 + i] for i in range(writes)}
    assert kinds <= {(XsType.WRITE, b"OK\0"), (XsType.ERROR, b"ENOSPC\0"),
                     (XsType.ERROR, b"EQUOTA\0")}
    assert (XsType.ERROR, b"ENOSPC\0") in kinds or (XsType.ERROR, b"EQUOTA\0") in kinds
    srv = g.xen.xenstore.server
    assert len(srv.conn.transactions) == q.transactions
    assert all(len(t.nodes) <= q.transaction_nodes for t in srv.conn.transactions.values())
    assert srv.store.get("/local/domain/1/data/t0000") is None
    # outside the transactions the guest's writes land at once
    assert g.ask(XsType.WRITE, b"data/outside", b"yes", req_id=5000)[0] == XsType.WRITE
    assert srv.store.get("/local/domain/1/data/outside") is not None
    assert_serving(g)
