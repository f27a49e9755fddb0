"""The ring page: hostile indices and lengths, wrap-around, partial requests, reconnection,
and the cost of a call with nothing to do."""

from __future__ import annotations

import pytest

from tests.xen.xenstore.helpers import (
    CONNECTION,
    ERROR,
    FEATURES,
    REQ_CONS,
    REQ_PROD,
    RSP_CONS,
    RSP_PROD,
    U32,
    Guest,
    msg,
    z,
)
from xend_lite.errors import GuestMemoryError
from xend_lite.xen.page import BytesPage
from xend_lite.xen.xenstore import server as server_mod
from xend_lite.xen.xenstore.protocol import PAYLOAD_MAX, XsType
from xend_lite.xen.xenstore.ring import ERROR_COMM, ERROR_PROTO, ERROR_RINGIDX


class SpyPage(BytesPage):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, int, int]] = []

    def read(self, off: int, n: int) -> bytes:
        self.log.append(("r", off, n))
        return super().read(off, n)

    def write(self, off: int, data: bytes) -> None:
        self.log.append(("w", off, len(data)))
        super().write(off, data)


def spy_guest() -> tuple[Guest, SpyPage]:
    g = Guest(5)
    page = SpyPage()
    page.buf[:] = g.page.buf
    g.page = page
    g.server.ring.page = page
    return g, page


def test_features_are_advertised():
    g = Guest(5)
    g.process()
    assert g.get(FEATURES) == 3          # reconnection and the error field


@pytest.mark.parametrize("cons,prod", [(0, 1025), (10, 9), (0, U32 - 1), (5, 0x8000_0005)])
def test_impossible_request_indices_break_the_connection(cons, prod):
    g, page = spy_guest()
    g.watch("/local/domain/5", "w")
    g.set(REQ_CONS, cons)
    g.set(REQ_PROD, prod)
    page.log.clear()
    n = g.notified
    res = g.process()
    assert res.broken == ERROR_RINGIDX and g.get(ERROR) == ERROR_RINGIDX
    assert g.get(REQ_CONS) == cons                          # nothing consumed
    assert all(off >= 2048 for _, off, _ in page.log)       # nothing read from the rings
    assert g.server.conn.watches == {}                      # the connection's state is gone
    assert g.notified == n + 1                              # the guest may look at ERROR
    # no longer served, even once the indices look fine
    g.set(REQ_CONS, 0)
    g.set(REQ_PROD, 0)
    g.send_raw(msg(XsType.READ, z("name"), req_id=1))
    assert g.process().consumed == 0 and g.get(RSP_PROD) == g.get(RSP_CONS)


def test_impossible_reply_indices_break_the_connection():
    g = Guest(5)
    g.set(RSP_CONS, 100)
    g.set(RSP_PROD, 100 + 2000)
    g.send_raw(msg(XsType.READ, z("/tool"), req_id=1))
    res = g.process()
    assert res.broken == ERROR_RINGIDX
    assert g.get(RSP_PROD) == 2100                          # nothing written


def test_payload_over_the_maximum_breaks_before_reading_it():
    g = Guest(5)
    g.send_raw(msg(XsType.WRITE, b"", req_id=1, length=PAYLOAD_MAX + 1))
    res = g.process()
    assert res.broken == ERROR_PROTO and g.get(ERROR) == ERROR_PROTO
    assert len(g.server.reader.partial()) == 0
    g.send_raw(b"\xff" * 1000)                             # further garbage is not read
    assert g.process().consumed == 0


def test_a_request_larger_than_the_ring_arrives_in_parts():
    g = Guest(5)
    g.server.mkdir("/d")
    g.server.set_perms("/d", ["b5"])
    value = bytes(range(256)) * 7 + b"tail"           # a 1.8-ring request
    g.write("/d/v", value)
    assert g.server.read("/d/v") == value
    # a payload of exactly the maximum is a request like any other (here over quota)
    payload = z("/d/max") + b"m" * (PAYLOAD_MAX - len("/d/max") - 1)
    assert len(payload) == PAYLOAD_MAX
    assert g.error(XsType.WRITE, payload) == "ENOSPC"
    assert not g.server.broken


