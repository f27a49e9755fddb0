"""--check reports as usable only a backend the daemon then accepts."""

from __future__ import annotations

import pytest

from tests.daemon.test_process import REAL, run
from xend_lite.daemon.config import BACKENDS
from xend_lite.daemon.main import usable_backend
from xend_lite.errors import NotSupported
from xend_lite.machine.hostcheck import check_host

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_agrees_with_the_daemon(backend):
    from xend_lite.vmm.domain import Domain
    from xend_lite.vmm.spec import DomainSpec

    report = check_host("/dev/kvm", backend, probe_quirks=False)
    usable_backend(report, backend)
    try:
        dom = Domain(DomainSpec(image=None, memory_mib=32, backend=backend))
    except NotSupported:
        built = None
    else:
        built = dom.query_capabilities()["backend"]
        dom.close()
    assert report.ok == (built is not None), (report.as_dict(), built)
    assert report.backend == built


def test_check_says_why_kvm_xen_is_refused():
    r = run(["--check", "--backend", "kvm-xen"], cmd=REAL)
    assert r.returncode == 69
    assert "backend:    -" in r.stdout and "problem: the kvm-xen backend" in r.stdout
    assert "not ok" in r.stdout
