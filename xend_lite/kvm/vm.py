"""Vm: one KVM virtual machine fd. Made only by Kvm.create_vm()."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from xend_lite.kvm._ffi import ffi, lib
from xend_lite.kvm.errors import check
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

if TYPE_CHECKING:
    from xend_lite.kvm.system import Kvm
    from xend_lite.kvm.vcpu import Vcpu


class MsrFilterRange(Frozen):
    """Let KVM handle MSRs [base, base+nmsrs) for ``flags`` operations except where the
    bitmap bit is 0: those go to user space (with KVM_MSR_EXIT_REASON_FILTER enabled)."""

    __slots__ = ("flags", "base", "bitmap")
    flags: int
    base: int
    bitmap: bytes  # one bit per MSR, 1 = allow in kernel

    def __init__(self, flags: int, base: int, bitmap: bytes):
        _set(self, "flags", flags)
        _set(self, "base", base)
        _set(self, "bitmap", bitmap)

    @property
    def nmsrs(self) -> int:
        return len(self.bitmap) * 8


class Vm:
    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self._filter_keepalive: list = []
        self._msr_filter: tuple | None = None     # the filter KVM holds, as last set

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        return max(0, lib.xl_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap))

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        r = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": guest_phys_addr,
            "memory_size": memory_size, "userspace_addr": userspace_addr})
        check("KVM_SET_USER_MEMORY_REGION", lib.xl_ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, r))

    def set_tss_addr(self, addr: int) -> None:
        check("KVM_SET_TSS_ADDR", lib.xl_ioctl_int(self.fd, lib.KVM_SET_TSS_ADDR, addr))

    def set_identity_map_addr(self, addr: int) -> None:
        p = ffi.new("uint64_t *", addr)
        check("KVM_SET_IDENTITY_MAP_ADDR", lib.xl_ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, p))

    def create_irqchip(self) -> None:
        check("KVM_CREATE_IRQCHIP", lib.xl_ioctl_int(self.fd, lib.KVM_CREATE_IRQCHIP, 0))

    def create_pit2(self, flags: int = 0) -> None:
        c = ffi.new("struct kvm_pit_config *", {"flags": flags})
        check("KVM_CREATE_PIT2", lib.xl_ioctl(self.fd, lib.KVM_CREATE_PIT2, c))

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        c = ffi.new("struct kvm_enable_cap *", {"cap": cap, "flags": flags})
        for i, a in enumerate(args):
            c.args[i] = a
        check("KVM_ENABLE_CAP", lib.xl_ioctl(self.fd, lib.KVM_ENABLE_CAP, c))

    def set_msr_filter(self, ranges: list[MsrFilterRange], default_deny: bool = False) -> None:
        """Set the MSR filter; the one KVM holds already is not set again (KVM waits for an
        SRCU grace period on every change: up to 16 ms measured on these hosts)."""
        if len(ranges) > lib.KVM_MSR_FILTER_MAX_RANGES:
            raise ValueError("too many MSR filter ranges")
        key = (tuple(ranges), default_deny)
        if key == self._msr_filter:
            return
        f = ffi.new("struct kvm_msr_filter *")
        f.flags = lib.KVM_MSR_FILTER_DEFAULT_DENY if default_deny else lib.KVM_MSR_FILTER_DEFAULT_ALLOW
        keep = []
        for i, r in enumerate(ranges):
            bm = ffi.new("__u8[]", r.bitmap)
            keep.append(bm)
            f.ranges[i].flags = r.flags
            f.ranges[i].nmsrs = r.nmsrs
            f.ranges[i].base = r.base
            f.ranges[i].bitmap = bm
        self._msr_filter = None      # unknown if the call fails
        check("KVM_X86_SET_MSR_FILTER", lib.xl_ioctl(self.fd, lib.KVM_X86_SET_MSR_FILTER, f))
        self._filter_keepalive = keep
        self._msr_filter = key

    def _get_blob(self, name: str, req: int, ctype: str, init: dict | None = None) -> bytes:
        p = ffi.new(ctype + " *", init) if init else ffi.new(ctype + " *")
        check(name, lib.xl_ioctl(self.fd, req, p))
        return bytes(ffi.buffer(p))

    def _set_blob(self, name: str, req: int, ctype: str, blob: bytes) -> None:
        p = ffi.new(ctype + " *")
        if len(blob) != ffi.sizeof(p[0]):
            raise ValueError(f"{name}: state blob is {len(blob)} bytes, expected {ffi.sizeof(p[0])}")
        ffi.memmove(p, blob, len(blob))
        check(name, lib.xl_ioctl(self.fd, req, p))

    def get_irqchip(self, chip_id: int) -> bytes:
        return self._get_blob("KVM_GET_IRQCHIP", lib.KVM_GET_IRQCHIP, "struct kvm_irqchip",
                              {"chip_id": chip_id})

    def set_irqchip(self, blob: bytes) -> None:
        self._set_blob("KVM_SET_IRQCHIP", lib.KVM_SET_IRQCHIP, "struct kvm_irqchip", blob)

    def get_pit2(self) -> bytes:
        return self._get_blob("KVM_GET_PIT2", lib.KVM_GET_PIT2, "struct kvm_pit_state2")

    def set_pit2(self, blob: bytes) -> None:
        self._set_blob("KVM_SET_PIT2", lib.KVM_SET_PIT2, "struct kvm_pit_state2", blob)

    def get_clock(self) -> tuple[int, int]:
        c = ffi.new("struct kvm_clock_data *")
        check("KVM_GET_CLOCK", lib.xl_ioctl(self.fd, lib.KVM_GET_CLOCK, c))
        return c.clock, c.flags

    def set_clock(self, clock: int) -> None:
        c = ffi.new("struct kvm_clock_data *", {"clock": clock})
        check("KVM_SET_CLOCK", lib.xl_ioctl(self.fd, lib.KVM_SET_CLOCK, c))

    def irq_line(self, irq: int, level: int) -> None:
        p = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        check("KVM_IRQ_LINE", lib.xl_ioctl(self.fd, lib.KVM_IRQ_LINE, p))

    def signal_msi(self, address: int, data: int) -> int:
        m = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFFFFFF,
                                         "address_hi": address >> 32, "data": data})
        return check("KVM_SIGNAL_MSI", lib.xl_ioctl(self.fd, lib.KVM_SIGNAL_MSI, m))

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        from xend_lite.kvm.vcpu import Vcpu

        fd = check("KVM_CREATE_VCPU", lib.xl_ioctl_int(self.fd, lib.KVM_CREATE_VCPU, vcpu_id))
        return Vcpu(self, vcpu_id, fd)
