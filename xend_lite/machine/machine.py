"""Machine: one KVM VM with its RAM, memory map, vCPU runners, console ports and VM owner.

(Longer than most modules: each public method is a pair, the call from any thread and its
body on the owner; halts, power-on state and RAM replacement live in their own modules.)

Threads and what they own:
- each vCPU thread (``VcpuRunner``) runs its own vCPU and handles its exits;
- the VM owner (``VmOwner``) makes every VM-wide change: start, pause, resume, the memory
  map, RAM replacement, reset, the end of a run. The public methods below run there; called
  from any other thread they hand the work to the owner and wait for it;
- any other thread that touches guest RAM (the Xen timers) holds ``ram_lock``, which the
  owner takes while it replaces RAM.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from xend_lite.errors import InvalidArgument, StateError
from xend_lite.kvm import CpuidEntry, Kvm, Regs, Sregs, exits
from xend_lite.kvm import const as K
from xend_lite.machine import ram as ramswap
from xend_lite.machine.backing import HIGH_RAM_BASE, LOW_RAM_TOP, PAGE_SIZE, Backing, on_ram_thread
from xend_lite.machine.console import DEBUG_PORTS, LSR_THR_EMPTY, UART_BASE, UART_LSR, ConsoleSink
from xend_lite.machine.exitmap import ExitMap, MsrReadHandler, MsrWriteHandler
from xend_lite.machine.guestmem import GuestMemory
from xend_lite.machine.halts import HALT_CHECK_EVERY, HaltWatch
from xend_lite.machine.memmap import MemoryMap, RamRegion
from xend_lite.machine.owner import VmOwner
from xend_lite.machine.prepared import PreparedVm, check_vcpus, vcpu_cpuid
from xend_lite.machine.quirks import HostQuirks
from xend_lite.machine.vcpu import VcpuRunner, VcpuState
from xend_lite.record import Frozen, Record
from xend_lite.record import set_field as _set

log = logging.getLogger("xend_lite.machine")

PAUSE_TIMEOUT = 10.0


class ShutdownStatus(Frozen):
    """Why the run ended: reason is poweroff, reboot, crash, suspend, watchdog, triple-fault,
    halted, internal-error or stopped; code is the guest's shutdown code where it gave one."""

    __slots__ = ("reason", "code", "detail")
    reason: str
    code: int
    detail: str

    def __init__(self, reason: str, code: int = 0, detail: str = ""):
        _set(self, "reason", reason)
        _set(self, "code", code)
        _set(self, "detail", detail)


class BootCpu(Record):
    """Where a vCPU starts: full register and segment state."""

    __slots__ = ("regs", "sregs")

    def __init__(self, regs: Regs, sregs: Sregs):
        self.regs = regs
        self.sregs = sregs


