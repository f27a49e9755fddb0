"""Debian's cloud kernel booting: kernel log milestones reached per second of wall time,
xend-lite (PVH, Xen console) beside QEMU booting the same bzImage and initramfs as a plain KVM
guest (serial console), same RAM, vCPUs and host command-line arguments."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench._harness import Context, Figure, Section, Skip
from bench._qemu import qemu_binary
from bench._xl import require_kvm

TITLE = "linux: boot milestones per second of wall time, against QEMU"
SUMMARY = (
    "The newest /boot/vmlinuz-*-cloud-amd64 with a busybox initramfs whose /init prints and "
    "powers off, 256 MiB, 1 vCPU, each VMM given the same window of wall time. xend-lite: a "
    "Domain with the bzImage (PVH entry, `console=hvc0 earlyprintk=xen`); QEMU: `-accel kvm "
    "-cpu host -kernel -initrd` with the vmlinux inside that bzImage, through the same PVH "
    "entry (through SeaBIOS and the bzImage's own decompressor it printed nothing in minutes "
    "on a nested host), `console=ttyS0 earlyprintk=ttyS0`. Both get "
    "the arguments this host needs (noxsave, clearcpuid=...). A milestone is a kernel log text "
    "seen on the console; the figure is milestones reached divided by the seconds from spawn "
    "to the last one reached. Notes give the seconds to each milestone.")

MILESTONES = ("Linux version", "Kernel command line:", "Memory:", "ftrace: allocated",
              "NR_IRQS:", "Calibrating delay loop", "x86/fpu:", "smp: Bringing up",
              "devtmpfs: initialized", "NET: Registered PF_INET",
              "Trying to unpack rootfs", "Run /init", "INIT-RAN")
MEMORY_MIB = 256


def _guest(ctx: Context) -> tuple[Path, Path, Path, str, str]:
    from tests.realguests import build
    from tests.realguests.linuxboot import CMDLINE, HOST_ARGS, INIT

    try:
        kernel = build.linux_kernel()
        vmlinux = build.linux_vmlinux(ctx.workdir)
        initrd = build.busybox_initramfs(ctx.workdir, INIT)
    except build.Missing as exc:
        raise Skip(str(exc)) from exc
    return kernel, vmlinux, initrd, CMDLINE, f"console=ttyS0 earlyprintk=ttyS0 {HOST_ARGS} loglevel=8"


def _watch(read, window: float, done) -> dict[str, float]:
    """Poll ``read()`` (the console so far) for the milestones until the window closes or
    ``done()``; the seconds to each one seen."""
    t0 = time.monotonic()
    seen: dict[str, float] = {}
    while time.monotonic() - t0 < window and len(seen) < len(MILESTONES):
        text = read()
        for m in MILESTONES:
            if m not in seen and m in text:
                seen[m] = time.monotonic() - t0
        if done():
            break
        time.sleep(0.05)
    return seen


def _xend_lite(kernel: Path, initrd: Path, cmdline: str, window: float) -> dict[str, float]:
    from xend_lite.vmm.domain import Domain
    from xend_lite.vmm.spec import DomainSpec

    d = Domain(DomainSpec(image=str(kernel), initrd=str(initrd), cmdline=cmdline,
                          memory_mib=MEMORY_MIB))
    try:
        d.start()
        return _watch(d.machine.console.text, window, lambda: d.machine.status is not None)
    finally:
        d.close()


def _qemu(exe: str, kernel: Path, initrd: Path, cmdline: str, log: Path,
          window: float) -> dict[str, float]:
    log.unlink(missing_ok=True)
    proc = subprocess.Popen([exe, "-accel", "kvm", "-cpu", "host", "-m", str(MEMORY_MIB),
                             "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot",
                             "-serial", f"file:{log}", "-kernel", str(kernel), "-initrd",
                             str(initrd), "-append", cmdline],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def read() -> str:
            try:
                return log.read_text(errors="replace")
            except FileNotFoundError:
                return ""
        return _watch(read, window, lambda: proc.poll() is not None)
    finally:
        proc.kill()
        proc.wait()


def _rate(seen: dict[str, float]) -> float:
    return len(seen) / max(seen.values()) if seen else 0.0


def _note(who: str, seen: dict[str, float], window: float) -> str:
    got = ", ".join(f"{m!r} {t:.1f} s" for m, t in sorted(seen.items(), key=lambda i: i[1]))
    return f"{who}: {len(seen)}/{len(MILESTONES)} milestones in {window:.0f} s: {got or 'none'}"


def run(ctx: Context) -> Section:
    require_kvm()
    exe = qemu_binary()
    kernel, vmlinux, initrd, xl_cmd, q_cmd = _guest(ctx)
    window = float(ctx.count(180, 20))
    xl = _xend_lite(kernel, initrd, xl_cmd, window)
    q = _qemu(exe, vmlinux, initrd, q_cmd, ctx.workdir / "linux-qemu.log", window)
    fig = Figure("milestones per second", _rate(xl), "1/s", "QEMU", _rate(q),
                 note=f"xend-lite {len(xl)}, QEMU {len(q)} of {len(MILESTONES)}")
    return Section(TITLE, SUMMARY, [fig], [_note("xend-lite", xl, window), _note("QEMU", q, window)])
