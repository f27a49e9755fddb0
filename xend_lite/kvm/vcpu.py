"""Vcpu: one KVM vCPU fd and its kvm_run mapping. Made only by Vm.create_vcpu().

All calls except kick() belong to the thread that runs the vCPU (KVM requires the vCPU
ioctls to come from one thread at a time; register access happens while it is not running).
"""

from __future__ import annotations

import mmap
import os
import signal
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable

from xend_lite.kvm import exits
from xend_lite.kvm._ffi import ffi, lib
from xend_lite.kvm.errors import KvmError, check

if TYPE_CHECKING:
    from xend_lite.kvm.vm import Vm

SYNC_REGS = lib.KVM_SYNC_X86_REGS
SYNC_SREGS = lib.KVM_SYNC_X86_SREGS
SYNC_EVENTS = lib.KVM_SYNC_X86_EVENTS
#: run_raw() puts (port + 1) here for a port write.
PORT_SHIFT = 32
_xl_run = lib.xl_run
_xl_set_rax = lib.xl_set_rax
_xl_run_call = lib.xl_run_call
#: exit_call() flags: the caller was in 64-bit mode / was not the guest kernel
CALL_LONG = lib.XL_CALL_LONG
CALL_USER = lib.XL_CALL_USER
_unpack = ffi.unpack
_EINTR = 4
_EAGAIN = 11

_KICK_SIGNAL: int | None = None


def kick_signal() -> int:
    """The real-time signal used to kick vCPU threads out of KVM_RUN (handler installed once)."""
    global _KICK_SIGNAL
    if _KICK_SIGNAL is None:
        sig = lib.xl_sigrtmin() + 3
        check("sigaction", lib.xl_install_kick_handler(sig))
        _KICK_SIGNAL = sig
    return _KICK_SIGNAL


@dataclass(slots=True)
class Regs:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 2


REG_NAMES = tuple(f.name for f in fields(Regs))


@dataclass(slots=True)
class Segment:
    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the kernel's name
    g: int = 0
    avl: int = 0
    unusable: int = 0


SEG_FIELDS = tuple(f.name for f in fields(Segment))
SEG_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass(slots=True)
class Dtable:
    base: int = 0
    limit: int = 0


@dataclass(slots=True)
class Sregs:
    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: Dtable = field(default_factory=Dtable)
    idt: Dtable = field(default_factory=Dtable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, ...] = (0, 0, 0, 0)


def sregs_from_c(c) -> Sregs:
    s = Sregs()
    for name in SEG_NAMES:
        cs = getattr(c, name)
        setattr(s, name, Segment(*(getattr(cs, f) for f in SEG_FIELDS)))
    s.gdt = Dtable(c.gdt.base, c.gdt.limit)
    s.idt = Dtable(c.idt.base, c.idt.limit)
    s.cr0, s.cr2, s.cr3, s.cr4, s.cr8 = c.cr0, c.cr2, c.cr3, c.cr4, c.cr8
    s.efer, s.apic_base = c.efer, c.apic_base
    s.interrupt_bitmap = tuple(c.interrupt_bitmap)
    return s


def sregs_to_c(s: Sregs, c) -> None:
    for name in SEG_NAMES:
        seg = getattr(s, name)
        cs = getattr(c, name)
        for f in SEG_FIELDS:
            setattr(cs, f, getattr(seg, f))
    c.gdt.base, c.gdt.limit = s.gdt.base, s.gdt.limit
    c.idt.base, c.idt.limit = s.idt.base, s.idt.limit
    c.cr0, c.cr2, c.cr3, c.cr4, c.cr8 = s.cr0, s.cr2, s.cr3, s.cr4, s.cr8
    c.efer, c.apic_base = s.efer, s.apic_base
    for i, v in enumerate(s.interrupt_bitmap):
        c.interrupt_bitmap[i] = v


@dataclass(frozen=True, slots=True)
class Translation:
    physical_address: int
    valid: bool
    writeable: bool
    usermode: bool