@pytest.mark.parametrize("start", [0, 1000, U32 - 7, U32 - 1024, 0x7FFF_FFF0])
def test_wrap_around_of_ring_and_indices(start):
    g = Guest(5, start=start)
    g.server.mkdir("/w")
    g.server.set_perms("/w", ["b5"])
    for i in range(300):                               # ~10 times round both rings
        g.write(f"/w/k{i % 7}", f"value-{i}" * (i % 5))
        assert g.read(f"/w/k{i % 7}") == f"value-{i}".encode() * (i % 5)
    assert not g.server.broken


def test_partial_requests_across_calls_byte_by_byte():
    g = Guest(5)
    g.server.write("/p", "value")
    g.server.set_perms("/p", ["r5"])
    data = msg(XsType.READ, z("/p"), req_id=42) + msg(XsType.GET_PERMS, z("/p"), req_id=43)
    for b in data:
        g.send_raw(bytes([b]))
        g.process()
    g.pump()
    assert g.replies[42] == (XsType.READ, b"value")
    assert g.replies[43] == (XsType.GET_PERMS, b"r5\0")


def test_reply_larger_than_the_ring_goes_out_in_parts():
    g = Guest(5)
    g.server.write("/big", b"z" * 4000)
    g.server.set_perms("/big", ["r5"])
    assert g.read("/big") == b"z" * 4000


def test_garbage_types_and_zero_length_messages():
    g = Guest(5)
    for t in (0xFFFF, 12345678, XsType.ERROR, XsType.WATCH_EVENT):
        g.send_raw(msg(t, b"", req_id=t & 0xFFFF))
    g.pump()
    assert all(p == b"ENOSYS\0" for _, p in g.replies.values()) and len(g.replies) == 4
    assert g.error(XsType.READ, b"") == "EINVAL"


def test_reconnection_resets_the_ring_and_the_connection():
    g = Guest(5)
    g.watch("/tool", "t")
    g.set(REQ_PROD, 5000)                                   # broken
    assert g.process().broken
    g.set(CONNECTION, 1)                                    # the guest asks to reconnect
    n = g.notified
    res = g.process()
    assert res.reconnected and not res.broken and g.notified == n + 1
    assert [g.get(o) for o in (REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD)] == [0, 0, 0, 0]
    assert g.get(CONNECTION) == 0 and g.get(ERROR) == 0
    assert g.server.conn.watches == {}
    assert g.call(XsType.GET_DOMAIN_PATH, z("5")) == b"/local/domain/5\0"   # served again


def test_reconnect_drops_half_a_request():
    g = Guest(5)
    g.server.write("/r", "v")
    g.server.set_perms("/r", ["r5"])
    g.send_raw(msg(XsType.READ, z("/r"), req_id=1)[:10])
    g.process()
    assert g.server.reader.partial()
    g.set(CONNECTION, 1)
    g.process()
    assert g.server.reader.partial() == b""
    assert g.read("/r") == b"v"


def test_a_page_that_cannot_be_reached_breaks_the_connection():
    class GonePage(BytesPage):
        def read(self, off: int, n: int) -> bytes:
            raise GuestMemoryError("no memory there", gpa=0xFEFFF000 + off, length=n)

    g = Guest(5)
    g.server.ring.page = GonePage()
    res = g.process()
    assert res.broken == ERROR_COMM
    g.server.write("/x", "operator writes still work")
    assert g.server.read("/x") == b"operator writes still work"


def test_nothing_pending_costs_one_read():
    g, page = spy_guest()
    g.process()                                             # features written once
    page.log.clear()
    n = g.notified
    for _ in range(10):
        res = g.process()
        assert (res.consumed, res.produced, res.requests) == (0, 0, 0)
    assert page.log == [("r", 2048, 28)] * 10
    assert g.notified == n


def test_work_per_call_is_bounded(monkeypatch):
    monkeypatch.setattr(server_mod, "MAX_REQUESTS", 4)
    g = Guest(5)
    g.send_raw(b"".join(msg(XsType.GET_DOMAIN_PATH, z("1"), req_id=i) for i in range(10)))
    res = g.process()
    assert res.requests == 4 and res.again
    g.recv_raw()
    res = g.process()
    assert res.requests == 4 and res.again
    g.recv_raw()
    res = g.process()
    assert res.requests == 2 and not res.again


def test_notify_only_when_something_moved():
    g = Guest(5)
    g.process()
    n = g.notified
    g.process()
    assert g.notified == n
    g.send_raw(msg(XsType.GET_DOMAIN_PATH, z("1"), req_id=1)[:5])
    g.process()
    assert g.notified == n + 1                              # consumed part of a request
