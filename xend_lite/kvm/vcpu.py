"""Vcpu: one KVM vCPU fd and its kvm_run mapping. Made only by Vm.create_vcpu().

All calls except kick() belong to the thread that runs the vCPU (KVM requires the vCPU
ioctls to come from one thread at a time; register access happens while it is not running).
"""

from __future__ import annotations

import functools
import mmap
import os
import signal
from typing import TYPE_CHECKING, Callable

from xend_lite.kvm import exits
from xend_lite.kvm._ffi import ffi, lib
from xend_lite.kvm.errors import KvmError, check
from xend_lite.kvm.regs import (Regs, Sregs, Translation, regs_from_c, regs_to_c, sregs_from_c,
                                sregs_to_c)

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
_unpack = ffi.unpack
#: the words a port hook shares with the run loop (see run_fns); the last is the loop's count
#: of the exits the hook served
HOOK_WORDS = 8
_HOOK_SERVED = lib.XL_HOOK_SERVED
EFER_LMA = 1 << 10
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
        self._run = ffi.cast("struct kvm_run *", self._run_buf)
        self._hook_buf = ffi.new("uint64_t[]", HOOK_WORDS)
        # the registers KVM_CAP_SYNC_REGS copies into kvm_run on every exit (when enabled)
        self._sregs = self._run.s.regs.regs
        self._ssregs = self._run.s.regs.sregs

    def close(self) -> None:
        if self.fd >= 0:
            self._run = self._sregs = self._ssregs = None
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
        self._run.kvm_valid_regs = mask  # KVM never clears it

    def run_raw(self) -> int:
        """KVM_RUN once (the GIL is released meanwhile).

        Returns -1 when KVM_RUN was interrupted (a kick or immediate_exit); otherwise the
        exit reason, with (port + 1) << 32 added for a port write (see PORT_SHIFT)."""
        ret = _xl_run(self.fd, self._run)
        if ret < 0:
            if ret == -_EINTR or ret == -_EAGAIN:
                return -1
            raise KvmError("KVM_RUN", -ret)
        return ret

    def run_fns(self, hook: int = 0, hook_port: int = -1,
                hook_ctx: int = 0) -> tuple[Callable[[], int], Callable[[int], int]]:
        """Two KVM_RUNs for a hot loop, bound to this vCPU with no Python frame per call:
        ``run()`` and ``run_result(rax)``, which first sets the guest's RAX to ``rax`` (an
        unsigned 64-bit value). Both return what run_raw() does, except that an error comes
        back as -errno (-EINTR / -EAGAIN for an interruption) instead of raising.

        ``hook`` is the address of a C function ``int hook(void *kvm_run, uint64_t *out,
        void *ctx)`` (another layer's native code, e.g. Xen's hypercalls), called with
        ``hook_ctx`` after each write to ``hook_port``: it either serves the write (returns 1
        with the guest's RAX in out[0]; the guest runs on within the same C call, so such
        exits never reach Python: hook_served() counts them) or fills the words
        hook_values() returns (returns 0)."""
        return (functools.partial(_xl_run_call, self.fd, self._run, self._hook_buf, hook, hook_ctx,
                                  hook_port, 0, 0),
                functools.partial(_xl_run_call, self.fd, self._run, self._hook_buf, hook, hook_ctx,
                                  hook_port, 1))

    def hook_served(self) -> int:
        """How many exits the port hook has served in C (they never reached Python)."""
        return self._hook_buf[_HOOK_SERVED]

    def hook_values(self, n: int = HOOK_WORDS) -> list[int]:
        """The first ``n`` words the port hook filled at the last exit (see run_fns)."""
        return _unpack(self._hook_buf, n)

    def exit_port(self) -> int:
        """The port of the last port-I/O exit."""
        return self._run.io.port

    def set_rax(self, value: int) -> None:
        """Set the guest's RAX through the synced registers (applied on the next run)."""
        _xl_set_rax(self._run, value & 0xFFFFFFFFFFFFFFFF)

    def decode_exit(self) -> exits.Exit:
        """The last exit as a typed value."""
        return exits.decode(self._run, self._map)

    def run(self) -> exits.Exit:
        """KVM_RUN once and decode the exit."""
        if self.run_raw() == -1:
            return exits.INTERRUPTED
        return exits.decode(self._run, self._map)

    def set_immediate_exit(self, on: bool) -> None:
        self._run.immediate_exit = 1 if on else 0

    @staticmethod
    def kick(thread_ident: int) -> None:
        """Interrupt KVM_RUN on the thread ``thread_ident`` (set immediate_exit first)."""
        signal.pthread_kill(thread_ident, kick_signal())

    def complete_io_in(self, data: bytes) -> None:
        io = self._run.io
        n = io.size * io.count
        off = io.data_offset
        self._map[off:off + n] = data[:n].ljust(n, b"\xff")

    def complete_mmio_read(self, data: bytes) -> None:
        m = self._run.mmio
        n = m.len
        ffi.memmove(m.data, data[:n].ljust(n, b"\xff"), n)

    def complete_msr(self, value: int = 0, fault: bool = False) -> None:
        m = self._run.msr
        m.error = 1 if fault else 0
        m.data = value & 0xFFFFFFFFFFFFFFFF

    # -- the synced copy of the registers (valid after an exit with sync regs enabled) ----

    def synced_regs(self) -> Regs:
        return regs_from_c(self._sregs)

    def set_synced_regs(self, regs: Regs) -> None:
        """Replace the synced general registers; KVM loads them on the next run."""
        regs_to_c(regs, self._sregs)
        self._run.kvm_dirty_regs |= SYNC_REGS

    def synced_sregs(self) -> Sregs:
        return sregs_from_c(self._ssregs)

    def set_synced_sregs(self, sregs: Sregs) -> None:
        """Replace the synced segment and control registers; KVM loads them on the next run."""
        sregs_to_c(sregs, self._ssregs)
        self._run.kvm_dirty_regs |= SYNC_SREGS

    def synced_rax(self) -> int:
        return self._sregs.rax

    def synced_rip(self) -> int:
        return self._sregs.rip

    def synced_rflags(self) -> int:
        return self._sregs.rflags

    def synced_cr0(self) -> int:
        return self._ssregs.cr0

    def synced_efer(self) -> int:
        return self._ssregs.efer

    def in_long_mode(self) -> bool:
        """EFER.LMA in the synced copy: the vCPU runs in long mode."""
        return bool(self._ssregs.efer & EFER_LMA)

    def flush_dirty_regs(self) -> None:
        """Apply synced registers marked dirty now, so ioctls like KVM_GET_REGS see them."""
        run = self._run
        if run.kvm_dirty_regs & SYNC_REGS:
            check("KVM_SET_REGS", lib.xl_ioctl(self.fd, lib.KVM_SET_REGS, ffi.addressof(run.s.regs.regs)))
        if run.kvm_dirty_regs & SYNC_SREGS:
            check("KVM_SET_SREGS", lib.xl_ioctl(self.fd, lib.KVM_SET_SREGS, ffi.addressof(run.s.regs.sregs)))
        run.kvm_dirty_regs = 0

    def discard_dirty_regs(self) -> None:
        """Forget synced registers marked dirty (the state is about to be replaced)."""
        self._run.kvm_dirty_regs = 0

    def reload_synced(self) -> None:
        """Copy the kernel's registers into the synced copy (after KVM_SET_REGS/SREGS from
        outside the run loop), so readers of the copy see them at once."""
        self.discard_dirty_regs()
        check("KVM_GET_REGS", lib.xl_ioctl(self.fd, lib.KVM_GET_REGS, ffi.addressof(self._run.s.regs.regs)))
        check("KVM_GET_SREGS", lib.xl_ioctl(self.fd, lib.KVM_GET_SREGS, ffi.addressof(self._run.s.regs.sregs)))

    # -- registers -----------------------------------------------------------------------

    def get_regs(self) -> Regs:
        c = ffi.new("struct kvm_regs *")
        check("KVM_GET_REGS", lib.xl_ioctl(self.fd, lib.KVM_GET_REGS, c))
        return regs_from_c(c)

    def set_regs(self, regs: Regs) -> None:
        c = ffi.new("struct kvm_regs *")
        regs_to_c(regs, c)
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

    # The FXSAVE layout at the start of KVM_GET_XSAVE's region (struct kvm_xsave), and the
    # XSAVE header's XSTATE_BV. KVM_GET_FPU is not used for these: some KVMs leave its MXCSR
    # at 0 and ignore it on KVM_SET_FPU.
    _FSW, _MXCSR, _MXCSR_MASK, _XSTATE_BV = 2, 24, 28, 512
    _XSTATE_SSE = 1 << 1

    def fpu_status(self) -> tuple[int, int]:
        """(x87 status word, MXCSR)."""
        x = self.get_xsave()
        return (int.from_bytes(x[self._FSW:self._FSW + 2], "little"),
                int.from_bytes(x[self._MXCSR:self._MXCSR + 4], "little"))

    def set_mxcsr(self, value: int) -> None:
        """Load MXCSR, keeping the rest of the FPU state. The SSE bit of XSTATE_BV is set, as
        an ldmxcsr leaves it (KVM takes MXCSR from the buffer only with it)."""
        x = bytearray(self.get_xsave())
        x[self._MXCSR:self._MXCSR + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        x[self._XSTATE_BV] |= self._XSTATE_SSE
        self.set_xsave(bytes(x))

    def mxcsr_mask(self) -> int:
        """The MXCSR bits this vCPU may set: the FXSAVE area's MXCSR_MASK, or 0xFFBF where
        it reads 0, as the architecture says."""
        x = self.get_xsave()
        return int.from_bytes(x[self._MXCSR_MASK:self._MXCSR_MASK + 4], "little") or 0xFFBF

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
