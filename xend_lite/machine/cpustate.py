"""Capture and apply the complete KVM state of a vCPU and of the VM-wide devices.

Values are plain data (ints, bytes, dicts) so the snapshot layer can encode them. Capture
and apply run with the vCPU paused on the thread that owns the machine.
"""

from __future__ import annotations

from typing import Any

from xend_lite.kvm import Dtable, KvmError, Regs, Segment, Sregs, Vcpu, Vm
from xend_lite.kvm import const as K

MSR_IA32_TSC = 0x10


def readable_msrs(vcpu: Vcpu, indices: list[int]) -> dict[int, int]:
    """Read every MSR KVM lists that it can actually read: KVM_GET_MSRS stops at the first
    one it refuses, so skip that one and go on."""
    out: dict[int, int] = {}
    pending = list(indices)
    while pending:
        got = vcpu.get_msrs(pending)
        out.update(got)
        n = len(got)
        pending = pending[n + 1:]
    return out


def sregs_to_dict(s: Sregs) -> dict[str, Any]:
    return s.as_dict() | {"interrupt_bitmap": list(s.interrupt_bitmap)}


def sregs_from_dict(d: dict[str, Any]) -> Sregs:
    s = Sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        setattr(s, name, Segment(**d[name]))
    s.gdt = Dtable(**d["gdt"])
    s.idt = Dtable(**d["idt"])
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        setattr(s, name, d[name])
    s.interrupt_bitmap = tuple(d["interrupt_bitmap"])
    return s


def capture_vcpu(vcpu: Vcpu, msr_indices: list[int], irqchip: bool = True) -> dict[str, Any]:
    vcpu.flush_dirty_regs()
    return {
        "regs": vcpu.get_regs().as_dict(),
        "sregs": sregs_to_dict(vcpu.get_sregs()),
        "xsave": vcpu.get_xsave(),
        "xcrs": vcpu.get_xcrs(),
        "msrs": {str(k): v for k, v in readable_msrs(vcpu, msr_indices).items()},
        "lapic": vcpu.get_lapic() if irqchip else b"",
        "events": vcpu.get_vcpu_events(),
        "mp_state": vcpu.get_mp_state(),
        "debugregs": vcpu.get_debugregs(),
    }


def apply_vcpu(vcpu: Vcpu, st: dict[str, Any], irqchip: bool = True) -> None:
    """Load a captured vCPU state (QEMU's order: registers, FPU, control state, MSRs, then
    the interrupt state that depends on them)."""
    vcpu.discard_dirty_regs()
    vcpu.set_regs(Regs(**st["regs"]))
    vcpu.set_xsave(st["xsave"])
    vcpu.set_xcrs(st["xcrs"])
    vcpu.set_sregs(sregs_from_dict(st["sregs"]))
    msrs = {int(k): v for k, v in st["msrs"].items()}
    tsc = msrs.pop(MSR_IA32_TSC, None)
    if msrs:
        n = vcpu.set_msrs(msrs)
        if n != len(msrs):
            bad = list(msrs)[n]
            raise KvmError(f"KVM_SET_MSRS (MSR {bad:#x} refused)", 22)
    if tsc is not None:
        vcpu.set_msrs({MSR_IA32_TSC: tsc})
    vcpu.set_mp_state(st["mp_state"])
    if irqchip and st["lapic"]:
        vcpu.set_lapic(st["lapic"])
    vcpu.set_vcpu_events(st["events"])
    vcpu.set_debugregs(st["debugregs"])
    # Refresh the synced copies so handlers and queries see the loaded registers at once.
    vcpu.reload_synced()


def capture_vm(vm: Vm, irqchip: bool = True) -> dict[str, Any]:
    clock, _flags = vm.get_clock()
    st: dict[str, Any] = {"clock": clock}
    if irqchip:
        st |= {"pic0": vm.get_irqchip(K.KVM_IRQCHIP_PIC_MASTER),
               "pic1": vm.get_irqchip(K.KVM_IRQCHIP_PIC_SLAVE),
               "ioapic": vm.get_irqchip(K.KVM_IRQCHIP_IOAPIC),
               "pit": vm.get_pit2()}
    return st


def apply_vm(vm: Vm, st: dict[str, Any], irqchip: bool = True) -> None:
    if irqchip:
        for key in ("pic0", "pic1", "ioapic"):
            vm.set_irqchip(st[key])
        vm.set_pit2(st["pit"])
    vm.set_clock(st["clock"])
