"""Every request type over the ring, with xenstored's answers and error names."""

from __future__ import annotations

import pytest

from tests.xen.xenstore.helpers import XsFailed, msg, z
from xend_lite.errors import InvalidArgument
from xend_lite.xen.xenstore.protocol import PAYLOAD_MAX, XsType

HOME = "/local/domain/5"


def test_read_write_relative_and_absolute(guest):
    guest.write("data/a", "1")
    assert guest.read(f"{HOME}/data/a") == b"1"
    guest.write(f"{HOME}/data/a", b"\x00bin\xffary\x00")
    assert guest.read("data/a") == b"\x00bin\xffary\x00"       # values are bytes, NULs too
    guest.write("data/empty", b"")
    assert guest.read("data/empty") == b""
    assert guest.read("name") == b"guest" and guest.read("domid") == b"5"


def test_write_creates_parents_the_guest_owns(guest):
    guest.write("data/x/y/z", "deep")
    for p in ("data/x", "data/x/y", "data/x/y/z"):
        assert guest.perms(p) == ["n5"]
    assert guest.read("data/x") == b""
    assert guest.ls("data/x") == [b"y"]


def test_guest_created_node_below_shared_dir_keeps_other_entries(guest):
    guest.server.mkdir("shared")
    guest.server.set_perms("shared", ["r0", "b5", "r7"])
    guest.write("shared/mine", "v")
    assert guest.perms("shared/mine") == ["r5", "b5", "r7"]      # owner becomes the guest


def test_mkdir(guest):
    guest.mkdir("data/d1/d2")
    assert guest.ls("data/d1") == [b"d2"] and guest.read("data/d1/d2") == b""
    guest.write("data/d1/d2", "keep")
    guest.mkdir("data/d1/d2")                                     # exists: left as is
    assert guest.read("data/d1/d2") == b"keep"


def test_rm(guest):
    guest.write("data/t/a/b", "1")
    guest.write("data/t/c", "2")
    guest.rm("data/t")
    assert guest.error(XsType.READ, z("data/t/c")) == "ENOENT"
    assert b"t" not in guest.ls("data")
    guest.rm("data/t")                                            # gone, parent exists: OK
    assert guest.error(XsType.RM, z("data/nope/deeper")) == "ENOENT"
    assert guest.error(XsType.RM, z("/")) == "EACCES"            # the root is dom0's


def test_rm_root_refused_to_the_operator(guest):
    with pytest.raises(InvalidArgument, match="EINVAL"):
        guest.server.rm("/")
    assert guest.server.store.get("/") is not None
    with pytest.raises(InvalidArgument):
        guest.server.rm("@releaseDomain")                 # not a path rm accepts


def test_directory_lists_children_in_creation_order(guest):
    for n in ("c", "a", "b"):
        guest.write(f"data/dir/{n}", "")
    assert guest.ls("data/dir") == [b"c", b"a", b"b"]
    assert guest.ls("data/dir/a") == []


def test_directory_part_pages_a_long_listing(guest):
    names = [f"child-number-{i:05d}" for i in range(400)]     # ~8 KiB of names
    for n in names:
        guest.server.write(f"/big/{n}", "")
    assert guest.server.store.get("/big")
    guest.server.set_perms("/big", ["n0", "r5"])
    assert guest.error(XsType.DIRECTORY, z("/big")) == "E2BIG"
    got, off, gens = b"", 0, set()
    while True:
        reply = guest.call(XsType.DIRECTORY_PART, z("/big", str(off)))
        gen, _, rest = reply.partition(b"\0")
        gens.add(gen)
        assert len(reply) <= PAYLOAD_MAX
        if rest.endswith(b"\0\0") or rest == b"\0":
            got += rest[:-1]
            break
        got += rest
        off += len(rest)
    assert got.split(b"\0")[:-1] == [n.encode() for n in names]
    assert len(gens) == 1 and int(gens.pop()) == guest.server.store.get("/big").generation
    end = guest.call(XsType.DIRECTORY_PART, z("/big", "999999"))
    assert end.endswith(b"\0\0") and end.count(b"\0") == 2
    assert guest.error(XsType.DIRECTORY_PART, z("/big")) == "EINVAL"
    assert guest.error(XsType.DIRECTORY_PART, z("/big", "x")) == "EINVAL"


def test_permissions(guest):
    guest.server.write("/local/domain/0/secret", "s")
    assert guest.error(XsType.READ, z("/local/domain/0/secret")) == "EACCES"
    # a missing node below an unreadable one: EACCES, not ENOENT (nothing leaks)
    assert guest.error(XsType.READ, z("/local/domain/0/none")) == "EACCES"
    assert guest.error(XsType.READ, z("data/none")) == "ENOENT"
    # read-only for the guest
    assert guest.error(XsType.WRITE, z("name") + b"evil") == "EACCES"
    assert guest.error(XsType.WRITE, z("memory/new") + b"x") == "EACCES"
    assert guest.error(XsType.MKDIR, z("cpu/9")) == "EACCES"
    assert guest.error(XsType.RM, z("name")) == "EACCES"
    assert guest.read("name") == b"guest"
    # write-only and per-domain entries
    guest.server.write("/w", "hidden")
    guest.server.set_perms("/w", ["n0", "w5"])
    assert guest.error(XsType.READ, z("/w")) == "EACCES"
    guest.write("/w", "written")
    assert guest.server.read("/w") == b"written"
    guest.server.set_perms("/w", ["r0", "n5"])        # everyone reads but domain 5
    assert guest.error(XsType.READ, z("/w")) == "EACCES"
    guest.server.set_perms("/w", ["r0", "n9"])
    assert guest.read("/w") == b"written"


