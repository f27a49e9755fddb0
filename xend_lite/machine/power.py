"""The power-on state of the vCPUs and the in-kernel interrupt controllers, captured when the
machine is made and put back by a reset (with the machine paused, on the owner)."""

from __future__ import annotations

from xend_lite.kvm import Regs, Sregs, Vcpu, Vm
from xend_lite.kvm import const as K
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set


class VcpuPowerOn(Frozen):
    __slots__ = ("regs", "sregs", "fpu", "lapic", "mp_state", "events", "xcrs")
    regs: Regs
    sregs: Sregs
    fpu: bytes
    lapic: bytes | None
    mp_state: int
    events: bytes
    xcrs: bytes

    def __init__(self, regs: Regs, sregs: Sregs, fpu: bytes, lapic: bytes | None, mp_state: int,
                 events: bytes, xcrs: bytes):
        _set(self, "regs", regs)
        _set(self, "sregs", sregs)
        _set(self, "fpu", fpu)
        _set(self, "lapic", lapic)
        _set(self, "mp_state", mp_state)
        _set(self, "events", events)
        _set(self, "xcrs", xcrs)

    @classmethod
    def capture(cls, v: Vcpu, irqchip: bool) -> VcpuPowerOn:
        return cls(v.get_regs(), v.get_sregs(), v.get_fpu(), v.get_lapic() if irqchip else None,
                   v.get_mp_state(), v.get_vcpu_events(), v.get_xcrs())

    def apply(self, v: Vcpu) -> None:
        v.discard_dirty_regs()
        v.set_sregs(self.sregs)
        v.set_regs(self.regs)
        v.set_fpu(self.fpu)
        v.set_xcrs(self.xcrs)
        if self.lapic is not None:
            v.set_lapic(self.lapic)
        v.set_vcpu_events(self.events)
        v.set_mp_state(self.mp_state)
        v.reload_synced()


class VmPowerOn(Frozen):
    __slots__ = ("pic0", "pic1", "ioapic", "pit")
    pic0: bytes
    pic1: bytes
    ioapic: bytes
    pit: bytes

    def __init__(self, pic0: bytes, pic1: bytes, ioapic: bytes, pit: bytes):
        _set(self, "pic0", pic0)
        _set(self, "pic1", pic1)
        _set(self, "ioapic", ioapic)
        _set(self, "pit", pit)

    @classmethod
    def capture(cls, vm: Vm) -> VmPowerOn:
        return cls(vm.get_irqchip(K.KVM_IRQCHIP_PIC_MASTER), vm.get_irqchip(K.KVM_IRQCHIP_PIC_SLAVE),
                   vm.get_irqchip(K.KVM_IRQCHIP_IOAPIC), vm.get_pit2())

    def apply(self, vm: Vm) -> None:
        for blob in (self.pic0, self.pic1, self.ioapic):
            vm.set_irqchip(blob)
        vm.set_pit2(self.pit)
