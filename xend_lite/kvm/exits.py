"""VM exits, decoded in exactly one place (:func:`decode`) into small frozen values.

An exit reason the bindings do not know is data (:class:`Unknown`), never an exception.

The values are frozen records (xend_lite/record.py: fields by keyword or position,
assignment refused, equal and hashed by their fields, shown as ``IoOut(port=..., ...)``)
usable in ``match``, each with its own ``__init__``: an IoOut is made for every port exit.
As frozen dataclasses the fourteen of them cost about 5 ms of every daemon start.
"""

from __future__ import annotations

from xend_lite.kvm._ffi import ffi, lib
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set


class _Exit(Frozen):
    __slots__ = ()
    __match_args__: tuple[str, ...] = ()


class IoOut(_Exit):
    __slots__ = __match_args__ = ("port", "size", "count", "data")
    port: int
    size: int
    count: int
    data: bytes

    def __init__(self, port: int, size: int, count: int, data: bytes):
        _set(self, "port", port)
        _set(self, "size", size)
        _set(self, "count", count)
        _set(self, "data", data)


class IoIn(_Exit):
    """The guest reads ``count`` items of ``size`` bytes: answer with Vcpu.complete_io_in()."""

    __slots__ = __match_args__ = ("port", "size", "count")
    port: int
    size: int
    count: int

    def __init__(self, port: int, size: int, count: int):
        _set(self, "port", port)
        _set(self, "size", size)
        _set(self, "count", count)


class MmioRead(_Exit):
    """Answer with Vcpu.complete_mmio_read()."""

    __slots__ = __match_args__ = ("addr", "length")
    addr: int
    length: int

    def __init__(self, addr: int, length: int):
        _set(self, "addr", addr)
        _set(self, "length", length)


class MmioWrite(_Exit):
    __slots__ = __match_args__ = ("addr", "data")
    addr: int
    data: bytes

    def __init__(self, addr: int, data: bytes):
        _set(self, "addr", addr)
        _set(self, "data", data)


class MsrRead(_Exit):
    """A user-space MSR read: answer with Vcpu.complete_msr(value) or complete_msr(fault=True)."""

    __slots__ = __match_args__ = ("index", "reason")
    index: int
    reason: int

    def __init__(self, index: int, reason: int):
        _set(self, "index", index)
        _set(self, "reason", reason)


class MsrWrite(_Exit):
    """A user-space MSR write: acknowledge with Vcpu.complete_msr() or complete_msr(fault=True)."""

    __slots__ = __match_args__ = ("index", "value", "reason")
    index: int
    value: int
    reason: int

    def __init__(self, index: int, value: int, reason: int):
        _set(self, "index", index)
        _set(self, "value", value)
        _set(self, "reason", reason)


class Hlt(_Exit):
    __slots__ = ()


class Shutdown(_Exit):
    """Triple fault (or another shutdown condition) in the guest."""

    __slots__ = ()


class InternalError(_Exit):
    __slots__ = __match_args__ = ("suberror", "data")
    suberror: int
    data: tuple[int, ...]

    def __init__(self, suberror: int, data: tuple[int, ...]):
        _set(self, "suberror", suberror)
        _set(self, "data", data)

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


class FailEntry(_Exit):
    __slots__ = __match_args__ = ("reason", "cpu")
    reason: int
    cpu: int

    def __init__(self, reason: int, cpu: int):
        _set(self, "reason", reason)
        _set(self, "cpu", cpu)


class SystemEvent(_Exit):
    __slots__ = __match_args__ = ("type", "data0")
    type: int
    data0: int

    def __init__(self, type: int, data0: int):  # noqa: A002 - the kernel's name
        _set(self, "type", type)
        _set(self, "data0", data0)


class Interrupted(_Exit):
    """KVM_RUN returned EINTR (a kick or immediate_exit); nothing to handle."""

    __slots__ = ()


class IrqWindowOpen(_Exit):
    __slots__ = ()


class Unknown(_Exit):
    __slots__ = __match_args__ = ("reason", "hardware_reason")
    reason: int
    hardware_reason: int

    def __init__(self, reason: int, hardware_reason: int):
        _set(self, "reason", reason)
        _set(self, "hardware_reason", hardware_reason)


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