def test_get_and_set_perms(guest):
    guest.write("data/p", "v")
    assert guest.perms("data/p") == ["n5"]
    guest.set_perms("data/p", "n5", "r0", "b9")
    assert guest.perms("data/p") == ["n5", "r0", "b9"]
    assert guest.error(XsType.SET_PERMS, z("data/p", "n0")) == "EPERM"   # owner stays
    assert guest.error(XsType.SET_PERMS, z("name", "n5")) == "EACCES"    # not the owner
    for bad in ("x5", "r", "r-1", "r70000", "rabc", ""):
        assert guest.error(XsType.SET_PERMS, z("data/p", bad)) == "EINVAL", bad
    assert guest.error(XsType.SET_PERMS, z("data/p")) == "EINVAL"
    assert guest.error(XsType.SET_PERMS, z("data/p", "n5")[:-1]) == "EINVAL"
    assert guest.perms("data/p") == ["n5", "r0", "b9"]
    assert guest.error(XsType.GET_PERMS, z("@releaseDomain")) == "EACCES"
    assert guest.server.get_perms("@releaseDomain") == ["n0"]


def test_get_domain_path(guest):
    assert guest.call(XsType.GET_DOMAIN_PATH, z("5")) == b"/local/domain/5\0"
    assert guest.call(XsType.GET_DOMAIN_PATH, z("0")) == b"/local/domain/0\0"
    for bad in (b"", b"abc\0", b"5", b"5\0x\0", b"99999\0"):
        assert guest.error(XsType.GET_DOMAIN_PATH, bad) == "EINVAL"


@pytest.mark.parametrize("t", [XsType.CONTROL, XsType.INTRODUCE, XsType.RELEASE,
                               XsType.IS_DOMAIN_INTRODUCED, XsType.RESUME, XsType.SET_TARGET])
def test_privileged_requests_refused(guest, t):
    assert guest.error(t, z("5")) == "EACCES"


@pytest.mark.parametrize("t", [XsType.WATCH_EVENT, XsType.ERROR, 20, 23, 1000, 0xFFFF,
                               0xFFFFFFFF])
def test_unknown_types_are_enosys(guest, t):
    assert guest.error(t, z("data")) == "ENOSYS"


@pytest.mark.parametrize("t,payload", [
    (XsType.READ, b""), (XsType.READ, b"data"), (XsType.READ, z("a", "b")),
    (XsType.WRITE, b"data/no-nul"), (XsType.MKDIR, b""), (XsType.RM, b"x"),
    (XsType.DIRECTORY, b"\0\0"), (XsType.GET_PERMS, b""),
    (XsType.WATCH, z("data")), (XsType.WATCH, z("data", "t", "extra")),
    (XsType.UNWATCH, b"data\0tok"), (XsType.TRANSACTION_END, b"T"),
    (XsType.TRANSACTION_END, z("X")), (XsType.READ, z("data/sp ace")),
    (XsType.WRITE, z("bad..") + b"v"), (XsType.READ, z("data/")),
])
def test_malformed_arguments_are_einval(guest, t, payload):
    assert guest.error(t, payload) == "EINVAL"


def test_unknown_transaction_id(guest):
    assert guest.error(XsType.READ, z("name"), tx=77) == "ENOENT"
    assert guest.error(XsType.TRANSACTION_END, z("T")) == "ENOENT"      # tx_id 0
    # WATCH ignores tx_id
    assert guest.call(XsType.WATCH, z("data", "t"), tx=77) == b"OK\0"


def test_reply_echoes_ids(guest):
    guest.send_raw(msg(XsType.READ, z("name"), req_id=0xDEADBEEF, tx_id=0))
    guest.send_raw(msg(XsType.READ, z("nope"), req_id=0x1234, tx_id=0))
    guest.pump()
    assert guest.replies[0xDEADBEEF] == (XsType.READ, b"guest")
    assert guest.replies[0x1234] == (XsType.ERROR, b"ENOENT\0")


def test_error_reply_keeps_tx_id(guest):
    t = guest.start()
    guest.send_raw(msg(XsType.READ, z("nope"), req_id=9, tx_id=t))
    guest.pump()
    raw = guest.replies[9]
    assert raw == (XsType.ERROR, b"ENOENT\0")


def test_xsfailed_helper_reports_name(guest):
    with pytest.raises(XsFailed) as info:
        guest.read("nope")
    assert info.value.name == "ENOENT"
