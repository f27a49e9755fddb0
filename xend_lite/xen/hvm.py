"""HVM params, the event-channel upcall (how a pending event interrupts a vCPU), and hvm_op.

The upcall is the vector a vCPU registered with HVMOP_set_evtchn_upcall_vector, else the one
HVM_PARAM_CALLBACK_IRQ names (a vector, or a GSI for vCPU 0), delivered through the in-kernel
local APIC as an MSI or through the IOAPIC.
"""

from __future__ import annotations

import logging
from collections.abc import MutableSet
from typing import TYPE_CHECKING, Callable

from xend_lite.kvm import KvmError
from xend_lite.xen.errors import XenError, inval
from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.kvm import Vm
    from xend_lite.xen.hypercall import Call
    from xend_lite.xen.overlay import OverlayDevice
    from xend_lite.xen.timekeeping import Clock

log = logging.getLogger("xend_lite.xen")

U32 = (1 << 32) - 1
# The HVM params a guest may read on itself, as Xen lets it. For a PVH domain these hold
# 0 except the ones we serve (callback, store, console) and X87_FIP_WIDTH: VM86_TSS(_SIZED)
# (real-mode helper, which KVM does itself), ACPI_IOPORTS_LOCATION (no ACPI PM timer),
# VM_GENERATION_ID_ADDR (set only by a guest's firmware) and ALTP2M (off).
GUEST_READABLE = frozenset({
    X.HVM_PARAM_CALLBACK_IRQ, X.HVM_PARAM_VM86_TSS, X.HVM_PARAM_VM86_TSS_SIZED,
    X.HVM_PARAM_ACPI_IOPORTS_LOCATION, X.HVM_PARAM_VM_GENERATION_ID_ADDR,
    X.HVM_PARAM_STORE_PFN, X.HVM_PARAM_STORE_EVTCHN, X.HVM_PARAM_CONSOLE_PFN,
    X.HVM_PARAM_CONSOLE_EVTCHN, X.HVM_PARAM_ALTP2M, X.HVM_PARAM_X87_FIP_WIDTH})
GUEST_WRITABLE = frozenset({
    X.HVM_PARAM_CALLBACK_IRQ, X.HVM_PARAM_VM86_TSS, X.HVM_PARAM_VM86_TSS_SIZED,
    X.HVM_PARAM_ACPI_IOPORTS_LOCATION, X.HVM_PARAM_VM_GENERATION_ID_ADDR,
    X.HVM_PARAM_STORE_EVTCHN, X.HVM_PARAM_CONSOLE_EVTCHN, X.HVM_PARAM_X87_FIP_WIDTH})
# Deprecated, "meaning undefined" (params.h, visible only to Xen and its tools): -EOPNOTSUPP
# to anyone. PAE_ENABLED, DM_DOMAIN, MEMORY_EVENT_CR0/CR3/CR4/INT3, NESTEDHVM,
# MEMORY_EVENT_SINGLE_STEP, BUFIOREQ_EVTCHN, MEMORY_EVENT_MSR.
DEPRECATED = frozenset({4, 13, 20, 21, 22, 23, 24, 25, 26, 30})
# The x87 FIP/FDP width the vCPU state keeps: KVM saves the FPU in the 64-bit XSAVE layout,
# full 64-bit FIP/FDP and no FCS/FDS, which is what 8 means; 4 and 0 are not offered.
X87_FIP_WIDTH = 8
X87_FIP_WIDTHS = (0, 4, 8)

MIN_VECTOR = 0x10
IOAPIC_PINS = 24
MSI_BASE = 0xFEE00000
# how an upcall reaches a vCPU (Upcalls.route)
ROUTE_NONE, ROUTE_MSI, ROUTE_GSI = 0, 1, 2


def self_domain(domid: int, own: int) -> None:
    """Xen's rcu_lock_domain_by_any_id plus the XSM check for an unprivileged caller."""
    if domid in (X.DOMID_SELF, own):
        return
    if domid == 0:
        raise XenError(X.XEN_EPERM, "not allowed on domain 0")
    raise XenError(X.XEN_ESRCH, f"no domain {domid}")


