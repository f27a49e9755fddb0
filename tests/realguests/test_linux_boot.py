"""Debian's cloud kernel boots as a PVH guest of xend-lite, as far as this host lets it. Each
milestone is checked on what our side saw, not only on Linux's log:

- early printk through console_io (the hypercall counter), and Xen's version read from us;
- a snapshot taken mid-boot, restored into a fresh domain, goes on printing new lines;
- after the restore: hvc0 enabled (the kernel writes through the console ring, whose
  producer we read in guest memory); Linux's own upcall vector named to us; its Xen timer
  ticking (VCPUOP_set_singleshot_timer again and again, the log's clock moving); the grant
  table set up;
- xenbus connected to our xenstore: Linux's watches on control/shutdown and control/sysrq
  registered over the ring, control/feature-poweroff written; then "o" in control/sysrq
  (what ``xl sysrq`` writes) makes Linux power off through ACPI S5, which ends the VM as
  poweroff;
- (slow) two vCPUs: the second started by INIT/SIPI and brought up by Linux; then on to
  /init: its marker and poweroff, or, where the host's KVM leaves SYSCALL from ring 3 in
  ring 3 (``xend-lite --check`` names the limit syscall-cpl3), init dying on its first
  system call and Linux's panic reaching us as SCHEDOP_shutdown(crash).
"""

from __future__ import annotations

import re
import struct
import time

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
RUN_INIT = "Run /init as init process"
TICKS = 20                       # set_singleshot_timer calls that show a timer ticking
XENBUS_WAIT = 900                # s at most from the grant table to xenbus's watches
LOG_QUIET = 300                  # s without a new log byte: the boot has stopped


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


def _watched(d: Domain) -> set[str]:
    return {w.path for w in d.xen.xenstore.server.conn.watches.values()}


def _xenbus_then_sysrq_poweroff(d: Domain, after: int) -> None:
    """xenbus talks to our xenstore: the control watches registered and the feature written
    by the guest; then a sysrq "o" through the store powers Linux off via ACPI S5."""
    home = f"/local/domain/{d.xen.domid}"
    # About 3.5 minutes after the start here, but this host's ring-0 speed varies with its
    # load: wait while the kernel's log keeps moving, up to XENBUS_WAIT in all.
    end = time.monotonic() + XENBUS_WAIT
    seen, moved = len(d.machine.console.text()), time.monotonic()
    # the watches come first, then the feature, written in a transaction of its own
    while not ({f"{home}/control/shutdown", f"{home}/control/sysrq"} <= _watched(d)
               and d.xenstore("read", "control/feature-poweroff") == b"1"):
        now, text = time.monotonic(), d.machine.console.text()
        if len(text) > seen:
            seen, moved = len(text), now
        assert d.machine.status is None and now < end and now - moved < LOG_QUIET, \
            (d.machine.status, _watched(d), text[-600:])
        time.sleep(0.5)
    d.xenstore("write", "control/sysrq", b"o")
    st = d.machine.wait(300)
    assert st is not None and st.reason == "poweroff", (st, d.machine.console.text()[-600:])
    assert "sysrq: Power Off" in d.machine.console.text()[after:]
    assert d.xen.counters()["internal_errors"] == 0


def test_linux_boot_a_mid_boot_snapshot_its_timer_xenbus_and_a_sysrq_poweroff(linux, tmp_path):
    a = linux()
    _early(a)
    b, at = _round_trip(linux, a, tmp_path, 1)
    try:
        wait_text(b, "setup_percpu:", 60, after=at)     # what comes next in Linux's boot
        at = _console_upcalls_and_ticks(b, at)
        assert b.run_state() == "running" and b.machine.status is None
        _xenbus_then_sysrq_poweroff(b, at)
    finally:
        b.close()


def _to_the_end(d: Domain, after: int) -> None:
    """/init's marker and poweroff; or, on a host whose KVM leaves SYSCALL from ring 3 in
    ring 3, /init started and killed by its first system call, and Linux's panic reported
    to us as a crash."""
    from xend_lite.machine.quirkprobe import probe_all

    no_syscalls = {r.name: r.applies for r in probe_all(quiet=True)}.get("syscall-cpl3")
    if not no_syscalls:
        wait_text(d, "INIT-RAN", 900, after=after)
        assert d.machine.wait(120).reason == "poweroff"
        return
    at = wait_text(d, RUN_INIT, 900, after=after)
    st = d.machine.wait(300)
    assert st is not None and st.reason == "crash", st
    log = d.machine.console.text()[at:]
    assert "init[1]: segfault" in log and "entry_SYSCALL_64" in log, log[-800:]


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
