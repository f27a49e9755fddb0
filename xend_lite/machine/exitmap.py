"""Where each VM exit goes: port and MSR handlers registered by devices, the doorbell ports the
vCPU loop serves without decoding the exit, and the default for everything else.

Handlers run on the vCPU thread that took the exit and see only that runner. Registration
happens while the VM is built, before any vCPU runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from xend_lite.kvm import exits

if TYPE_CHECKING:
    from xend_lite.machine.vcpu import VcpuRunner

RFLAGS_IF = 1 << 9

IoOutHandler = Callable[["VcpuRunner", exits.IoOut], None]
IoInHandler = Callable[["VcpuRunner", exits.IoIn], bytes]
DoorbellHandler = Callable[["VcpuRunner"], "int | None"]
MsrReadHandler = Callable[["VcpuRunner"], "int | None"]
MsrWriteHandler = Callable[["VcpuRunner", int], bool]
ExitHandler = Callable[["VcpuRunner", object], bool]
#: ends the guest's run: (runner, reason, detail)
StopRun = Callable[["VcpuRunner", str, str], None]


class QuirkHandler(Protocol):
    """Handles the emulation failures of a host's KVM it recognises (machine.quirks)."""

    def handle(self, runner: VcpuRunner, ex: exits.InternalError) -> bool: ...


class ExitMap:
    def __init__(self, stop_run: StopRun):
        self._stop_run = stop_run
        self.io_out: dict[int, IoOutHandler] = {}
        self.io_in: dict[int, IoInHandler] = {}
        self.doorbells: dict[int, DoorbellHandler] = {}
        self.doorbell_hook: tuple[int, int] = (0, -1)   # (C hook address, its port)
        #: the hook's context for each vCPU (by index): an address its native code owns
        self.doorbell_ctx: Callable[[int], int] = lambda _index: 0
        self.msr_read: dict[int, MsrReadHandler] = {}
        self.msr_write: dict[int, MsrWriteHandler] = {}
        self.custom: dict[type, ExitHandler] = {}
        self.quirks: QuirkHandler | None = None

    # -- registration --------------------------------------------------------------------

    def register_io_out(self, port: int, fn: IoOutHandler) -> None:
        self.io_out[port] = fn

    def register_io_in(self, port: int, fn: IoInHandler) -> None:
        self.io_in[port] = fn

    def register_doorbell(self, port: int, fn: DoorbellHandler, hook: int = 0,
                          ctx: Callable[[int], int] | None = None) -> None:
        """A port whose writes carry no data of interest (the value is in the registers):
        handled on the vCPU loop's hot path without decoding the exit. ``hook`` is a C
        function called in the same C call as KVM_RUN (one port may have one), with
        ``ctx(vcpu index)``: it serves the write itself, and the guest runs on without
        returning to Python, or reads the registers into ``runner.vcpu.hook_values()`` for
        ``fn`` (kvm.Vcpu.run_fns). An int ``fn`` returns (unsigned 64-bit) is the guest's
        RAX, given with the next KVM_RUN; None leaves RAX be."""
        self.doorbells[port] = fn
        if hook:
            self.doorbell_hook = (hook, port)
            if ctx is not None:
                self.doorbell_ctx = ctx

    def register_exit(self, exit_type: type, fn: ExitHandler) -> None:
        """Handle an exit type (e.g. exits.Hlt) instead of the default; fn returns go-on."""
        self.custom[exit_type] = fn

    def register_msr(self, index: int, read: MsrReadHandler | None = None,
                     write: MsrWriteHandler | None = None) -> None:
        if read:
            self.msr_read[index] = read
        if write:
            self.msr_write[index] = write

    def trapped_msrs(self) -> list[int]:
        return sorted(set(self.msr_read) | set(self.msr_write))

    # -- the vCPU thread's side ----------------------------------------------------------

    def handle(self, runner: VcpuRunner, ex: exits.Exit) -> bool:
        """Handle an exit the vCPU loop's fast path does not. Returns False to stop."""
        custom = self.custom.get(type(ex))
        if custom is not None:
            return bool(custom(runner, ex))
        v = runner.vcpu
        if isinstance(ex, exits.IoOut):
            h = self.io_out.get(ex.port)
            if h is not None:
                h(runner, ex)
            return True
        if isinstance(ex, exits.IoIn):
            hi = self.io_in.get(ex.port)
            v.complete_io_in(hi(runner, ex) if hi else b"\xff" * (ex.size * ex.count))
            return True
        if isinstance(ex, exits.MsrRead):
            hr = self.msr_read.get(ex.index)
            val = hr(runner) if hr else None
            v.complete_msr(val or 0, fault=val is None)
            return True
        if isinstance(ex, exits.MsrWrite):
            hw = self.msr_write.get(ex.index)
            ok = bool(hw(runner, ex.value)) if hw else False
            v.complete_msr(fault=not ok)
            return True
        if isinstance(ex, exits.MmioRead):
            v.complete_mmio_read(b"\xff" * ex.length)
            return True
        if isinstance(ex, (exits.MmioWrite, exits.IrqWindowOpen)):
            return True
        if isinstance(ex, exits.Hlt):
            if not v.synced_rflags() & RFLAGS_IF:
                self._stop_run(runner, "halted", "halted with interrupts disabled")
                return False
            runner.block(0.001, lambda: False)
            return True
        if isinstance(ex, exits.Shutdown):
            self._stop_run(runner, "triple-fault", "shut down (triple fault)")
            return False
        if isinstance(ex, exits.SystemEvent):
            reason = {1: "poweroff", 2: "reboot", 3: "crash"}.get(ex.type, "internal-error")
            self._stop_run(runner, reason, f"system event {ex.type}")
            return False
        if isinstance(ex, exits.InternalError):
            if self.quirks is not None and self.quirks.handle(runner, ex):
                return True
            insn = ex.instruction_bytes()
            if insn:
                self._stop_run(runner, "internal-error",
                               f"KVM could not emulate the instruction at rip "
                               f"{v.synced_rip():#x} (bytes {insn.hex(' ')})")
                return False
        self._stop_run(runner, "internal-error", f"{ex!r} at rip {v.synced_rip():#x}")
        return False