class Upcalls:
    """Delivers the event-channel upcall to a vCPU: its own vector (HVMOP_set_evtchn_upcall_vector),
    else the domain's callback (HVM_PARAM_CALLBACK_IRQ: a vector or a GSI).

    A vector goes through the in-kernel local APIC as an MSI. KVM drops a fixed interrupt
    while the target's APIC is software-disabled, where Xen's emulated APIC keeps it in IRR
    until the guest enables it; so an upcall KVM did not take is remembered and tried again
    on the vCPU's next event and on every ``retry_all`` (the timer thread's tick) until taken
    or no longer flagged.
    """

    def __init__(self, vm: Vm, params: dict[int, int], pending: Callable[[int], bool],
                 untaken: MutableSet[int] | None = None):
        self.vm = vm
        self.params = params                       # the domain's HVM params (shared dict)
        self.vectors: dict[int, int] = {}          # vcpu -> vector (HVMOP_set_evtchn_upcall_vector)
        self.pending = pending                     # vcpu -> its evtchn_upcall_pending flag
        # vCPUs whose last upcall KVM did not take (native.UntakenFlags when events are also
        # delivered natively, which write it too)
        self.untaken: MutableSet[int] = set() if untaken is None else untaken
        self.on_change: Callable[[], None] = lambda: None   # a vector or the callback changed

    def changed(self) -> None:
        """A vector or the callback param changed (whoever changed it calls this)."""
        self.on_change()

    def reassert(self, vcpu: int) -> None:
        """A new way of delivery (a vector just set): an upcall already flagged is
        delivered through it, as Xen asserts the upcall when the vector changes."""
        if self.pending(vcpu):
            self.inject(vcpu)

    def retry(self, vcpu: int) -> None:
        """Deliver again an upcall still flagged that KVM did not take."""
        if vcpu in self.untaken:
            if self.pending(vcpu):
                self.inject(vcpu)
            else:
                self.untaken.discard(vcpu)

    def retry_all(self) -> None:
        for vcpu in list(self.untaken):
            self.retry(vcpu)

    def route(self, vcpu: int) -> tuple[int, int]:
        """(ROUTE_*, vector or GSI): the vCPU's own vector, else the callback's vector, else
        the callback's GSI (vCPU 0 only), else nowhere."""
        vector = self.vectors.get(vcpu)
        via = self.params.get(X.HVM_PARAM_CALLBACK_IRQ, 0)
        kind = via >> 56
        if vector is None and kind == X.HVM_PARAM_CALLBACK_TYPE_VECTOR:
            vector = via & 0xFF
        if vector is not None and vector >= MIN_VECTOR:
            return ROUTE_MSI, vector
        if kind == X.HVM_PARAM_CALLBACK_TYPE_GSI and vcpu == 0 and 0 < (via & U32) < IOAPIC_PINS:
            return ROUTE_GSI, via & U32
        return ROUTE_NONE, 0

    def inject(self, vcpu: int) -> None:
        route, value = self.route(vcpu)
        try:
            if route == ROUTE_MSI:
                if self.vm.signal_msi(MSI_BASE | (vcpu & 0xFF) << 12, value) > 0:
                    self.untaken.discard(vcpu)
                else:
                    self.untaken.add(vcpu)
            elif route == ROUTE_GSI:
                self.vm.irq_line(value, 1)
                self.vm.irq_line(value, 0)
        except KvmError as exc:
            log.warning("upcall to vcpu%d failed: %s", vcpu, exc)


class HvmOps:
    """hvm_op: params, the upcall vector, time, TLB flushes."""

    def __init__(self, domid: int, nr_vcpus: int, params: dict[int, int], upcalls: Upcalls,
                 overlay: OverlayDevice, clock: Clock):
        self.domid = domid
        self.nr_vcpus = nr_vcpus
        self.params = params
        self.upcalls = upcalls
        self.overlay = overlay
        self.clock = clock

    def hvm_op(self, c: Call, op: int, arg: int) -> int:
        if op in (X.HVMOP_set_param, X.HVMOP_get_param):
            return self._param(c, op, arg)
        if op == X.HVMOP_set_evtchn_upcall_vector:
            u = c.read("xen_hvm_evtchn_upcall_vector", arg)
            if u["vector"] < MIN_VECTOR:
                raise inval("vector below 0x10")
            if u["vcpu"] >= self.nr_vcpus:
                raise XenError(X.XEN_ENOENT, "no such vcpu")
            self.upcalls.vectors[u["vcpu"]] = u["vector"]
            self.upcalls.changed()
            self.upcalls.reassert(u["vcpu"])
            return 0
        if op == X.HVMOP_get_time:
            c.view.write_uint(arg, 8, self.clock.now())
            return 0
        if op == X.HVMOP_flush_tlbs:
            if arg:
                raise inval("flush_tlbs takes no argument")
            return 0
        if op == X.HVMOP_pagetable_dying:
            raise XenError(X.XEN_ENOSYS, "shadow paging hint not used")
        raise XenError(X.XEN_ENOSYS, "unknown hvm_op")

    def _param(self, c: Call, op: int, arg: int) -> int:
        lay = c.lay("xen_hvm_param")
        p = c.view.read_struct(lay, arg)
        index = p["index"]
        if index >= X.HVM_NR_PARAMS:
            raise inval("no such HVM param")
        self_domain(p["domid"], self.domid)
        if index in DEPRECATED:
            raise XenError(X.XEN_EOPNOTSUPP, "deprecated HVM param")
        if op == X.HVMOP_get_param:
            if index not in GUEST_READABLE:
                raise XenError(X.XEN_EPERM, "param is the toolstack's")
            value = X87_FIP_WIDTH if index == X.HVM_PARAM_X87_FIP_WIDTH \
                else self.params.get(index, 0)
            c.view.write_fields(lay, arg, {"value": value})
            return 0
        if index not in GUEST_WRITABLE:
            raise XenError(X.XEN_EPERM, "param is the toolstack's")
        value = p["value"]
        if index == X.HVM_PARAM_CALLBACK_IRQ:
            if value >> 56 > X.HVM_PARAM_CALLBACK_TYPE_VECTOR:
                raise inval("unknown callback type")
            self.overlay.long_mode = c.vcpu.in_long_mode()
        elif index == X.HVM_PARAM_ACPI_IOPORTS_LOCATION:
            raise XenError(X.XEN_ENODEV, "no ACPI PM timer to move")
        elif index == X.HVM_PARAM_X87_FIP_WIDTH:
            if value not in X87_FIP_WIDTHS:
                raise inval("x87 FIP width is 0, 4 or 8")
            if value != X87_FIP_WIDTH:
                raise XenError(X.XEN_EOPNOTSUPP, "the FPU state keeps 64-bit FIP/FDP only")
            return 0
        self.params[index] = value
        if index == X.HVM_PARAM_CALLBACK_IRQ:
            self.upcalls.changed()
            self.upcalls.reassert(0)
        return 0
