"""The parts of a Machine that no guest decides, made before the guest is known.

A KVM VM with its TSS and identity-map pages, the in-kernel irqchip and PIT, the host's
CPUID table, the VM owner thread and the first vCPUs (with the CPUID every vCPU starts with
and their power-on state) depend on nothing a guest image or a snapshot says; only RAM, the
memory map and the number of vCPUs do. A Machine is always built on a ``PreparedVm``: made
on the spot for an ordinary start, made ahead by a daemon that waits for a snapshot, so a
restore pays only for what the snapshot decides.

Several of these calls wait inside KVM for a grace period of the VM's SRCU (irqchip and PIT
creation, the MSR filter, the first memory slot). Measured on these hosts: from tens of
microseconds to 16 ms each, the longest when they follow each other closely; a VM made
seconds before its first memory slot takes that slot in a quarter of a millisecond.
"""

from __future__ import annotations

import threading
from typing import Callable

from xend_lite.errors import InvalidArgument, NotSupported
from xend_lite.kvm import CpuidEntry, Kvm, Vcpu, Vm
from xend_lite.kvm import const as K
from xend_lite.machine.msrfilter import msr_filter_ranges
from xend_lite.machine.owner import VmOwner
from xend_lite.machine.power import VcpuPowerOn, VmPowerOn
from xend_lite.record import Record

TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
MAX_VCPUS = 64


class PreparedVm(Record):
    """A VM made ahead: ``vcpus`` are created (vCPU n has id n) with ``cpuid`` set and their
    ``power_on`` state taken. A Machine adopts it once (``adopted``) and owns it from then on;
    until then ``close`` releases it (the Kvm stays its caller's). A record (record.py), not
    a dataclass: every start makes one."""

    __slots__ = ("kvm", "vm", "irqchip", "cpuid", "owner", "vcpus", "power_on", "vm_power_on",
                 "user_msrs", "threads", "adopted")

    def __init__(self, kvm: Kvm, vm: Vm, irqchip: bool, cpuid: list[CpuidEntry], owner: VmOwner,
                 vcpus: list[Vcpu] | None = None, power_on: list[VcpuPowerOn] | None = None,
                 vm_power_on: VmPowerOn | None = None, user_msrs: bool = False,
                 threads: list[ParkedThread] | None = None, adopted: bool = False):
        self.kvm = kvm
        self.vm = vm
        self.irqchip = irqchip
        self.cpuid = cpuid
        self.owner = owner
        self.vcpus: list[Vcpu] = [] if vcpus is None else vcpus
        self.power_on: list[VcpuPowerOn] = [] if power_on is None else power_on
        self.vm_power_on = vm_power_on
        self.user_msrs = user_msrs          # KVM_CAP_X86_USER_SPACE_MSR enabled (filter exits)
        self.threads: list[ParkedThread] = [] if threads is None else threads  # see Machine.spawn
        self.adopted = adopted

    @classmethod
    def make(cls, kvm: Kvm, vcpus: int = 1, irqchip: bool = True,
             park_threads: int = 0) -> PreparedVm:
        """``park_threads``: also start that many threads, parked until the machine gives
        them work (its vCPUs' loops and the like: Machine.spawn), for a machine that is to
        start soon after it is asked for."""
        check_vcpus(vcpus)
        vm = kvm.create_vm()
        p: PreparedVm | None = None
        try:
            vm.set_tss_addr(TSS_ADDR)
            vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
            if irqchip:
                vm.create_irqchip()
                vm.create_pit2()
            cpuid = kvm.supported_cpuid()
            p = cls(kvm, vm, irqchip, cpuid, VmOwner())
            p.vm_power_on = VmPowerOn.capture(vm) if irqchip else None
            p.add_vcpus(vcpus)
            p.threads = [ParkedThread() for _ in range(park_threads)]
            return p
        except BaseException:
            if p is not None:
                p.close()
            else:
                vm.close()
            raise

    def unfit(self, vcpus: int, irqchip: bool = True) -> str | None:
        """Why this VM cannot become a machine of that shape, or None when it can (vCPUs can
        be added, never taken away)."""
        if self.adopted:
            return "it is in use already"
        if irqchip != self.irqchip:
            return "its in-kernel irqchip differs"
        if vcpus < len(self.vcpus):
            return f"it has {len(self.vcpus)} vCPUs made, more than {vcpus}"
        return None

    def add_vcpus(self, total: int) -> None:
        """Make vCPUs up to ``total``, each with the CPUID it starts with and its power-on
        state taken after that."""
        check_vcpus(total)
        while len(self.vcpus) < total:
            v = self.vm.create_vcpu(len(self.vcpus))
            try:
                v.set_cpuid2(vcpu_cpuid(self.cpuid, v.id))
                self.power_on.append(VcpuPowerOn.capture(v, self.irqchip))
            except BaseException:
                v.close()
                raise
            self.vcpus.append(v)

    def trap_msrs(self, indices: list[int]) -> None:
        """Send exactly these MSRs to user space (KVM_MSR_EXIT_REASON_FILTER exits), ahead
        or for the machine built on this VM (Machine.register_msr); a filter KVM holds
        already is not set again."""
        if not (self.kvm.check_extension(K.KVM_CAP_X86_USER_SPACE_MSR)
                and self.kvm.check_extension(K.KVM_CAP_X86_MSR_FILTER)):
            raise NotSupported("this host's KVM cannot trap MSRs to user space "
                               "(KVM_CAP_X86_USER_SPACE_MSR / KVM_CAP_X86_MSR_FILTER)")
        if not self.user_msrs:
            self.vm.enable_cap(K.KVM_CAP_X86_USER_SPACE_MSR, K.KVM_MSR_EXIT_REASON_FILTER)
            self.user_msrs = True
        self.vm.set_msr_filter(msr_filter_ranges(sorted(indices)))

    def close(self) -> None:
        """Release what was made, unless a Machine owns it now."""
        if not self.adopted:
            self.release()

    def release(self) -> None:
        """Release what was made, adopted or not (a Machine that failed to build on it)."""
        self.adopted = True     # nothing may adopt it after this
        for t in self.threads:
            t.cancel()
        self.owner.close()
        for v in self.vcpus:
            v.close()
        self.vm.close()


