from __future__ import annotations

import pytest

from tests.xen.xenstore.helpers import Guest
from xend_lite.xen.xenstore.toolstack import DomainInfo

DOMID = 5


@pytest.fixture
def guest() -> Guest:
    """A guest (domain 5) whose toolstack tree is written, on a fresh ring."""
    g = Guest(DOMID)
    g.server.write_domain_tree(DomainInfo("guest", 131072, vcpus=2, store_port=1,
                                          store_ring_ref=0xFEFFF, console_port=2,
                                          console_ring_ref=0xFEFFE))
    return g
