"""The hypervisor CPUID leaves a Xen guest looks for, at 0x40000000.

Leaf layout follows Xen's public arch-x86/cpuid.h: signature and highest leaf, version,
hypercall pages and MSR base, time (TSC) information, HVM features with the vCPU and domain
ids, and the PV leaf. Every other leaf is KVM's supported CPUID, minus KVM's own signature
leaves, which would otherwise sit where Xen's are. Nothing is set that the platform does not
serve (tests/xen/test_advertised.py walks every bit).
"""

from __future__ import annotations


from xend_lite.kvm import CpuidEntry
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set
from xend_lite.xen.xenabi import X

BASE = 0x40000000
HYPERCALL_MSR = 0x40000000
SIGNATURE = (0x566E6558, 0x65584D4D, 0x4D4D566E)  # "XenV" "MMXe" "nVMM"
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class XenCpuidConfig(Frozen):
    __slots__ = ("major", "minor", "domid", "tsc_khz")
    major: int
    minor: int
    domid: int
    tsc_khz: int

    def __init__(self, major: int, minor: int, domid: int, tsc_khz: int = 0):
        _set(self, "major", major)
        _set(self, "minor", minor)
        _set(self, "domid", domid)
        _set(self, "tsc_khz", tsc_khz)


def parse_version(text: str) -> tuple[int, int]:
    """'4.16' -> (4, 16); raises ValueError on anything else."""
    parts = text.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"Xen version {text!r} is not MAJOR.MINOR")
    major, minor = int(parts[0]), int(parts[1])
    if major > 0xFFFF or minor > 0xFFFF:
        raise ValueError(f"Xen version {text!r} is out of range")
    return major, minor


def xen_leaves(cfg: XenCpuidConfig, vcpu_id: int) -> list[CpuidEntry]:
    top = BASE + X.XEN_CPUID_MAX_NUM_LEAVES
    sig_b, sig_c, sig_d = SIGNATURE
    # UPCALL_VECTOR: HVMOP_set_evtchn_upcall_vector is served (hvm.py), an upcall the guest
    # acknowledges at the local APIC like any other interrupt
    hvm_features = (X.XEN_HVM_CPUID_VCPU_ID_PRESENT | X.XEN_HVM_CPUID_DOMID_PRESENT
                    | X.XEN_HVM_CPUID_UPCALL_VECTOR)
    sub = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        CpuidEntry(BASE, 0, 0, top, sig_b, sig_c, sig_d),
        CpuidEntry(BASE + 1, 0, 0, (cfg.major << 16) | cfg.minor, 0, 0, 0),
        CpuidEntry(BASE + 2, 0, 0, 1, HYPERCALL_MSR, 0, 0),
        # time: sub-leaf 0 = no emulated TSC, tsc_mode default, guest TSC kHz, incarnation 0
        CpuidEntry(BASE + 3, 0, sub, 0, 0, cfg.tsc_khz, 0),
        CpuidEntry(BASE + 3, 1, sub, 0, 0, 0, 0),
        CpuidEntry(BASE + 3, 2, sub, cfg.tsc_khz, 0, 0, 0),
        CpuidEntry(BASE + 4, 0, sub, hvm_features, vcpu_id, cfg.domid, 0),
        # the PV leaf: Xen leaves it empty for HVM and PVH guests
        CpuidEntry(BASE + 5, 0, sub, 0, 0, 0, 0),
    ]


def build_cpuid(kvm_leaves: list[CpuidEntry], cfg: XenCpuidConfig, vcpu_id: int) -> list[CpuidEntry]:
    """KVM's leaves with the hypervisor range replaced by Xen's."""
    rest = [e for e in kvm_leaves if not BASE <= e.function < BASE + 0x10000]
    out = []
    for e in rest:
        if e.function == 1:  # ECX bit 31: running under a hypervisor
            e = CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx | (1 << 31), e.edx)
        out.append(e)
    return out + xen_leaves(cfg, vcpu_id)
