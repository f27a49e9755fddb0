"""The domain's xenstore backend makes its server at the first use: serving an idle ring
only sets the feature bits; the guest's first request, its ask to reconnect, an operator
call or a save makes the server, with the toolstack trees written before, in order."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.xen.xenstore.helpers import CONNECTION, FEATURES, REQ_PROD, RSP_PROD, msg, z
from xend_lite.xen.page import BytesPage
from xend_lite.xen.xenstore.backend import XenstoreBackend
from xend_lite.xen.xenstore.protocol import XsType
from xend_lite.xen.xenstore.ring import RECONNECT, SERVER_FEATURES
from xend_lite.xen.xenstore.toolstack import DomainInfo

DOMID = 3


def u32(page: BytesPage, off: int) -> int:
    return int.from_bytes(page.buf[off:off + 4], "little")


def set_u32(page: BytesPage, off: int, v: int) -> None:
    page.buf[off:off + 4] = v.to_bytes(4, "little")


def backend() -> tuple[XenstoreBackend, BytesPage, list[int]]:
    page = BytesPage()
    notified: list[int] = []
    b = XenstoreBackend(DOMID, page)
    b.notify = lambda: notified.append(1)
    return b, page, notified


def test_an_idle_ring_gets_the_features_and_no_server():
    b, page, notified = backend()
    b.write_domain_tree(DomainInfo(name="a", memory_kib=1024))
    assert b.serve() is False
    assert u32(page, FEATURES) & SERVER_FEATURES == SERVER_FEATURES
    assert b._server is None and notified == []


def test_the_first_request_makes_the_server_with_the_trees_written_before_in_order():
    b, page, notified = backend()
    b.write_domain_tree(DomainInfo(name="first", memory_kib=1024))
    b.write_domain_tree(DomainInfo(name="second", memory_kib=2048))
    req = msg(XsType.READ, z(f"/local/domain/{DOMID}/name"), req_id=7)
    page.buf[:len(req)] = req
    set_u32(page, REQ_PROD, len(req))
    assert b.serve() is True
    assert b._server is not None and notified
    assert u32(page, RSP_PROD) > 0
    assert b.call("read", f"/local/domain/{DOMID}/name") == b"second"
    assert b.call("read", f"/local/domain/{DOMID}/memory/static-max") == b"2048"


def test_a_reconnect_makes_the_server():
    b, page, _ = backend()
    set_u32(page, CONNECTION, RECONNECT)
    b.serve()
    assert b._server is not None
    assert u32(page, CONNECTION) == 0


def test_the_operator_and_a_save_see_the_tree_of_a_store_never_served():
    b, _, _ = backend()
    b.write_domain_tree(DomainInfo(name="op", memory_kib=1024))
    b.reset()                                       # nothing made: nothing to drop
    assert b._server is None
    assert b.call("read", f"/local/domain/{DOMID}/name") == b"op"
    other, _, _ = backend()
    other.write_domain_tree(DomainInfo(name="op", memory_kib=1024))
    assert other.save() == b.save()


def test_the_domain_stack_loads_no_xenstore_server_or_protocol():
    code = ("import json, sys, xend_lite.vmm.domain, xend_lite.daemon.service\n"
            "print(json.dumps([m for m in sys.modules if m.startswith('xend_lite.xen.xenstore')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert sorted(json.loads(out)) == ["xend_lite.xen.xenstore", "xend_lite.xen.xenstore.backend",
                                       "xend_lite.xen.xenstore.ring",
                                       "xend_lite.xen.xenstore.toolstack"]
