"""Machine: one KVM VM with its RAM, memory map, vCPU threads, console and exit handlers.

All guest-driven work happens in handlers on the vCPU threads; the owner (the thread that
made the Machine) starts, pauses, resumes, changes the memory map and stops it.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from xend_lite.errors import InvalidArgument, StateError
from xend_lite.kvm import CpuidEntry, Kvm, MsrFilterRange, Regs, Sregs, exits
from xend_lite.machine.native import written_runs
from xend_lite.kvm import const as K
from xend_lite.machine.console import DEBUG_PORTS, LSR_THR_EMPTY, UART_BASE, UART_LSR, ConsoleSink
from xend_lite.machine.memory import (HIGH_RAM_BASE, LOW_RAM_TOP, PAGE_SIZE, Backing, GuestMemory,
                                      on_vcpu_thread,
                                      MemoryMap, RamRegion)
from xend_lite.machine.vcpu import PAUSED, RUNNING, VcpuRunner

log = logging.getLogger("xend_lite.machine")

TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
RFLAGS_IF = 1 << 9
EFER_LMA = 1 << 10

IoOutHandler = Callable[[VcpuRunner, exits.IoOut], None]
IoInHandler = Callable[[VcpuRunner, exits.IoIn], bytes]
DoorbellHandler = Callable[[VcpuRunner], "int | None"]
MsrReadHandler = Callable[[VcpuRunner], "int | None"]
MsrWriteHandler = Callable[[VcpuRunner, int], bool]


class MemoryBusy(Exception):
    """A vCPU-side memory-map change met a pause in progress; retry after it."""


@dataclass(frozen=True, slots=True)
class ShutdownStatus:
    """Why the run ended: reason is poweroff, reboot, crash, suspend, watchdog, triple-fault,
    halted, internal-error or stopped; code is the guest's shutdown code where it gave one."""

    reason: str
    code: int = 0
    detail: str = ""


@dataclass(slots=True)
class BootCpu:
    """Where a vCPU starts: full register and segment state."""

    regs: Regs
    sregs: Sregs


