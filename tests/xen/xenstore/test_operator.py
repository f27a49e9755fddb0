"""The operator API (domain 0 acting as toolstack) and the toolstack's domain tree."""

from __future__ import annotations

import pytest

from tests.xen.xenstore.helpers import Guest, z
from xend_lite.errors import InvalidArgument, NotFound
from xend_lite.xen.page import BytesPage
from xend_lite.xen.xenstore.protocol import XsType
from xend_lite.xen.xenstore.server import XenstoreServer, escape
from xend_lite.xen.xenstore.toolstack import CONSOLE_LIMIT, DomainInfo

HOME = "/local/domain/5"


def test_read_write_mkdir_rm(guest):
    s = guest.server
    s.write("/a/b", "text")
    s.write("/a/c", b"\x00\x01")
    assert s.read("/a/b") == b"text" and s.read("/a/c") == b"\x00\x01"
    s.mkdir("/a/d/e")
    assert s.read("/a/d/e") == b""
    s.rm("/a")
    with pytest.raises(NotFound, match="ENOENT"):
        s.read("/a/b")
    s.write("data/rel", "relative to the guest's home")
    assert s.read(f"{HOME}/data/rel").startswith(b"relative")


def test_operator_errors_are_clear(guest):
    s = guest.server
    with pytest.raises(NotFound):
        s.read("/missing")
    with pytest.raises(NotFound):
        s.rm("/missing/deeper")
    for bad in ("", "/a/", "/a//b", "/a b", "/ü", "x" * 4000, "@releaseDomain"):
        with pytest.raises(InvalidArgument):
            s.read(bad)
    with pytest.raises(InvalidArgument):
        s.read(5)                                        # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        s.write("/v", 5)                                 # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        s.write("/v", b"x" * 5000)
    for perms in (["q1"], [], "r1", [1], ["r1"] * 300):
        with pytest.raises(InvalidArgument):
            s.set_perms("/tool", perms)                  # type: ignore[arg-type]
    assert s.get_perms("/tool") == ["n0"]


def test_operator_changes_fire_guest_watches_at_once(guest):
    guest.watch("control", "c")
    guest.take_events()
    n = guest.notified
    guest.server.write("control/shutdown", "reboot")
    assert guest.notified == n + 1                       # the event went out and was signalled
    assert guest.take_events() == [(b"control/shutdown", b"c")]


def test_ls(guest):
    s = guest.server
    s.write("/t/x", b"a\\b\n\xff")
    s.write("/t/y/z", "")
    s.set_perms("/t/y", ["n0", "r5"])
    tree = s.ls("/t")
    assert tree == {"value": "", "perms": ["n0"], "children": {
        "x": {"value": "a\\\\b\\x0a\\xff", "perms": ["n0"], "children": {}},
        "y": {"value": "", "perms": ["n0", "r5"], "children": {
            "z": {"value": "", "perms": ["n0"], "children": {}}}}}}
    whole = s.ls()
    assert "local" in whole["children"] and "tool" in whole["children"]
    with pytest.raises(NotFound):
        s.ls("/nope")
    assert escape(bytes(range(0x1e, 0x22))) == "\\x1e\\x1f !"


def test_ls_of_a_deep_tree():
    s = XenstoreServer(3, BytesPage(), lambda: None)
    deep = "/" + "/".join(["d"] * 1500)                  # deeper than Python's recursion
    s.write(deep, "bottom")
    t = s.ls("/d")
    for _ in range(1499):
        t = t["children"]["d"]
    assert t["value"] == "bottom"


