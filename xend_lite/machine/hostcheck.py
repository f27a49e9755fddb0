"""What this host offers xend-lite: KVM presence and access, capabilities, and the backend
that would be used. `xend-lite --check` prints it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from xend_lite.kvm import CAPABILITIES, Kvm, KvmError
from xend_lite.machine.quirks import QUIRKS

# Capabilities the userspace Xen backend cannot work without, and why.
REQUIRED = {
    "x86_user_space_msr": "trap the hypercall-page MSR write to the daemon",
    "x86_msr_filter": "select which MSRs reach the daemon",
    "sync_regs": "pass registers through kvm_run without extra ioctls per hypercall",
    "immediate_exit": "pause vCPUs promptly",
    "irqchip": "deliver event-channel upcalls through the in-kernel local APIC",
    "set_tss_addr": "run protected-mode guests",
}
REPORTED = sorted(set(REQUIRED) | {"xen_hvm", "readonly_mem", "nr_memslots", "max_vcpus", "xsave",
                                   "xcrs", "adjust_clock", "vcpu_events", "debugregs", "pit2",
                                   "get_tsc_khz", "split_irqchip"})


@dataclass
class HostReport:
    kvm_path: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    capabilities: dict[str, int] = field(default_factory=dict)
    backend: str | None = None
    #: quirk name -> True (this host has it), False (KVM runs the instruction), None (unknown)
    quirks: dict[str, bool | None] = field(default_factory=dict)
    #: host limit name (quirkprobe.LIMITS) -> True (this KVM cannot run it), False, None
    limits: dict[str, bool | None] = field(default_factory=dict)
    quirk_details: list[str] = field(default_factory=list)
    #: ring (0, 3) -> ns per iteration of a dec/jnz loop in a guest (None: did not finish)
    speed: dict[int, float | None] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"kvm": self.kvm_path, "ok": self.ok, "problems": self.problems,
                "capabilities": self.capabilities, "backend": self.backend,
                "quirks": self.quirks, "limits": self.limits,
                "speed_ns_per_loop": {f"ring{r}": v for r, v in self.speed.items()}}

    def quirks_line(self) -> str:
        """One line: which instructions this KVM cannot emulate and what xend-lite does."""
        if not self.quirks:
            return "quirks: not probed"
        have = [n for n, v in self.quirks.items() if v]
        unknown = [n for n, v in self.quirks.items() if v is None]
        parts = [f"{n} ({QUIRKS[n].instruction}: {QUIRKS[n].handling})" for n in have]
        text = "quirks: " + ("; ".join(parts) if parts else "none, KVM emulates "
                             + ", ".join(QUIRKS[n].instruction for n in self.quirks))
        if unknown:
            text += f" (probe inconclusive: {', '.join(unknown)})"
        return text


    def limits_line(self) -> str:
        """One line: what this KVM cannot run for a guest and xend-lite does not carry out."""
        from xend_lite.machine.quirkprobe import LIMITS

        if not self.limits:
            return "host limits: not probed"
        have = [f"{n} (cannot run {LIMITS[n].what}: {LIMITS[n].effect})"
                for n, v in self.limits.items() if v]
        unknown = [n for n, v in self.limits.items() if v is None]
        text = "host limits: " + ("; ".join(have) if have else "none found")
        if unknown:
            text += f" (probe inconclusive: {', '.join(unknown)})"
        return text

    def speed_line(self) -> str:
        """One line: how fast guest code runs in ring 0 (a guest kernel) and ring 3."""
        if not self.speed:
            return "guest speed: not measured"
        if any(v is None for v in self.speed.values()):
            return "guest speed: a timing loop did not finish"
        r0, r3 = self.speed[0], self.speed[3]
        text = f"guest speed: {r0:.1f} ns per loop iteration in ring 0, {r3:.2f} ns in ring 3"
        if r0 > 10 * r3:
            text += (f" (a guest kernel runs about {r0 / r3:.0f}x slower than its processes on"
                     " this KVM)")
        return text


def check_host(kvm_path: str = "/dev/kvm", backend: str = "auto",
               probe_quirks: bool = True) -> HostReport:
    report = HostReport(kvm_path, ok=False)
    if not os.path.exists(kvm_path):
        report.problems.append(f"{kvm_path} does not exist: load the kvm module (modprobe kvm_intel "
                               "or kvm_amd) and enable virtualization in the firmware")
        return report
    if not os.access(kvm_path, os.R_OK | os.W_OK):
        report.problems.append(f"{kvm_path} is not readable and writable by uid {os.getuid()}: "
                               "run as root or add the user to the kvm group")
        return report
    try:
        with Kvm(kvm_path) as kvm:
            report.capabilities = {name: kvm.check_extension(CAPABILITIES[name])
                                   for name in REPORTED if name in CAPABILITIES}
    except KvmError as exc:
        report.problems.append(f"cannot use {kvm_path}: {exc}")
        return report
    caps = report.capabilities
    kernel_xen = caps.get("xen_hvm", 0) > 0
    if backend == "kvm-xen" and not kernel_xen:
        report.problems.append("backend kvm-xen was asked for, but this kernel has no KVM_CAP_XEN_HVM")
    if backend in ("auto", "userspace") or not kernel_xen:
        for name, why in REQUIRED.items():
            if not caps.get(name):
                report.problems.append(f"KVM lacks {name.upper()}: needed to {why}")
    # auto means userspace: it works on every host with the capabilities above, and the
    # kernel's Xen support is only used when asked for by name.
    report.backend = "kvm-xen" if backend == "kvm-xen" else "userspace"
    report.ok = not report.problems
    if probe_quirks and report.ok:
        from xend_lite.machine.quirkprobe import probe_all

        for result in probe_all(kvm_path, quiet=True):
            found = report.quirks if result.name in QUIRKS else report.limits
            found[result.name] = result.applies
            report.quirk_details.append(result.detail)
        from xend_lite.machine.quirkprobe import ring_speeds

        report.speed = ring_speeds(kvm_path, quiet=True)
    return report