class ParkedThread(threading.Thread):
    """A thread started ahead that waits for its work. Handing it the work (``launch``)
    does not wait for a new thread to be scheduled, which ``Thread.start`` does: on a busy
    host that wait measured about 4 ms per thread. Ends without running anything once
    ``cancel``led."""

    def __init__(self) -> None:
        super().__init__(name="parked", daemon=True)
        self._go = threading.Event()
        self._work: Callable[[], object] | None = None
        self.start()

    def run(self) -> None:
        self._go.wait()
        work = self._work
        if work is not None:
            work()

    def launch(self, work: Callable[[], object], name: str) -> None:
        self.name = name
        self._work = work
        self._go.set()

    def cancel(self) -> None:
        self._go.set()


def check_vcpus(n: int) -> None:
    if not 1 <= n <= MAX_VCPUS:
        raise InvalidArgument(f"vcpus must be between 1 and {MAX_VCPUS}")


def vcpu_cpuid(entries: list[CpuidEntry], apic_id: int) -> list[CpuidEntry]:
    """The table as one vCPU sees it: its own initial APIC ID (KVM gives vCPU n the APIC ID
    n) in leaf 1 EBX[31:24] and as the x2APIC ID of the topology leaves (0xB, 0x1F) in EDX.
    An OS that compares a CPU's CPUID with the MADT (Linux's SMP bring-up) needs them."""
    out = []
    for e in entries:
        if e.function == 1:
            e = e.replace(ebx=(e.ebx & 0x00FFFFFF) | (apic_id & 0xFF) << 24)
        elif e.function in (0xB, 0x1F):
            e = e.replace(edx=apic_id)
        out.append(e)
    return out