def test_domain_tree_like_libxl(guest):
    s = guest.server
    assert s.read(f"{HOME}/name") == b"guest" and s.read(f"{HOME}/domid") == b"5"
    vm = s.read(f"{HOME}/vm").decode()
    assert vm.startswith("/vm/") and s.read(f"{vm}/name") == b"guest"
    assert s.read(f"{vm}/uuid").decode() == vm[4:]
    assert s.read(f"{HOME}/memory/static-max") == b"131072"
    assert s.read(f"{HOME}/memory/target") == b"131072"
    assert s.read(f"{HOME}/cpu/1/availability") == b"online"
    assert s.read(f"{HOME}/store/port") == b"1"
    assert s.read(f"{HOME}/store/ring-ref") == str(0xFEFFF).encode()
    assert s.read(f"{HOME}/console/ring-ref") == str(0xFEFFE).encode()
    assert s.read(f"{HOME}/console/port") == b"2"
    assert s.read(f"{HOME}/console/type") == b"xenconsoled"
    assert s.read(f"{HOME}/console/limit") == str(CONSOLE_LIMIT).encode()
    assert s.read(f"{HOME}/control/platform-feature-xs_reset_watches") == b"1"
    # permissions as libxl gives them
    assert s.get_perms(HOME) == ["n0", "r5"]
    assert s.get_perms(f"{HOME}/control") == ["n0", "r5"]
    assert s.get_perms(f"{HOME}/control/shutdown") == ["n5"]
    assert s.get_perms(f"{HOME}/console") == ["n5", "r0"]
    assert s.get_perms(f"{HOME}/console/ring-ref") == ["n0", "r5"]
    assert s.get_perms(f"{HOME}/data") == ["n5"]
    assert s.get_perms(vm) == ["n0", "r5"]
    # and so the guest may do what a Linux guest does there, and no more
    guest.write("control/feature-poweroff", "1")
    guest.write("control/shutdown", "")
    assert guest.error(XsType.WRITE, z("control/platform-feature-xs_reset_watches") + b"0") \
        == "EACCES"
    assert guest.error(XsType.WRITE, z("console/ring-ref") + b"1") == "EACCES"
    assert guest.read("console/ring-ref") == str(0xFEFFE).encode()
    assert guest.error(XsType.WRITE, z("memory/target") + b"1") == "EACCES"
    assert guest.error(XsType.READ, z("/local/domain/0")) == "EACCES"
    # the guest owns ten nodes of control/ and its own directories, and two of console/
    assert s.store.counts.get(5, 0) == 12


def test_domain_tree_again_replaces_the_old_one(guest):
    guest.server.write("data/leftover", "x")
    guest.server.write_domain_tree(DomainInfo("renamed", 4096, vcpus=1))
    with pytest.raises(NotFound):
        guest.server.read("data/leftover")
    assert guest.server.read("name") == b"renamed"
    with pytest.raises(NotFound):
        guest.server.read("console/port")                # not given this time


def test_domain_info_is_checked():
    for kw in ({"name": ""}, {"name": "a\nb"}, {"name": "n", "memory_kib": -1},
               {"name": "n", "vcpus": 0}, {"name": "n", "uuid": "nope"},
               {"name": "n", "console_port": 1 << 40}, {"name": "n", "memory_kib": True}):
        kw.setdefault("memory_kib", 1024)
        with pytest.raises(InvalidArgument):
            DomainInfo(**kw)


def test_reset_drops_watches_transactions_and_queues(guest):
    guest.watch("data", "w")
    t = guest.start()
    guest.send_raw(b"\x02\x00")                          # half a header
    guest.process()
    guest.server.reset()
    assert guest.server.conn.watches == {} and guest.server.conn.transactions == {}
    assert guest.server.reader.partial() == b"" and not guest.server.out
    assert guest.server.read("name") == b"guest"         # the tree stays
    del t


def test_server_refuses_a_bad_domid():
    for domid in (0, -1, 0x7FF0, 70000, "5"):
        with pytest.raises(InvalidArgument):
            XenstoreServer(domid, BytesPage(), lambda: None)   # type: ignore[arg-type]


def test_guest_fixture_shape():
    g = Guest(9)
    g.server.write_domain_tree(DomainInfo("other", 2048))
    assert g.read("domid") == b"9"
