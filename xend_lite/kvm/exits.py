"""VM exits, decoded in exactly one place (:func:`decode`) into small frozen values.

An exit reason the bindings do not know is data (:class:`Unknown`), never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

from xend_lite.kvm._ffi import ffi, lib


@dataclass(frozen=True, slots=True)
class IoOut:
    port: int
    size: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class IoIn:
    """The guest reads ``count`` items of ``size`` bytes: answer with Vcpu.complete_io_in()."""

    port: int
    size: int
    count: int


@dataclass(frozen=True, slots=True)
class MmioRead:
    """Answer with Vcpu.complete_mmio_read()."""

    addr: int
    length: int


@dataclass(frozen=True, slots=True)
class MmioWrite:
    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MsrRead:
    """A user-space MSR read: answer with Vcpu.complete_msr(value) or complete_msr(fault=True)."""

    index: int
    reason: int


@dataclass(frozen=True, slots=True)
class MsrWrite:
    """A user-space MSR write: acknowledge with Vcpu.complete_msr() or complete_msr(fault=True)."""

    index: int
    value: int
    reason: int


@dataclass(frozen=True, slots=True)
class Hlt:
    pass


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Triple fault (or another shutdown condition) in the guest."""


@dataclass(frozen=True, slots=True)
class InternalError:
    suberror: int
    data: tuple[int, ...]

    @property
    def emulation_failure(self) -> bool:
        """KVM's instruction emulator gave up on the instruction at RIP."""
        return self.suberror == _EMULATION

    def instruction_bytes(self) -> bytes | None:
        """For an emulation failure that carries them, the instruction's bytes as KVM
        fetched them (struct kvm_run's emulation_failure: flags in the first data word,
        then a size byte and up to 15 bytes); None otherwise."""
        if self.suberror != _EMULATION or len(self.data) < 3 or not self.data[0] & _INSN_BYTES:
            return None
        raw = b"".join((w & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for w in self.data[1:3])
        size = raw[0]
        return raw[1:1 + size] if 0 < size <= 15 else None


@dataclass(frozen=True, slots=True)
class FailEntry:
    reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class SystemEvent:
    type: int
    data0: int


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned EINTR (a kick or immediate_exit); nothing to handle."""


@dataclass(frozen=True, slots=True)
class IrqWindowOpen:
    pass


@dataclass(frozen=True, slots=True)
class Unknown:
    reason: int
    hardware_reason: int


Exit = (
    IoOut | IoIn | MmioRead | MmioWrite | MsrRead | MsrWrite | Hlt | Shutdown | InternalError
    | FailEntry | SystemEvent | Interrupted | IrqWindowOpen | Unknown
)

HLT = Hlt()
SHUTDOWN = Shutdown()
INTERRUPTED = Interrupted()
IRQ_WINDOW_OPEN = IrqWindowOpen()

_EXIT_IO = lib.KVM_EXIT_IO
_EMULATION = lib.KVM_INTERNAL_ERROR_EMULATION
_INSN_BYTES = lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
_EXIT_IO_OUT = lib.KVM_EXIT_IO_OUT


def decode(run, run_bytes) -> Exit:
    """Decode the exit described by ``run`` (a ``struct kvm_run *``).

    ``run_bytes`` is a buffer over the whole kvm_run mapping, for the I/O data area.
    """
    reason = run.exit_reason
    if reason == _EXIT_IO:
        io = run.io
        n = io.size * io.count
        if io.direction == _EXIT_IO_OUT:
            off = io.data_offset
            return IoOut(io.port, io.size, io.count, bytes(run_bytes[off:off + n]))
        return IoIn(io.port, io.size, io.count)
    return _decode_slow(run, reason)


def _decode_slow(run, reason: int) -> Exit:
    if reason == lib.KVM_EXIT_MMIO:
        m = run.mmio
        if m.is_write:
            return MmioWrite(m.phys_addr, bytes(ffi.buffer(m.data, m.len)))
        return MmioRead(m.phys_addr, m.len)
    if reason == lib.KVM_EXIT_X86_RDMSR:
        return MsrRead(run.msr.index, run.msr.reason)
    if reason == lib.KVM_EXIT_X86_WRMSR:
        return MsrWrite(run.msr.index, run.msr.data, run.msr.reason)
    if reason == lib.KVM_EXIT_HLT:
        return HLT
    if reason == lib.KVM_EXIT_SHUTDOWN:
        return SHUTDOWN
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        i = run.internal
        n = min(i.ndata, 16)
        return InternalError(i.suberror, tuple(i.data[k] for k in range(n)))
    if reason == lib.KVM_EXIT_FAIL_ENTRY:
        return FailEntry(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
    if reason == lib.KVM_EXIT_SYSTEM_EVENT:
        return SystemEvent(run.system_event.type, lib.xl_system_event_data0(run))
    if reason == lib.KVM_EXIT_INTR:
        return INTERRUPTED
    if reason == lib.KVM_EXIT_IRQ_WINDOW_OPEN:
        return IRQ_WINDOW_OPEN
    return Unknown(reason, run.hw.hardware_exit_reason if reason == lib.KVM_EXIT_UNKNOWN else 0)
