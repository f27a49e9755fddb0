"""Watches: initial fire, what fires for which change, permissions, bounds."""

from __future__ import annotations

import struct

from tests.xen.xenstore.helpers import XsFailed, msg, z
from xend_lite.xen.xenstore.protocol import XsType

HOME = "/local/domain/5"


def test_a_new_watch_fires_once_straight_away(guest):
    guest.watch("control/shutdown", "rel")
    guest.watch(f"{HOME}/control/shutdown", "abs")
    guest.watch("data/not/yet", "missing")              # may watch what does not exist
    guest.watch("@releaseDomain", "special")
    assert guest.take_events() == [(b"control/shutdown", b"rel"),
                                   (f"{HOME}/control/shutdown".encode(), b"abs"),
                                   (b"data/not/yet", b"missing"),
                                   (b"@releaseDomain", b"special")]


def test_the_initial_event_follows_the_reply(guest):
    guest.send_raw(msg(XsType.WATCH, z("data", "tok"), req_id=77))
    guest.server.process()
    raw = guest.recv_raw()
    t1, rid, _, n = struct.unpack_from("<IIII", raw)
    assert (t1, rid, raw[16:16 + n]) == (XsType.WATCH, 77, b"OK\0")
    t2, rid2, _, n2 = struct.unpack_from("<IIII", raw, 16 + n)
    assert (t2, rid2, raw[32 + n:32 + n + n2]) == (XsType.WATCH_EVENT, 0, b"data\0tok\0")


def test_what_fires(guest):
    guest.watch("data/a", "a")
    guest.watch("data", "top")
    guest.take_events()
    guest.write("data/a", "1")
    assert sorted(guest.take_events()) == [(b"data/a", b"a"), (b"data/a", b"top")]
    guest.write("data/a/b/c", "deep")                   # below: both watches fire
    assert sorted(guest.take_events()) == [(b"data/a/b/c", b"a"), (b"data/a/b/c", b"top")]
    guest.write("data/ab", "sibling")                   # a sibling is not below data/a
    assert guest.take_events() == [(b"data/ab", b"top")]
    guest.mkdir("data/a")                               # exists: no change, no event
    guest.set_perms("data/a", "n5", "r0")
    assert sorted(guest.take_events()) == [(b"data/a", b"a"), (b"data/a", b"top")]
    guest.write("attr/x", "elsewhere")
    assert guest.take_events() == []


def test_toolstack_writes_fire_guest_watches(guest):
    guest.watch("control/shutdown", "sd")
    guest.take_events()
    guest.server.write("control/shutdown", "poweroff")
    assert guest.take_events() == [(b"control/shutdown", b"sd")]
    assert guest.read("control/shutdown") == b"poweroff"


def test_rm_fires_exact_watches_on_removed_nodes(guest):
    guest.write("data/t/a/b", "1")
    guest.watch("data/t/a/b", "leaf")
    guest.watch("data/t/a/b/c", "below-leaf")           # does not exist: no event
    guest.watch("data", "top")
    guest.take_events()
    guest.rm("data/t")
    ev = guest.take_events()
    assert (b"data/t/a/b", b"leaf") in ev               # epath is the watch path
    assert (b"data/t", b"top") in ev
    assert all(tok != b"below-leaf" for _, tok in ev)
    # descendants fire exact watches only: "top" sees the removal once, at data/t
    assert [p for p, tok in ev if tok == b"top"] == [b"data/t"]


def test_unwatch_and_duplicates(guest):
    guest.watch("data", "t")
    assert guest.error(XsType.WATCH, z("data", "t")) == "EEXIST"
    guest.watch("data", "t2")                            # another token: another watch
    guest.unwatch("data", "t")
    assert guest.error(XsType.UNWATCH, z("data", "t")) == "ENOENT"
    guest.unwatch(f"{HOME}/data", "t2")                  # same node, spelt absolute
    guest.take_events()
    guest.write("data/q", "1")
    assert guest.take_events() == []


def test_reset_watches(guest):
    for i in range(5):
        guest.watch("data", f"t{i}")
    guest.take_events()
    assert guest.call(XsType.RESET_WATCHES, b"\0") == b"OK\0"
    guest.write("data/z", "1")
    assert guest.take_events() == [] and guest.server.conn.watches == {}


def test_watches_respect_permissions(guest):
    guest.watch("/", "root")
    guest.take_events()
    guest.server.write("/local/domain/0/private", "p")   # the guest cannot read it
    guest.server.write("/vm/x", "v")                      # nor this (/vm is dom0's)
    assert guest.take_events() == []
    guest.server.write("name", "renamed")                 # readable by the guest
    assert guest.take_events() == [(f"{HOME}/name".encode(), b"root")]
    # losing read access still tells the watcher (old permissions count)
    guest.write("data/s", "x")
    guest.take_events()
    guest.server.set_perms("data/s", ["n0"])
    assert guest.take_events() == [(f"{HOME}/data/s".encode(), b"root")]


def test_pending_duplicate_events_are_not_queued_twice(guest):
    guest.watch("data", "w")
    guest.take_events()
    # the guest does not read its ring: once the ring is full, events wait in the queue
    on_ring = 0
    while not guest.server.out:
        guest.server.write("data/x", str(on_ring))
        on_ring += 1
    for i in range(50):
        guest.server.write("data/x", str(i))
    queued = [o for o in guest.server.out if not o.reply]
    assert len(queued) == 1
    assert guest.take_events() == [(b"data/x", b"w")] * on_ring


def test_event_queue_is_bounded_when_the_guest_does_not_read(guest):
    guest.watch("data", "w")
    guest.take_events()
    q = guest.server.quotas.queued_events
    for i in range(q + 100):
        guest.server.write(f"data/n{i}", "")
    waiting = [o for o in guest.server.out if not o.reply]
    assert len(waiting) <= q
    assert guest.server.events_dropped > 0
    total = sum(len(o.data) for o in guest.server.out)
    assert total <= q * (16 + 4096)


def test_watch_quota_bounds_ten_thousand_attempts(guest):
    limit = guest.server.quotas.watches
    ok = refused = 0
    for i in range(10_000):
        try:
            guest.watch("data", f"token-{i}")
            ok += 1
        except XsFailed as err:
            assert err.name == "E2BIG"
            refused += 1
        if i % 200 == 0:
            guest.take_events()
    assert ok == limit and refused == 10_000 - limit
    assert len(guest.server.conn.watches) == limit
    guest.take_events()
    assert len(guest.server.out) == 0


def test_special_watch_never_fires_for_paths(guest):
    guest.watch("@introduceDomain", "i")
    guest.take_events()
    guest.server.write("/x", "1")
    assert guest.take_events() == []
