"""Debian's cloud kernel boots as a PVH guest of xend-lite, as far as this host lets it. Each
milestone is checked on what our side saw, not only on Linux's log:

- early printk through console_io (the hypercall counter), and Xen's version read from us;
- a snapshot taken mid-boot, restored into a fresh domain, goes on printing new lines;
- after the restore: hvc0 enabled (the kernel writes through the console ring, whose
  producer we read in guest memory); Linux's own upcall vector named to us; its Xen timer
  ticking (VCPUOP_set_singleshot_timer again and again, the log's clock moving); the grant
  table set up;
- (slow) two vCPUs: the second started by INIT/SIPI and brought up by Linux; then on to
  the end of the boot: /init's marker and poweroff, or, where the host's KVM cannot run
  SSE at CPL 0 (``xend-lite --check`` names it), the internal error at Linux's first SSE
  instruction, at "Trying to unpack rootfs image as initramfs".
"""

from __future__ import annotations

import re
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
HVC0 = "printk: console [hvc0] enabled"
TIMER = "installing Xen timer for CPU 0"
GRANTS = "Grant table initialized"
LATE = "NET: Registered PF_UNIX/PF_LOCAL protocol family"   # a late initcall
TICKS = 20                       # set_singleshot_timer calls that show a timer ticking


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


def _log_times(text: str) -> list[float]:
    return [float(t) for t in re.findall(r"^\[\s*(\d+\.\d+)\]", text, re.M)]


def _console_upcalls_and_ticks(d: Domain, after: int) -> int:
    """hvc0 through the ring, Linux's upcall vector, then its Xen timer ticking: the
    one-shot timer re-armed many times and the log's clock moving while it does."""
    at = wait_text(d, HVC0, 120, after=after)
    assert _ring_prod(d) > 0
    assert d.xen.upcalls.vectors.get(0, 0) >= 0x20, "Linux names its own upcall vector"
    at = wait_text(d, TIMER, 120, after=at)
    before = _calls(d, "vcpu_op")
    at = wait_text(d, GRANTS, 120, after=at)
    times = _log_times(d.machine.console.text()[after:at])
    assert len(set(times[-10:])) > 1, f"the log's clock stood still: {times[-10:]}"
    assert _calls(d, "vcpu_op") >= before + TICKS
    assert d.xen.counters()["internal_errors"] == 0
    return at


def test_linux_early_boot_a_mid_boot_snapshot_and_its_timer(linux, tmp_path):
    a = linux()
    _early(a)
    b, at = _round_trip(linux, a, tmp_path, 1)
    try:
        wait_text(b, "setup_percpu:", 60, after=at)     # what comes next in Linux's boot
        _console_upcalls_and_ticks(b, at)
        assert b.run_state() == "running" and b.machine.status is None
    finally:
        b.close()


def _to_the_end(d: Domain, after: int) -> None:
    """/init's marker and poweroff; or, on a host whose KVM cannot run SSE at CPL 0, the
    stop at Linux's first SSE instruction, once its late initcalls have run (the
    initramfs message may still sit in the kernel's log buffer then)."""
    from xend_lite.machine.quirkprobe import probe_all

    sse_stops = {r.name: r.applies for r in probe_all(quiet=True)}.get("sse-cpl0")
    if not sse_stops:
        wait_text(d, "INIT-RAN", 600, after=after)
        assert d.machine.wait(120).reason == "poweroff"
        return
    wait_text(d, LATE, 600, after=after)
    st = d.machine.wait(300)
    assert st is not None and st.reason == "internal-error", st
    assert re.search(r"bytes 66 (4[0-9a-f] )?0f ", st.detail), st.detail   # an SSE opcode


@pytest.mark.slow
def test_linux_full_boot_with_two_vcpus_and_a_snapshot(linux, tmp_path):
    a = linux(vcpus=2)
    _early(a)
    wait_text(a, "nr_cpu_ids:2", 60)                    # it counted both CPUs of our MADT
    states = [v["state"] for v in a.query_vcpus()]
    assert states[1] == "created"                       # not started before Linux asks
    b, restored_at = _round_trip(linux, a, tmp_path, 2)
    try:
        at = _console_upcalls_and_ticks(b, restored_at)
        wait_text(b, "smp: Brought up 1 node, 2 CPUs", 300, after=restored_at)
        assert [v["state"] for v in b.query_vcpus()] == ["running", "running"]
        assert set(b.xen.upcalls.vectors) == {0, 1}      # each CPU named its own vector
        _to_the_end(b, at)
    finally:
        b.close()
