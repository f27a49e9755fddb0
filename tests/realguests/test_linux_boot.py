"""Debian's cloud kernel boots as a PVH guest of xend-lite, as far as this host lets it. Each
milestone is checked on what our side saw, not only on Linux's log:

- early printk through console_io (the hypercall counter), and Xen's version read from us;
- a snapshot taken mid-boot, restored into a fresh domain, goes on printing new lines;
- (slow) the event-channel upcall: Linux set HVM_PARAM_CALLBACK_IRQ to a vector;
- (slow) hvc0 enabled: from then on the kernel writes through the console ring, whose
  producer we read in guest memory; the second vCPU started by INIT/SIPI.
"""

from __future__ import annotations

import struct

import pytest

from xend_lite.vmm.domain import Domain
from xend_lite.vmm.spec import DomainSpec
from xend_lite.xen.xenabi import X

from .console import wait_text
from .linuxboot import INIT, boot

pytestmark = pytest.mark.kvm

CONSOLE_OUT_PROD = 3084          # struct xencons_interface: out_cons at 3080, out_prod after
CALLBACK_VIA_VECTOR = 2          # HVM_PARAM_CALLBACK_TYPE_VECTOR, in bits 56-63
BOOTING = "Booting kernel on Xen PVH"
VERSION = "Xen version: 4.16.0-xend-lite"


@pytest.fixture
def linux(linux_kernel, busybox_initramfs):
    made: list[Domain] = []

    def make(vcpus: int = 1) -> Domain:
        d = boot(linux_kernel(), busybox_initramfs(INIT), vcpus=vcpus)
        made.append(d)
        return d

    make.spec = lambda vcpus=1: (linux_kernel(), busybox_initramfs(INIT), vcpus)
    yield make
    for d in made:
        d.close()


def _calls(d: Domain, name: str) -> int:
    return d.xen.counters()["hypercalls"].get(name, {}).get("calls", 0)


def _ring_prod(d: Domain) -> int:
    return struct.unpack("<I", d.machine.mem.read(d.xen.console_gpa + CONSOLE_OUT_PROD, 4))[0]


def _early(d: Domain) -> None:
    """Early printk through console_io, and the version Linux read from us."""
    wait_text(d, BOOTING, 60)
    assert _calls(d, "console_io") > 0 and _ring_prod(d) == 0
    wait_text(d, VERSION, 15)
    assert _calls(d, "xen_version") > 0
    assert d.xen.counters()["internal_errors"] == 0


def _restored(linux, path, vcpus: int) -> Domain:
    kernel, initrd, _ = linux.spec(vcpus)
    b = Domain(DomainSpec(image=str(kernel), initrd=str(initrd), memory_mib=256, vcpus=vcpus))
    try:
        b.snapshot_load(path)
    except BaseException:
        b.close()
        raise
    return b


def _round_trip(linux, a: Domain, tmp_path, vcpus: int) -> tuple[Domain, int]:
    """Snapshot ``a`` now, close it, and go on in a fresh domain: new lines must follow."""
    a.pause()
    a.snapshot_save(tmp_path / "linux.snap")
    before = a.machine.console.text()
    a.close()
    b = _restored(linux, tmp_path / "linux.snap", vcpus)
    try:
        at = len(b.machine.console.text())
        assert b.machine.console.text() == before       # the restored console is the old one
        b.start()
        wait_text(b, "\n[", 60, after=at)               # a new kernel log line, after restore
        return b, at
    except BaseException:
        b.close()
        raise


def test_linux_early_boot_and_a_mid_boot_snapshot_goes_on(linux, tmp_path):
    a = linux()
    _early(a)
    b, at = _round_trip(linux, a, tmp_path, 1)
    try:
        wait_text(b, "setup_percpu:", 60, after=at)     # what comes next in Linux's boot
        assert b.run_state() == "running" and b.machine.status is None
    finally:
        b.close()


@pytest.mark.slow
def test_linux_full_boot_with_two_vcpus_and_a_snapshot(linux, tmp_path):
    a = linux(vcpus=2)
    _early(a)
    wait_text(a, "nr_cpu_ids:2", 60)                    # it counted both CPUs of our MADT
    wait_text(a, "Xen HVM callback vector for event delivery is enabled", 120)
    via = a.xen.params.get(X.HVM_PARAM_CALLBACK_IRQ, 0)
    assert via >> 56 == CALLBACK_VIA_VECTOR and 0x20 <= via & 0xFF <= 0xFF
    wait_text(a, "printk: console [hvc0] enabled", 60)
    wait_text(a, "ACPI: Core revision", 60)             # written after the switch to hvc0
    assert _ring_prod(a) > 0
    states = [v["state"] for v in a.query_vcpus()]
    assert states[1] == "created"                       # not started before Linux asks
    b, at = _round_trip(linux, a, tmp_path, 2)
    try:
        wait_text(b, "smp: Bringing up secondary CPUs", 180, after=at)
        assert b.xen.counters()["internal_errors"] == 0
    finally:
        b.close()
