"""The xen_overlay device exists only in Xen mode; a plain KVM VM says so clearly."""

from __future__ import annotations

import pytest

from xend_lite.errors import NotSupported, SnapshotError
from xend_lite.vmm.domain import Domain
from xend_lite.vmm.spec import DomainSpec
from xend_lite.xen.overlay import OverlayDevice

pytestmark = pytest.mark.kvm


def test_plain_kvm_vm_has_no_overlay_and_says_so(tmp_path):
    plain = Domain(DomainSpec(memory_mib=32, xen=False))
    xen = Domain(DomainSpec(memory_mib=32))
    try:
        assert plain.xen is None and plain.overlay is None and not plain.machine.xen_mode
        for call in (plain.query_xen_overlay, plain.query_hypercalls,
                     lambda: plain.overlay_map("shared_info", 0x1000),
                     lambda: plain.overlay_unmap("shared_info")):
            with pytest.raises(NotSupported, match="not in Xen mode"):
                call()
        with pytest.raises(NotSupported, match="Xen mode"):
            OverlayDevice(plain.machine)
        assert plain.query_capabilities()["backend"] == "none"
        # the default guest finds no Xen and idles; a snapshot holds no Xen sections
        plain.start()
        plain.pause()
        path = str(tmp_path / "plain.xls")
        plain.snapshot_save(path)
        names = {s["name"] for s in Domain.snapshot_describe(path)["sections"]}
        assert "xen" not in names and "xen_overlay" not in names and "cpu/0" in names
        other = Domain(DomainSpec(memory_mib=32, xen=False))
        try:
            other.snapshot_load(path)
        finally:
            other.close()
        # a plain VM's snapshot lacks what a Xen VM needs, and the other way round
        with pytest.raises(SnapshotError):
            xen.snapshot_load(path)
        xen.start()
        xen.pause()
        xpath = str(tmp_path / "xen.xls")
        xen.snapshot_save(xpath)
        third = Domain(DomainSpec(memory_mib=32, xen=False))
        try:
            with pytest.raises(SnapshotError):
                third.snapshot_load(xpath)
        finally:
            third.close()
    finally:
        plain.close()
        xen.close()
