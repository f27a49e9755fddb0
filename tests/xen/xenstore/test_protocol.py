"""Argument and path checks: guest bytes become checked values or an error name."""

from __future__ import annotations

import pytest

from xend_lite.xen.xenstore.errors import ERROR_NAMES, XsError
from xend_lite.xen.xenstore.protocol import (
    ABS_PATH_MAX,
    REL_PATH_MAX,
    XsType,
    canonical,
    one_arg,
    parse_domid,
    strings,
)


def name(fn, *args, **kw) -> str:
    with pytest.raises(XsError) as info:
        fn(*args, **kw)
    return info.value.name


def test_types_and_errors_match_xs_wire_h():
    text = open("/usr/include/xen/io/xs_wire.h").read()
    # the error table, in order
    listed = [line.split("(")[1].split(")")[0] for line in text.splitlines()
              if line.strip().startswith("XSD_ERROR(") and "define" not in line]
    assert tuple(listed) == ERROR_NAMES
    assert XsType.RESET_WATCHES == XsType.SET_TARGET + 2 and XsType.DIRECTORY_PART == 22
    order = ["CONTROL", "DIRECTORY", "READ", "GET_PERMS", "WATCH", "UNWATCH",
             "TRANSACTION_START", "TRANSACTION_END", "INTRODUCE", "RELEASE", "GET_DOMAIN_PATH",
             "WRITE", "MKDIR", "RM", "SET_PERMS", "WATCH_EVENT", "ERROR",
             "IS_DOMAIN_INTRODUCED", "RESUME", "SET_TARGET"]
    assert [XsType[n].value for n in order] == list(range(20))
    assert "#define XENSTORE_PAYLOAD_MAX 4096" in text
    assert "#define XENSTORE_ABS_PATH_MAX 3072" in text and ABS_PATH_MAX == 3072
    assert "#define XENSTORE_REL_PATH_MAX 2048" in text and REL_PATH_MAX == 2048


def test_one_arg_wants_exactly_one_terminated_string():
    assert one_arg(b"a/b\0") == b"a/b"
    assert one_arg(b"\0") == b""
    for bad in (b"", b"abc", b"a\0b\0", b"a\0b", b"\0\0"):
        assert name(one_arg, bad) == "EINVAL"


def test_strings_counts_and_termination():
    assert strings(b"a\0b\0", count=2) == [b"a", b"b"]
    assert strings(b"", count=0) == []
    assert name(strings, b"a\0b", count=2) == "EINVAL"        # unterminated tail
    assert name(strings, b"a\0", count=2) == "EINVAL"
    assert name(strings, b"a\0b\0c\0", count=2) == "EINVAL"
    assert name(strings, b"p\0", at_least=2) == "EINVAL"


def test_domid():
    assert parse_domid(b"0") == 0 and parse_domid(b"65535") == 65535
    for bad in (b"", b"-1", b"65536", b"0x10", b"1 ", b"123456", b"\xff"):
        assert name(parse_domid, bad) == "EINVAL"


def test_canonical_paths():
    assert canonical(b"/a/b", 7) == ("/a/b", False)
    assert canonical(b"device/vif", 7) == ("/local/domain/7/device/vif", True)
    assert canonical(b"/", 7) == ("/", False)
    assert canonical(b"@releaseDomain", 7, allow_special=True) == ("@releaseDomain", False)
    for bad in (b"", b"/a/", b"a//b", b"//", b"/a b", b"/a\xff", b"/a.b", b"/a\nb",
                b"@releaseDomain", b"/a:b"):
        assert name(canonical, bad, 7) == "EINVAL", bad


def test_path_length_limits():
    assert canonical(b"/" + b"a" * (ABS_PATH_MAX - 1), 0)[0]
    assert name(canonical, b"/" + b"a" * ABS_PATH_MAX, 0) == "EINVAL"
    # a guest's limit counts past /local/domain/<id>/
    long = b"x" * REL_PATH_MAX
    assert canonical(long, 7, path_max=REL_PATH_MAX)[0].endswith("x")
    assert name(canonical, long + b"x", 7, path_max=REL_PATH_MAX) == "EINVAL"
    assert name(canonical, b"/" + long, 7, path_max=REL_PATH_MAX) == "EINVAL"
    assert canonical(b"/" + long[:-1], 7, path_max=REL_PATH_MAX)
    # a relative path that would pass as text but not once made absolute
    assert name(canonical, b"y" * (ABS_PATH_MAX - 10), 7) == "EINVAL"