class Machine:
    def __init__(self, kvm: Kvm, memory_bytes: int, vcpus: int = 1, console: ConsoleSink | None = None,
                 irqchip: bool = True, quirks: bool = True, *, prepared: PreparedVm | None = None,
                 ram: Backing | None = None):
        """``prepared``: the VM made ahead (machine/prepared.py) to build on, made here when
        not given; it must fit (``prepared.unfit``). ``ram``: the memory that backs guest RAM
        (e.g. a snapshot's copy-on-write mapping), fresh zeroed memory when not given; the
        machine owns both from here on."""
        if memory_bytes < 2 * 1024 * 1024 or memory_bytes % PAGE_SIZE:
            raise InvalidArgument("guest memory must be at least 2 MiB and a multiple of 4 KiB")
        check_vcpus(vcpus)
        if ram is not None and ram.size != memory_bytes:
            raise InvalidArgument(f"RAM backing is {ram.size} bytes, the guest has {memory_bytes}")
        if prepared is not None:
            why = prepared.unfit(vcpus, irqchip)
            if why is not None:
                raise InvalidArgument(f"the prepared VM cannot serve this machine: {why}")
        self.kvm = kvm
        self.console = console or ConsoleSink()
        self.memory_bytes = memory_bytes
        self.irqchip = irqchip
        self.ram_lock = threading.RLock()   # see the module docstring
        self.exits = ExitMap(self._stop_run)
        self.runners: list[VcpuRunner] = []
        self._transient: list[VcpuRunner] = []    # paused for one memory-map change
        self._pause_depth = 0
        p = prepared or PreparedVm.make(kvm, vcpus, irqchip)
        p.adopted = True
        self.vm = p.vm
        self.owner: VmOwner | None = p.owner
        self.ram = ram
        try:
            p.add_vcpus(vcpus)
            if self.ram is None:
                self.ram = Backing.anonymous("ram", memory_bytes)
            low = min(memory_bytes, LOW_RAM_TOP)
            regions = [RamRegion(0, low, self.ram, 0)]
            if memory_bytes > low:
                regions.append(RamRegion(HIGH_RAM_BASE, memory_bytes - low, self.ram, low))
            self.cpuid: list[CpuidEntry] = p.cpuid
            self.phys_bits = _phys_bits(self.cpuid)
            self.memmap = MemoryMap(self.vm, regions, phys_bits=self.phys_bits, remap_overlays=True,
                                    before_slot_change=self._vcpus_out)
            self.mem = GuestMemory(self.memmap, self.ram_lock)
            # what this host's KVM cannot emulate, carried out where the result is exact
            self.quirks = HostQuirks(self.mem) if quirks else None
            self.exits.quirks = self.quirks
            self.runners = [VcpuRunner(v, self.owner, self.exits) for v in p.vcpus]
            for r in self.runners:
                r.on_failure = self._runner_failed
            self._power_on = list(p.power_on)
            self._vm_power_on = p.vm_power_on
            self._parked = list(p.threads)     # see spawn
        except BaseException:
            p.release()
            if self.ram is not None:
                self.ram.close()
            raise
        self._base = p      # what the machine was built on (its MSR filter, see register_msr)
        self.xen_mode = False  # set by the Xen emulation; devices such as xen_overlay need it
        self.acpi_rsdp = 0     # where machine.acpi laid the RSDP (0: no ACPI tables)
        self._closed = False
        self.state = "created"
        self.status: ShutdownStatus | None = None
        self._status_lock = threading.Lock()
        self._done = threading.Event()
        self._shutdown_listeners: list[Callable[[ShutdownStatus], None]] = []
        self._install_console()
        self.owner.every(HALT_CHECK_EVERY, HaltWatch(self).check)

    # -- set-up (before start) -----------------------------------------------------------

    def _install_console(self) -> None:
        def write(_r: VcpuRunner, ex: exits.IoOut) -> None:
            self.console.write(ex.data[::ex.size] if ex.size > 1 else ex.data)

        for port in DEBUG_PORTS + (UART_BASE,):
            self.exits.register_io_out(port, write)
        self.exits.register_io_in(UART_LSR, lambda _r, ex: bytes([LSR_THR_EMPTY]) * (ex.size * ex.count))
        self.exits.register_io_in(0xE9, lambda _r, ex: bytes([0xE9]) * (ex.size * ex.count))

    def register_msr(self, index: int, read: MsrReadHandler | None = None,
                     write: MsrWriteHandler | None = None) -> None:
        """Trap an MSR to user space. A read handler returning None, or a write handler
        returning False, injects #GP as the hardware would."""
        self.exits.register_msr(index, read, write)
        self._base.trap_msrs(self.exits.trapped_msrs())

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        """Replace every vCPU's CPUID table (before start)."""
        self.cpuid = list(entries)
        for r in self.runners:
            r.vcpu.set_cpuid2(vcpu_cpuid(self.cpuid, r.index))

    def add_shutdown_listener(self, fn: Callable[[ShutdownStatus], None]) -> None:
        """fn(status) runs on the owner when the run ends."""
        self._shutdown_listeners.append(fn)

    def set_boot_cpu(self, index: int, boot: BootCpu) -> None:
        """Give a vCPU its starting registers (while it does not run)."""
        v = self.runners[index].vcpu
        v.set_sregs(boot.sregs)
        v.set_regs(boot.regs)
        v.set_mp_state(K.KVM_MP_STATE_RUNNABLE)
        v.reload_synced()

    # -- power-on state (for reset) ------------------------------------------------------

    def reset_hardware(self) -> None:
        """Power-on state for every vCPU and the irqchip, RAM zeroed, overlays and balloon
        undone. With the machine paused (or not started); the caller reloads the image."""
        self._on_owner(self._reset_hardware)

    def _reset_hardware(self) -> None:
        self._require_still()
        for r, st in zip(self.runners, self._power_on):
            st.apply(r.vcpu)
            r.started = False
        if self._vm_power_on is not None:
            self._vm_power_on.apply(self.vm)
        self.memmap.clear()
        self.ram.zero()

    def rearm(self) -> None:
        """After the run ended (a guest shutdown or reboot), make the machine startable again:
        threads joined, status cleared, hardware at power-on. The caller reloads the image."""
        self._on_owner(self._rearm)

    def _rearm(self) -> None:
        if self.state != "stopped":
            raise StateError(f"machine is {self.state}, not stopped", self.state, ("stopped",))
        for r in self.runners:
            r.join(5.0)
            if r.thread is not None and r.thread.is_alive():
                raise StateError(f"vcpu{r.index} did not stop", self.state)
        for r in self.runners:
            r.reset_thread_state()
        with self._status_lock:
            self.status = None
        self._done.clear()
        self._pause_depth = 0
        self._transient = []
        self.state = "created"
        self._reset_hardware()

    # -- running -------------------------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        self._on_owner(self._start, paused)

    def _start(self, paused: bool) -> None:
        if self.state != "created":
            raise StateError(f"machine is {self.state}, not created", self.state, ("created",))
        self._pause_depth = 1 if paused else 0
        if self.irqchip:
            self._rebuild_apic_map()
        for r in self.runners:
            r.start(paused=paused, spawn=self.spawn)
        if paused:
            self.wait_runners(lambda r: r.state in (VcpuState.PAUSED, VcpuState.STOPPED))
        self.state = "paused" if paused else "running"

    def spawn(self, work: Callable[[], object], name: str) -> threading.Thread:
        """A daemon thread running ``work``: a thread made ahead with the VM (PreparedVm,
        already scheduled: handing it work waits for nothing) while there is one, else a
        new one."""
        try:
            t = self._parked.pop()
        except IndexError:
            t = threading.Thread(target=work, name=name, daemon=True)
            t.start()
            return t
        t.launch(work, name)
        return t

    def _rebuild_apic_map(self) -> None:
        """KVM routes IPIs through a map from APIC IDs to vCPUs that it builds while each
        vCPU is created, before that vCPU is listed in the VM: a secondary vCPU can be missing
        from it, and INIT/SIPI sent to it are dropped (it never starts). Writing every local
        APIC back unchanged (KVM_SET_LAPIC) rebuilds the map with all of them."""
        for r in self.runners:
            r.vcpu.set_lapic(r.vcpu.get_lapic())

    def pause(self) -> None:
        """Stop the world: returns once every vCPU is parked with its state complete. Nests."""
        self._on_owner(self._pause)

    def _pause(self) -> None:
        self._pause_depth += 1
        if self._pause_depth > 1 or self.state != "running":
            return
        for r in self.runners:
            r.request_pause()
        self.wait_runners(lambda r: r.state in (VcpuState.PAUSED, VcpuState.STOPPED))
        if self.state == "running":
            self.state = "paused"

    def resume(self) -> None:
        self._on_owner(self._resume)

    def _resume(self) -> None:
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

    @property
    def pause_depth(self) -> int:
        return self._pause_depth

    def change_memory(self, fn: Callable[[MemoryMap], object]) -> object:
        """Change the memory map on the owner. A change laid in place (an overlay over RAM)
        runs while the vCPUs run; one that changes KVM's slots first takes every vCPU out of
        the guest, so none sees half of it. A vCPU handler calls this through
        ``runner.ask_owner``."""
        return self._on_owner(self._change_memory, fn)

    def _change_memory(self, fn: Callable[[MemoryMap], object]) -> object:
        try:
            return fn(self.memmap)
        finally:
            transient, self._transient = self._transient, []
            if self._pause_depth == 0:
                for r in transient:
                    r.release()

    def _vcpus_out(self) -> None:
        """The memory map's hook before KVM's slots change: no vCPU may be in the guest."""
        if self._pause_depth:
            return      # every vCPU is held paused already
        for r in self.runners:
            # every live runner is asked: one shown paused may have been released a moment
            # ago and be about to run; one waiting for the owner counts as out, but its
            # request may be answered during this wait, and it must not re-enter the guest
            if r.thread is not None and r.state != VcpuState.STOPPED and r not in self._transient:
                r.request_pause()
                self._transient.append(r)
        if self._transient:
            self.wait_runners(lambda r: r.out_of_guest)

    def wait_runners(self, ok: Callable[[VcpuRunner], bool], timeout: float = PAUSE_TIMEOUT) -> None:
        """On the owner: wait until ok(runner) holds for every runner, serving vCPU requests
        meanwhile and kicking the laggards again now and then."""
        owner = self.owner
        rounds = max(1, int(timeout / 0.05))
        for _ in range(rounds):
            if owner.wait_until(lambda: all(ok(r) for r in self.runners), 0.05):
                return
            for r in self.runners:
                if not ok(r):
                    r.kick_again()
        for r in self.runners:
            if not ok(r):
                log.error("vcpu%d did not stop within %.0f s (it is %s)", r.index, timeout, r.state)

    def replace_ram(self, backing: Backing, overlays: dict[str, tuple[int, Backing]] | None = None,
                    ballooned: list[int] | None = None) -> None:
        """See ram.replace_ram."""
        ramswap.replace_ram(self, backing, overlays, ballooned)

    def detach_ram(self, src_fd: int, src_offset: int, stop: threading.Event | None = None) -> bool:
        """See ram.detach_ram."""
        return ramswap.detach_ram(self, src_fd, src_offset, stop)

    @contextmanager
    def host_access(self) -> Iterator[None]:
        """Hold while touching guest RAM through host addresses or views from a thread that
        is neither a vCPU nor the owner: RAM is not replaced meanwhile."""
        if on_ram_thread():
            yield
            return
        with self.ram_lock:
            yield

    def _on_owner(self, fn: Callable[..., object], *args: object):
        if self.owner is None or self.owner.on_owner():
            return fn(*args)
        return self.owner.run(fn, *args)

    def _require_still(self) -> None:
        moving = [r.index for r in self.runners if not r.out_of_guest]
        if moving and self.state == "running":
            raise StateError("the VM must be paused for this", "running", ("paused",))

    # -- the end of a run ----------------------------------------------------------------

    def request_shutdown(self, reason: str, code: int = 0, detail: str = "") -> None:
        """End the run (from any thread, handlers included). The first reason wins; the owner
        stops every vCPU and tells the listeners."""
        with self._status_lock:
            if self.status is not None:
                return
            self.status = ShutdownStatus(reason, code, detail)
        log.info("guest stopped: %s (code %d) %s", reason, code, detail)
        if self.owner is not None and self.owner.alive and not self.owner.on_owner():
            self.owner.submit(self._end_run)
        else:
            self._end_run()

    def _end_run(self) -> None:
        if self.state == "stopped":
            return
        for r in self.runners:
            r.request_stop()
        self.state = "stopped"
        self._done.set()
        for fn in self._shutdown_listeners:
            try:
                fn(self.status)
            except Exception:  # noqa: BLE001
                log.exception("shutdown listener failed")

    def _stop_run(self, runner: VcpuRunner, reason: str, detail: str) -> None:
        self.request_shutdown(reason, 0, f"vcpu{runner.index}: {detail}")

    def _runner_failed(self, runner: VcpuRunner, error: str) -> None:
        self.request_shutdown("internal-error", 0, f"vcpu{runner.index}: {error}")

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
        while self._parked:
            self._parked.pop().cancel()
        if self.owner is not None:
            self.owner.close()
        for r in self.runners:
            r.vcpu.close()
        self.vm.close()
        self.console.flush()

    # -- introspection -------------------------------------------------------------------

    def guest_long_mode(self, index: int = 0) -> bool:
        return self.runners[index].vcpu.in_long_mode()

    def vcpu_info(self) -> list[dict]:
        return [{"cpu": r.index, "state": r.state.value,
                 "rip": r.vcpu.synced_rip() if r.vcpu.fd >= 0 else 0,
                 "exits": dict(r.exit_counts), "thread_id": r.thread.native_id if r.thread else None}
                for r in self.runners]


def _phys_bits(cpuid: list[CpuidEntry]) -> int:
    for e in cpuid:
        if e.function == 0x80000008:
            return max(32, min(52, e.eax & 0xFF))
    return 36