class Machine:
    def __init__(self, kvm: Kvm, memory_bytes: int, vcpus: int = 1, console: ConsoleSink | None = None,
                 irqchip: bool = True):
        if memory_bytes < 2 * 1024 * 1024 or memory_bytes % PAGE_SIZE:
            raise InvalidArgument("guest memory must be at least 2 MiB and a multiple of 4 KiB")
        if not 1 <= vcpus <= 64:
            raise InvalidArgument("vcpus must be between 1 and 64")
        self.kvm = kvm
        self.console = console or ConsoleSink()
        self.memory_bytes = memory_bytes
        self.vm = kvm.create_vm()
        self._closed = False
        try:
            self.vm.set_tss_addr(TSS_ADDR)
            self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
            self.irqchip = irqchip
            if irqchip:
                self.vm.create_irqchip()
                self.vm.create_pit2()
            self.ram = Backing.anonymous("ram", memory_bytes)
            low = min(memory_bytes, LOW_RAM_TOP)
            regions = [RamRegion(0, low, self.ram, 0)]
            if memory_bytes > low:
                regions.append(RamRegion(HIGH_RAM_BASE, memory_bytes - low, self.ram, low))
            self.cpuid: list[CpuidEntry] = kvm.supported_cpuid()
            self.phys_bits = _phys_bits(self.cpuid)
            self.memmap = MemoryMap(self.vm, regions, phys_bits=self.phys_bits, remap_overlays=True)
            # held while RAM is read in bulk (a save) or replaced; see MemoryMap.access_lock
            self.ram_lock = self.memmap.access_lock
            self.mem = GuestMemory(self.memmap)
            self.runners = [VcpuRunner(self, self.vm.create_vcpu(i)) for i in range(vcpus)]
            for r in self.runners:
                r.vcpu.set_cpuid2(self.cpuid)
            self._power_on = [self._capture_power_on(r) for r in self.runners]
            self._vm_power_on = self._capture_vm_state()
        except BaseException:
            self.vm.close()
            raise
        self._io_out: dict[int, IoOutHandler] = {}
        self._doorbells: dict[int, DoorbellHandler] = {}
        self.doorbell_hook: tuple[int, int] = (0, -1)   # (C decoder address, its port)
        self._io_in: dict[int, IoInHandler] = {}
        self._msr_read: dict[int, MsrReadHandler] = {}
        self._msr_write: dict[int, MsrWriteHandler] = {}
        self._exit_handlers: dict[type, Callable] = {}
        self.xen_mode = False  # set by the Xen emulation; devices such as xen_overlay need it
        self._lock = threading.RLock()
        self._pause_depth = 0
        self.state = "created"
        self.status: ShutdownStatus | None = None
        self._done = threading.Event()
        self._shutdown_listeners: list[Callable[[ShutdownStatus], None]] = []
        self._monitor: threading.Thread | None = None
        self._install_console()

    # -- set-up --------------------------------------------------------------------------

    def _install_console(self) -> None:
        def write(_r: VcpuRunner, ex: exits.IoOut) -> None:
            self.console.write(ex.data[::ex.size] if ex.size > 1 else ex.data)

        for port in DEBUG_PORTS + (UART_BASE,):
            self._io_out[port] = write
        self._io_in[UART_LSR] = lambda _r, ex: bytes([LSR_THR_EMPTY]) * (ex.size * ex.count)
        self._io_in[0xE9] = lambda _r, ex: bytes([0xE9]) * (ex.size * ex.count)

    def register_io_out(self, port: int, fn: IoOutHandler) -> None:
        self._io_out[port] = fn

    def register_doorbell(self, port: int, fn: DoorbellHandler, hook: int = 0) -> None:
        """A port whose writes carry no data of interest (the value is in the registers):
        handled on the vCPU loop's hot path without decoding the exit. ``hook`` is a C
        function that reads the registers into ``runner.vcpu.hook_values()`` in the same
        call as KVM_RUN (one port may have one). An int the handler returns (unsigned
        64-bit) is the guest's RAX, given with the next KVM_RUN; None leaves RAX be."""
        self._doorbells[port] = fn
        if hook:
            self.doorbell_hook = (hook, port)

    def register_io_in(self, port: int, fn: IoInHandler) -> None:
        self._io_in[port] = fn

    def register_exit(self, exit_type: type, fn: Callable[[VcpuRunner, object], bool]) -> None:
        """Handle an exit type (e.g. exits.Hlt) instead of the default; fn returns go-on."""
        self._exit_handlers[exit_type] = fn

    def register_msr(self, index: int, read: MsrReadHandler | None = None,
                     write: MsrWriteHandler | None = None) -> None:
        """Trap an MSR to user space. A read handler returning None, or a write handler
        returning False, injects #GP as the hardware would."""
        if read:
            self._msr_read[index] = read
        if write:
            self._msr_write[index] = write
        self._apply_msr_filter()

    def _apply_msr_filter(self) -> None:
        indices = sorted(set(self._msr_read) | set(self._msr_write))
        if not indices:
            return
        if not (self.kvm.check_extension(K.KVM_CAP_X86_USER_SPACE_MSR)
                and self.kvm.check_extension(K.KVM_CAP_X86_MSR_FILTER)):
            from xend_lite.errors import NotSupported

            raise NotSupported("this host's KVM cannot trap MSRs to user space "
                               "(KVM_CAP_X86_USER_SPACE_MSR / KVM_CAP_X86_MSR_FILTER)")
        if not getattr(self, "_user_msr_enabled", False):
            self.vm.enable_cap(K.KVM_CAP_X86_USER_SPACE_MSR, K.KVM_MSR_EXIT_REASON_FILTER)
            self._user_msr_enabled = True
        self.vm.set_msr_filter(_msr_filter_ranges(indices))

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        """Replace every vCPU's CPUID table (before start)."""
        self.cpuid = list(entries)
        for r in self.runners:
            r.vcpu.set_cpuid2(self.cpuid)

    def add_shutdown_listener(self, fn: Callable[[ShutdownStatus], None]) -> None:
        self._shutdown_listeners.append(fn)

    def set_boot_cpu(self, index: int, boot: BootCpu) -> None:
        """Give a vCPU its starting registers (call while not running)."""
        v = self.runners[index].vcpu
        v.set_sregs(boot.sregs)
        v.set_regs(boot.regs)
        v.set_mp_state(K.KVM_MP_STATE_RUNNABLE)

    # -- power-on state (for reset) ------------------------------------------------------

    def _capture_power_on(self, r: VcpuRunner) -> dict:
        v = r.vcpu
        return {"regs": v.get_regs(), "sregs": v.get_sregs(), "fpu": v.get_fpu(),
                "lapic": v.get_lapic() if self.irqchip else None, "mp": v.get_mp_state(),
                "events": v.get_vcpu_events(), "xcrs": v.get_xcrs()}

    def _capture_vm_state(self) -> dict:
        if not self.irqchip:
            return {}
        return {"pic0": self.vm.get_irqchip(K.KVM_IRQCHIP_PIC_MASTER),
                "pic1": self.vm.get_irqchip(K.KVM_IRQCHIP_PIC_SLAVE),
                "ioapic": self.vm.get_irqchip(K.KVM_IRQCHIP_IOAPIC), "pit": self.vm.get_pit2()}

    def reset_hardware(self) -> None:
        """Power-on state for every vCPU and the irqchip, RAM zeroed, overlays and balloon
        undone. Call with the machine paused (or not started); the caller reloads the image."""
        with self._lock:
            for r, st in zip(self.runners, self._power_on):
                v = r.vcpu
                v.discard_dirty_regs()
                v.set_sregs(st["sregs"])
                v.set_regs(st["regs"])
                v.set_fpu(st["fpu"])
                v.set_xcrs(st["xcrs"])
                if st["lapic"] is not None:
                    v.set_lapic(st["lapic"])
                v.set_vcpu_events(st["events"])
                v.set_mp_state(st["mp"])
            vs = self._vm_power_on
            if vs:
                for key in ("pic0", "pic1", "ioapic"):
                    self.vm.set_irqchip(vs[key])
                self.vm.set_pit2(vs["pit"])
            self.memmap.clear()
            self.ram.zero()

    def rearm(self) -> None:
        """After the run ended (a guest shutdown or reboot), make the machine startable again:
        threads joined, status cleared, hardware at power-on. The caller reloads the image."""
        with self._lock:
            if self.state != "stopped":
                raise StateError(f"machine is {self.state}, not stopped", self.state, ("stopped",))
            for r in self.runners:
                r.join(5.0)
                if r.thread is not None and r.thread.is_alive():
                    raise StateError(f"vcpu{r.index} did not stop", self.state)
            if self._monitor is not None:
                self._monitor.join(2.0)
            for r in self.runners:
                r.reset_thread_state()
            self.status = None
            self._done.clear()
            self._pause_depth = 0
            self.reset_hardware()
            self.state = "created"

    # -- running -------------------------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        with self._lock:
            if self.state != "created":
                raise StateError(f"machine is {self.state}, not created", self.state, ("created",))
            self._pause_depth = 1 if paused else 0
            for r in self.runners:
                if paused:
                    r._pause_req = True
                r.start()
            if paused:
                for r in self.runners:
                    r.wait_paused()
            self.state = "paused" if paused else "running"
            self._monitor = threading.Thread(target=self._watch_halts, name="vcpu-monitor", daemon=True)
            self._monitor.start()

    def pause(self) -> None:
        """Stop the world: returns once every vCPU is out of KVM_RUN and parked. Nests."""
        with self._lock:
            self._pause_depth += 1
            if self._pause_depth > 1 or self.state not in ("running",):
                return
            for r in self.runners:
                r.request_pause()
            for r in self.runners:
                if not r.wait_paused():
                    log.error("vcpu%d did not pause within the time limit", r.index)
            self.state = "paused"

    def resume(self) -> None:
        with self._lock:
            if self._pause_depth == 0:
                return
            self._pause_depth -= 1
            if self._pause_depth or self.state != "paused":
                return
            for r in self.runners:
                r.release()
            self.state = "running"

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def update_memory(self, fn: Callable[[MemoryMap], object]) -> object:
        """Change the memory map with every vCPU paused, so none sees a half-applied map."""
        with self._lock, self.paused():
            return fn(self.memmap)

    def vcpu_update_memory(self, runner: VcpuRunner, fn: Callable[[MemoryMap], object]) -> object:
        """Change the memory map from a handler on ``runner``'s own thread (a hypercall): the
        caller is already out of KVM_RUN, so only the other vCPUs are paused. Raises
        MemoryBusy when the owner is pausing the machine at the same moment; the handler then
        returns and retries after the pause (waiting here would deadlock with the owner)."""
        if not self._lock.acquire(timeout=0.002):
            raise MemoryBusy("the machine is being paused")
        others = [r for r in self.runners if r is not runner and r.state == RUNNING]
        try:
            for r in others:
                r.request_pause()
            for r in others:
                if not r.wait_paused():
                    log.error("vcpu%d did not pause within the time limit", r.index)
            return fn(self.memmap)
        finally:
            for r in others:
                r.release()
            self._lock.release()

    def replace_ram(self, backing: Backing, overlays: dict[str, tuple[int, Backing]] | None = None,
                    ballooned: list[int] | None = None) -> None:
        """Back guest RAM with ``backing`` (same size; e.g. a snapshot's copy-on-write
        mapping), and with the given overlays and ballooned frames, in one change of the
        memory map. Call with the machine paused or not started; the old backing is closed."""
        if backing.size != self.memory_bytes:
            raise InvalidArgument(f"RAM backing is {backing.size} bytes, the guest has {self.memory_bytes}")
        with self.ram_lock, self._lock, self.paused():
            mm = self.memmap
            old = self.ram
            mm.forget_remaps()
            mm.replace(ram=[RamRegion(r.gpa, r.size, backing, r.offset) for r in mm.ram],
                       overlays=overlays, ballooned=ballooned)
            self.ram = backing
            old.close()

    @contextmanager
    def host_access(self) -> Iterator[None]:
        """Hold while touching guest RAM through host addresses or views (time records and
        event bits in a registered vcpu_info). Off the vCPU threads this keeps RAM from being
        replaced meanwhile; take it before any other lock. A vCPU thread needs nothing: a
        replacement waits until every vCPU is parked."""
        if on_vcpu_thread():
            yield
            return
        with self.ram_lock:
            yield

    def detach_ram(self, src_fd: int, src_offset: int, stop: threading.Event | None = None) -> bool:
        """Move RAM restored from a file (a private mapping of it) into a memfd of its own,
        so the VM no longer depends on the file: the file's data is copied
        while the guest runs (holes stay holes), then, with the vCPUs paused, the pages
        written since the restore are copied from the mapping and the new memfd takes its
        place. Returns False when there was nothing to do or ``stop`` was set."""
        old = self.ram
        if not old.private:
            return False
        size = old.size
        new = Backing.anonymous("ram", size)
        try:
            pos = 0
            while pos < size:
                if stop is not None and stop.is_set():
                    new.close()
                    return False
                try:
                    start = os.lseek(src_fd, src_offset + pos, os.SEEK_DATA) - src_offset
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break
                    raise
                if start >= size:
                    break
                end = min(size, os.lseek(src_fd, src_offset + start, os.SEEK_HOLE) - src_offset)
                off = start
                while off < end:   # read straight into the new memory: one copy
                    if stop is not None and stop.is_set():
                        new.close()
                        return False
                    n = os.preadv(src_fd, [new.view[off:min(end, off + (16 << 20))]], src_offset + off)
                    if n <= 0:
                        raise OSError(errno.EIO, "snapshot file ended early")
                    off += n
                pos = end
            with self.ram_lock, self._lock, self.paused():
                if self.ram is not old or (stop is not None and stop.is_set()):
                    new.close()
                    return False
                for first, count in written_runs(old.addr, size // PAGE_SIZE):
                    a, b = first * PAGE_SIZE, (first + count) * PAGE_SIZE
                    new.view[a:b] = old.view[a:b]
                mm = self.memmap
                mm.forget_remaps()
                mm.replace(ram=[RamRegion(r.gpa, r.size, new, r.offset) for r in mm.ram])
                self.ram = new
                old.close()
            return True
        except BaseException:
            if self.ram is not new:
                new.close()
            raise

    @property
    def pause_depth(self) -> int:
        return self._pause_depth

    def request_shutdown(self, reason: str, code: int = 0, detail: str = "") -> None:
        """End the run (from any thread, handlers included). The first reason wins."""
        with self._lock:
            if self.status is not None:
                return
            self.status = ShutdownStatus(reason, code, detail)
        log.info("guest stopped: %s (code %d) %s", reason, code, detail)
        for r in self.runners:
            r.request_stop()
        self.state = "stopped"
        self._done.set()
        for fn in self._shutdown_listeners:
            try:
                fn(self.status)
            except Exception:  # noqa: BLE001
                log.exception("shutdown listener failed")

    def wait(self, timeout: float | None = None) -> ShutdownStatus | None:
        self._done.wait(timeout)
        return self.status

    def stop(self) -> None:
        """Stop every vCPU thread (an operator's stop, not a guest shutdown)."""
        self.request_shutdown("stopped")
        for r in self.runners:
            r.join(5.0)

    def close(self) -> None:
        if self._closed:
            return
        self.stop()
        self._closed = True
        for r in self.runners:
            r.vcpu.close()
        self.vm.close()
        self.console.flush()

    # -- exits ---------------------------------------------------------------------------

    def handle_exit(self, runner: VcpuRunner, ex: exits.Exit) -> bool:
        """Handle every exit the vCPU loop's fast path does not. Returns False to stop."""
        custom = self._exit_handlers.get(type(ex))
        if custom is not None:
            return bool(custom(runner, ex))
        v = runner.vcpu
        if isinstance(ex, exits.IoOut):
            h = self._io_out.get(ex.port)
            if h is not None:
                h(runner, ex)
            return True
        if isinstance(ex, exits.IoIn):
            h = self._io_in.get(ex.port)
            v.complete_io_in(h(runner, ex) if h else b"\xff" * (ex.size * ex.count))
            return True
        if isinstance(ex, exits.MsrRead):
            h = self._msr_read.get(ex.index)
            val = h(runner) if h else None
            v.complete_msr(val or 0, fault=val is None)
            return True
        if isinstance(ex, exits.MsrWrite):
            h = self._msr_write.get(ex.index)
            ok = bool(h(runner, ex.value)) if h else False
            v.complete_msr(fault=not ok)
            return True
        if isinstance(ex, exits.MmioRead):
            v.complete_mmio_read(b"\xff" * ex.length)
            return True
        if isinstance(ex, (exits.MmioWrite, exits.IrqWindowOpen)):
            return True
        if isinstance(ex, exits.Hlt):
            if not v.synced_rflags() & RFLAGS_IF:
                self.request_shutdown("halted", 0, f"vcpu{runner.index} halted with interrupts disabled")
                return False
            time.sleep(0.001)
            return True
        if isinstance(ex, exits.Shutdown):
            self.request_shutdown("triple-fault", 0, f"vcpu{runner.index} shut down (triple fault)")
            return False
        if isinstance(ex, exits.SystemEvent):
            reason = {1: "poweroff", 2: "reboot", 3: "crash"}.get(ex.type, "internal-error")
            self.request_shutdown(reason, 0, f"system event {ex.type}")
            return False
        detail = f"vcpu{runner.index}: {ex!r} at rip {v.synced_rip():#x}"
        self.request_shutdown("internal-error", 0, detail)
        return False

    def handler_failed(self, runner: VcpuRunner, ex: object, exc: BaseException) -> None:
        log.error("vcpu%d: handler for %r failed", runner.index, ex, exc_info=exc)
        self.request_shutdown("internal-error", 0, f"vcpu{runner.index}: handler failed: {type(exc).__name__}")

    def vcpu_failed(self, runner: VcpuRunner, error: str) -> None:
        self.request_shutdown("internal-error", 0, f"vcpu{runner.index}: {error}")

    # -- halted-with-interrupts-off detection ---------------------------------------------

    def _watch_halts(self) -> None:
        """With the in-kernel irqchip a HLT never exits: a vCPU that makes no exits for a
        while is paused and looked at; halted with IF clear means the guest is dead."""
        seen: dict[int, tuple[int, int]] = {}
        while not self._done.wait(0.25):
            for r in self.runners:
                quiet = seen.get(r.index, (-1, 0))
                if r.state != RUNNING or r.exits_total != quiet[0]:
                    seen[r.index] = (r.exits_total, 0)
                    continue
                seen[r.index] = (quiet[0], quiet[1] + 1)
                if quiet[1] + 1 >= 2:
                    seen[r.index] = (quiet[0], -8)  # look again in a few seconds
                    self._check_halted(r)

    def _check_halted(self, r: VcpuRunner) -> None:
        with self._lock:
            if self._pause_depth or self.state != "running" or r.state != RUNNING:
                return
            r.request_pause()
            try:
                if not r.wait_paused(2.0) or r.state != PAUSED:
                    return
                v = r.vcpu
                if v.get_mp_state() == K.KVM_MP_STATE_HALTED and not v.get_regs().rflags & RFLAGS_IF:
                    self.request_shutdown("halted", 0, f"vcpu{r.index} halted with interrupts disabled")
            finally:
                r.release()
                r.exits_total += 1

    # -- introspection -------------------------------------------------------------------

    def guest_long_mode(self, index: int = 0) -> bool:
        return self.runners[index].vcpu.in_long_mode()

    def vcpu_info(self) -> list[dict]:
        return [{"cpu": r.index, "state": r.state, "rip": r.vcpu.synced_rip() if r.vcpu.fd >= 0 else 0,
                 "exits": dict(r.exit_counts), "thread_id": r.thread.native_id if r.thread else None}
                for r in self.runners]


def _msr_filter_ranges(indices: list[int]) -> list[MsrFilterRange]:
    """Filter ranges trapping exactly ``indices`` (sorted). A bitmap covers whole bytes, i.e.
    8 MSRs, and KVM obeys the first range holding an index, so indices close together share
    one range (clear bit: trap, set bit: KVM handles it) instead of overlapping ranges."""
    flags = K.KVM_MSR_FILTER_READ | K.KVM_MSR_FILTER_WRITE
    groups: list[list[int]] = []
    for idx in indices:
        if groups and idx - groups[-1][0] < 0x400:
            groups[-1].append(idx)
        else:
            groups.append([idx])
    ranges = []
    for group in groups:
        base = group[0]
        bitmap = bytearray(b"\xff" * ((group[-1] - base) // 8 + 1))
        for idx in group:
            bitmap[(idx - base) // 8] &= ~(1 << ((idx - base) % 8)) & 0xFF
        ranges.append(MsrFilterRange(flags, base, bytes(bitmap)))
    return ranges


def _phys_bits(cpuid: list[CpuidEntry]) -> int:
    for e in cpuid:
        if e.function == 0x80000008:
            return max(32, min(52, e.eax & 0xFF))
    return 36
