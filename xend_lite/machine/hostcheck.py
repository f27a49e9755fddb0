"""What this host offers xend-lite: KVM presence and access, capabilities, and the backend
that would be used. `xend-lite --check` prints it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from xend_lite.kvm import CAPABILITIES, Kvm, KvmError

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

    def as_dict(self) -> dict:
        return {"kvm": self.kvm_path, "ok": self.ok, "problems": self.problems,
                "capabilities": self.capabilities, "backend": self.backend}


def check_host(kvm_path: str = "/dev/kvm", backend: str = "auto") -> HostReport:
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
    return report