class Vcpu:
    def __init__(self, vm: Vm, vcpu_id: int, fd: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        size = vm.kvm.vcpu_mmap_size()
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise KvmError("mmap kvm_run", exc.errno or 0) from exc
        self._run_buf = ffi.from_buffer(self._map)
        self.run_struct = ffi.cast("struct kvm_run *", self._run_buf)
        self._valid_regs = 0
        self._run_req = lib.KVM_RUN
        self._args_buf = ffi.new("uint64_t[7]")
        # Registers as KVM_CAP_SYNC_REGS delivers them (valid after run() when enabled).
        self.sync_regs = self.run_struct.s.regs.regs
        self.sync_sregs = self.run_struct.s.regs.sregs

    def close(self) -> None:
        if self.fd >= 0:
            self.run_struct = None
            self.sync_regs = self.sync_sregs = None
            self._run_buf = None
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the fd close below still frees
                pass
            os.close(self.fd)
            self.fd = -1

    # -- running -------------------------------------------------------------------------

    def enable_sync_regs(self, mask: int) -> None:
        """Ask KVM to copy these register sets into kvm_run on every exit."""
        self._valid_regs = mask
        self.run_struct.kvm_valid_regs = mask  # KVM never clears it

    def mark_regs_dirty(self, mask: int = SYNC_REGS) -> None:
        """Have KVM load the synced registers back on the next run()."""
        self.run_struct.kvm_dirty_regs |= mask

    def run_raw(self) -> int:
        """KVM_RUN once (the GIL is released meanwhile), for the vCPU loop's hot path.

        Returns -1 when KVM_RUN was interrupted (a kick or immediate_exit); otherwise the
        exit reason, with (port + 1) << 32 added for a port write (see PORT_SHIFT)."""
        ret = _xl_run(self.fd, self.run_struct)
        if ret < 0:
            if ret == -_EINTR or ret == -_EAGAIN:
                return -1
            raise KvmError("KVM_RUN", -ret)
        return ret

    def run_fns(self) -> tuple[Callable[[], int], Callable[[int], int]]:
        """Two KVM_RUNs for a hot loop, bound to this vCPU with no Python frame per call:
        ``run()`` and ``run_result(rax)``, which first gives the guest ``rax`` (an unsigned
        64-bit value) as the result of the call exit_call() described, truncated to 32 bits
        for a caller that was not in 64-bit mode. Both return what run_raw() does, except
        that an error comes back as -errno (-EINTR / -EAGAIN for an interruption) instead
        of raising. On a port write they also keep the call exit_call() returns. Needs
        SYNC_REGS and SYNC_SREGS."""
        import functools

        return (functools.partial(_xl_run_call, self.fd, self.run_struct, self._args_buf, 0, 0),
                functools.partial(_xl_run_call, self.fd, self.run_struct, self._args_buf, 1))

    def exit_call(self) -> list[int]:
        """The call made by the port write a run_fns() KVM_RUN exited on, with no further C
        call (valid only in a handler for that exit): [number (EAX), CALL_* flags, five
        arguments in the caller's convention (64-bit: RDI RSI RDX R10 R8; 32-bit: EBX ECX
        EDX ESI EDI)]."""
        return _unpack(self._args_buf, 7)

    def set_call_result(self, rax: int) -> None:
        """What run_result(rax) does before it runs: RAX for the call exit_call() describes."""
        lib.xl_set_call_result(self.run_struct, self._args_buf, rax & 0xFFFFFFFFFFFFFFFF)

    def set_rax(self, value: int) -> None:
        """Set the guest's RAX through the synced registers (applied on the next run)."""
        _xl_set_rax(self.run_struct, value & 0xFFFFFFFFFFFFFFFF)

    def decode_exit(self) -> exits.Exit:
        """The last exit as a typed value."""
        return exits.decode(self.run_struct, self._map)

    def run(self) -> exits.Exit:
        """KVM_RUN once and decode the exit."""
        if self.run_raw() == -1:
            return exits.INTERRUPTED
        return exits.decode(self.run_struct, self._map)

    def set_immediate_exit(self, on: bool) -> None:
        self.run_struct.immediate_exit = 1 if on else 0

    @staticmethod
    def kick(thread_ident: int) -> None:
        """Interrupt KVM_RUN on the thread ``thread_ident`` (set immediate_exit first)."""
        signal.pthread_kill(thread_ident, kick_signal())

    def complete_io_in(self, data: bytes) -> None:
        io = self.run_struct.io
        n = io.size * io.count
        off = io.data_offset
        self._map[off:off + n] = data[:n].ljust(n, b"\xff")

    def complete_mmio_read(self, data: bytes) -> None:
        m = self.run_struct.mmio
        n = m.len
        ffi.memmove(m.data, data[:n].ljust(n, b"\xff"), n)

    def complete_msr(self, value: int = 0, fault: bool = False) -> None:
        m = self.run_struct.msr
        m.error = 1 if fault else 0
        m.data = value & 0xFFFFFFFFFFFFFFFF

    def flush_dirty_regs(self) -> None:
        """Apply synced registers marked dirty now, so ioctls like KVM_GET_REGS see them."""
        run = self.run_struct
        if run.kvm_dirty_regs & SYNC_REGS:
            check("KVM_SET_REGS", lib.xl_ioctl(self.fd, lib.KVM_SET_REGS, ffi.addressof(run.s.regs.regs)))
        if run.kvm_dirty_regs & SYNC_SREGS:
            check("KVM_SET_SREGS", lib.xl_ioctl(self.fd, lib.KVM_SET_SREGS, ffi.addressof(run.s.regs.sregs)))
        run.kvm_dirty_regs = 0

    # -- registers -----------------------------------------------------------------------

    def get_regs(self) -> Regs:
        c = ffi.new("struct kvm_regs *")
        check("KVM_GET_REGS", lib.xl_ioctl(self.fd, lib.KVM_GET_REGS, c))
        return Regs(*(getattr(c, n) for n in REG_NAMES))

    def set_regs(self, regs: Regs) -> None:
        c = ffi.new("struct kvm_regs *")
        for n in REG_NAMES:
            setattr(c, n, getattr(regs, n) & 0xFFFFFFFFFFFFFFFF)
        check("KVM_SET_REGS", lib.xl_ioctl(self.fd, lib.KVM_SET_REGS, c))

    def get_sregs(self) -> Sregs:
        c = ffi.new("struct kvm_sregs *")
        check("KVM_GET_SREGS", lib.xl_ioctl(self.fd, lib.KVM_GET_SREGS, c))
        return sregs_from_c(c)

    def set_sregs(self, sregs: Sregs) -> None:
        c = ffi.new("struct kvm_sregs *")
        sregs_to_c(sregs, c)
        check("KVM_SET_SREGS", lib.xl_ioctl(self.fd, lib.KVM_SET_SREGS, c))

    def translate(self, linear_address: int) -> Translation:
        t = ffi.new("struct kvm_translation *", {"linear_address": linear_address})
        check("KVM_TRANSLATE", lib.xl_ioctl(self.fd, lib.KVM_TRANSLATE, t))
        return Translation(t.physical_address, bool(t.valid), bool(t.writeable), bool(t.usermode))

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        n = len(indices)
        m = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, idx in enumerate(indices):
            m.entries[i].index = idx
        got = check("KVM_GET_MSRS", lib.xl_ioctl(self.fd, lib.KVM_GET_MSRS, m))
        return {m.entries[i].index: m.entries[i].data for i in range(got)}

    def set_msrs(self, values: dict[int, int]) -> int:
        n = len(values)
        m = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, (idx, val) in enumerate(values.items()):
            m.entries[i].index = idx
            m.entries[i].data = val & 0xFFFFFFFFFFFFFFFF
        return check("KVM_SET_MSRS", lib.xl_ioctl(self.fd, lib.KVM_SET_MSRS, m))

    def get_mp_state(self) -> int:
        s = ffi.new("struct kvm_mp_state *")
        check("KVM_GET_MP_STATE", lib.xl_ioctl(self.fd, lib.KVM_GET_MP_STATE, s))
        return s.mp_state

    def set_mp_state(self, state: int) -> None:
        s = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        check("KVM_SET_MP_STATE", lib.xl_ioctl(self.fd, lib.KVM_SET_MP_STATE, s))

    def set_cpuid2(self, entries) -> None:
        """Install CPUID leaves: an iterable of objects with function/index/flags/eax..edx."""
        entries = list(entries)
        n = len(entries)
        c = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
        for i, e in enumerate(entries):
            d = c.entries[i]
            d.function, d.index, d.flags = e.function, e.index, e.flags
            d.eax, d.ebx, d.ecx, d.edx = e.eax, e.ebx, e.ecx, e.edx
        check("KVM_SET_CPUID2", lib.xl_ioctl(self.fd, lib.KVM_SET_CPUID2, c))

    def get_tsc_khz(self) -> int:
        return check("KVM_GET_TSC_KHZ", lib.xl_ioctl_int(self.fd, lib.KVM_GET_TSC_KHZ, 0))

    # Opaque state blobs: saved and restored as bytes of the kernel's own layout.
    def _get_blob(self, name: str, req: int, ctype: str) -> bytes:
        p = ffi.new(ctype + " *")
        check(name, lib.xl_ioctl(self.fd, req, p))
        return bytes(ffi.buffer(p))

    def _set_blob(self, name: str, req: int, ctype: str, blob: bytes) -> None:
        p = ffi.new(ctype + " *")
        if len(blob) != ffi.sizeof(p[0]):
            raise ValueError(f"{name}: state blob is {len(blob)} bytes, expected {ffi.sizeof(p[0])}")
        ffi.memmove(p, blob, len(blob))
        check(name, lib.xl_ioctl(self.fd, req, p))

    def get_fpu(self) -> bytes:
        return self._get_blob("KVM_GET_FPU", lib.KVM_GET_FPU, "struct kvm_fpu")

    def set_fpu(self, blob: bytes) -> None:
        self._set_blob("KVM_SET_FPU", lib.KVM_SET_FPU, "struct kvm_fpu", blob)

    def get_xsave(self) -> bytes:
        return self._get_blob("KVM_GET_XSAVE", lib.KVM_GET_XSAVE, "struct kvm_xsave")

    def set_xsave(self, blob: bytes) -> None:
        self._set_blob("KVM_SET_XSAVE", lib.KVM_SET_XSAVE, "struct kvm_xsave", blob)

    def get_xcrs(self) -> bytes:
        return self._get_blob("KVM_GET_XCRS", lib.KVM_GET_XCRS, "struct kvm_xcrs")

    def set_xcrs(self, blob: bytes) -> None:
        self._set_blob("KVM_SET_XCRS", lib.KVM_SET_XCRS, "struct kvm_xcrs", blob)

    def get_lapic(self) -> bytes:
        return self._get_blob("KVM_GET_LAPIC", lib.KVM_GET_LAPIC, "struct kvm_lapic_state")

    def set_lapic(self, blob: bytes) -> None:
        self._set_blob("KVM_SET_LAPIC", lib.KVM_SET_LAPIC, "struct kvm_lapic_state", blob)

    def get_vcpu_events(self) -> bytes:
        return self._get_blob("KVM_GET_VCPU_EVENTS", lib.KVM_GET_VCPU_EVENTS, "struct kvm_vcpu_events")

    def set_vcpu_events(self, blob: bytes) -> None:
        self._set_blob("KVM_SET_VCPU_EVENTS", lib.KVM_SET_VCPU_EVENTS, "struct kvm_vcpu_events", blob)

    def get_debugregs(self) -> bytes:
        return self._get_blob("KVM_GET_DEBUGREGS", lib.KVM_GET_DEBUGREGS, "struct kvm_debugregs")

    def set_debugregs(self, blob: bytes) -> None:
        self._set_blob("KVM_SET_DEBUGREGS", lib.KVM_SET_DEBUGREGS, "struct kvm_debugregs", blob)

    def interrupt(self, vector: int) -> None:
        """Inject an external interrupt (only without an in-kernel irqchip)."""
        p = ffi.new("struct kvm_interrupt *", {"irq": vector})
        check("KVM_INTERRUPT", lib.xl_ioctl(self.fd, lib.KVM_INTERRUPT, p))
