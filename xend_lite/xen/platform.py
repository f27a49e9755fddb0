"""XenPlatform: what makes one KVM machine look like Xen to its guest, composed from the
hypercall families (version, memory, hvm, console, sched, event channels, grant table,
vcpu_op), the devices behind them (overlay, event channels, timers, console ring, xenstore)
and the CPUID leaves and hypercall page that let the guest find them.

Set-up happens here, before the machine runs. At run time the families serve hypercalls on
the vCPU threads; changes that concern the whole VM (overlays, ballooning, soft reset) run
on the VM owner, whoever asks for them: ``change_overlay`` is the one request both the
guest's XENMEM_add_to_physmap and the operator's xen-overlay-map make.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Callable

from xend_lite.errors import GuestMemoryError, InvalidArgument
from xend_lite.kvm import Vcpu
from xend_lite.machine.backing import INVALID_GPA, PAGE_SIZE
from xend_lite.machine.loader import e820_map
from xend_lite.machine.machine import vcpu_cpuid
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set
from xend_lite.xen import cpuid as xcpuid
from xend_lite.xen.console import Console, GuestPage
from xend_lite.xen.dispatch import NATIVE, hypercall_table
from xend_lite.xen.evtchn import EventChannels
from xend_lite.xen.evtchn_mirror import EvtchnMirror
from xend_lite.xen.evtchn_op import EvtchnOps
from xend_lite.xen.grant import GrantOps
from xend_lite.xen.hvm import HvmOps, Upcalls
from xend_lite.xen.hypercall import HYPERCALL_PAGE, HYPERCALL_PORT, Hypercalls
from xend_lite.xen.memory import MemoryOps
from xend_lite.xen.native import NATIVE_HOOK, NativeHypercalls, UntakenFlags
from xend_lite.xen.overlay import SHARED_INFO, OverlayDevice
from xend_lite.xen.ringpoll import POLL_EVERY, RingPoll
from xend_lite.xen.runstate import Runstates
from xend_lite.xen.sched import SchedOps
from xend_lite.xen.shinfo import SharedInfo
from xend_lite.xen.timekeeping import Clock
from xend_lite.xen.timers import Timers
from xend_lite.xen.vcpu_op import VcpuOps
from xend_lite.xen.vcputime import VcpuTime
from xend_lite.xen.version import VersionOps
from xend_lite.xen.xenabi import X
from xend_lite.xen.xenstore.backend import XenstoreBackend
from xend_lite.xen.xenstore.toolstack import DomainInfo

if TYPE_CHECKING:
    from xend_lite.machine.machine import Machine
    from xend_lite.machine.vcpu import VcpuRunner
    from xend_lite.xen.hypercall import Call
    from xend_lite.xen.persist import XenPersist

log = logging.getLogger("xend_lite.xen")

U64 = (1 << 64) - 1
Emit = Callable[[str, dict], None]
#: the MSRs the platform sends to user space (a VM made before its platform can trap them
#: ahead: machine/prepared.py)
TRAPPED_MSRS = (xcpuid.HYPERCALL_MSR,)


class XenConfig(Frozen):
    __slots__ = ("xen_version", "domid", "grant_frames", "backend", "kvm_xen_available", "name",
                 "native_hypercalls")
    xen_version: str
    domid: int
    grant_frames: int
    backend: str
    kvm_xen_available: bool
    name: str
    native_hypercalls: bool     # serve dispatch.NATIVE in C on the vCPU thread

    def __init__(self, xen_version: str = "4.16", domid: int = 1, grant_frames: int = 64,
                 backend: str = "auto", kvm_xen_available: bool = False, name: str = "xend-lite",
                 native_hypercalls: bool = True):
        _set(self, "xen_version", xen_version)
        _set(self, "domid", domid)
        _set(self, "grant_frames", grant_frames)
        _set(self, "backend", backend)
        _set(self, "kvm_xen_available", kvm_xen_available)
        _set(self, "name", name)
        _set(self, "native_hypercalls", native_hypercalls)


class OverlayChange(Frozen):
    """Map, move or (at INVALID_GPA) unmap an overlay page, asked by the guest or the
    operator. Only the operator may ``force`` a change to a page the guest mapped itself."""

    __slots__ = ("page", "gpa", "by", "force", "long_mode", "vcpu")
    page: str
    gpa: int
    by: str                       # "guest" or "operator"
    force: bool
    long_mode: bool | None
    vcpu: Vcpu | None             # the guest's calling vCPU (its TSC stamps the time)

    def __init__(self, page: str, gpa: int, by: str = "operator", force: bool = False,
                 long_mode: bool | None = None, vcpu: Vcpu | None = None):
        _set(self, "page", page)
        _set(self, "gpa", gpa)
        _set(self, "by", by)
        _set(self, "force", force)
        _set(self, "long_mode", long_mode)
        _set(self, "vcpu", vcpu)


class XenPlatform:
    def __init__(self, machine: Machine, cfg: XenConfig, emit: Emit | None = None, *,
                 store_tree: bool = True):
        """``store_tree`` False: the guest comes from a snapshot, whose xenstore replaces
        the toolstack's tree; the tree is kept back (``tree_pending``) and written only if
        the snapshot has no store (persist.apply)."""
        try:
            major, minor = xcpuid.parse_version(cfg.xen_version)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if not 0 < cfg.domid < X.DOMID_FIRST_RESERVED:
            raise InvalidArgument(f"domid must be between 1 and {X.DOMID_FIRST_RESERVED - 1}")
        self.machine = machine
        self.cfg = cfg
        self.domid = cfg.domid
        self.version_tuple = (major, minor)
        self.nr_vcpus = len(machine.runners)
        self.emit: Emit = emit or (lambda _e, _d: None)
        machine.xen_mode = True
        self.overlay = OverlayDevice(machine, grant_frames=cfg.grant_frames, backend=cfg.backend,
                                     kvm_xen_available=cfg.kvm_xen_available)
        self.hypercall_page: int | None = None
        self.params: dict[int, int] = {}
        self.shinfo = SharedInfo(machine, self.overlay)
        self.version = VersionOps(major, minor, self.domid)
        self.native = NativeHypercalls(self.nr_vcpus, self.version.version_word, NATIVE,
                                       cfg.native_hypercalls)
        self.clock = Clock(self.native.timers.set_clock)
        self.native.set_fds(machine.vm.fd, [r.vcpu.fd for r in machine.runners])
        self.upcalls = Upcalls(machine.vm, self.params, self.shinfo.upcall_pending,
                               UntakenFlags(self.native.events))
        self.evtchn = EventChannels(machine, self.shinfo, self.upcalls)
        self.evtchn_mirror = self._mirror_events()
        self.time = VcpuTime(machine, self.shinfo, self.clock, self.nr_vcpus)
        self.timers = Timers(machine, self.clock, self.evtchn, self._tick, self.native.timers)
        self.runstates = Runstates(machine.mem, self.clock)
        self.store_gpa, self.console_gpa = self._reserve_special_pages()
        self.console = Console(machine.console, machine.mem, self.console_gpa)
        self.xenstore = XenstoreBackend(self.domid, GuestPage(machine.mem, self.store_gpa))
        self.grants = GrantOps(self.domid, self.overlay)
        self.memory = MemoryOps(self.domid, machine, self.overlay, self.grants,
                                self._guest_map_overlay, lambda: e820_map(machine))
        self.hvm = HvmOps(self.domid, self.nr_vcpus, self.params, self.upcalls, self.overlay, self.clock)
        self.sched = SchedOps(self.clock, self.timers, self.evtchn, self.shinfo,
                              self._guest_shutdown, self._guest_soft_reset, self.runstates)
        self.evtchn_ops = EvtchnOps(self.domid, self.nr_vcpus, self.evtchn, machine.memmap)
        self.vcpu_ops = VcpuOps(machine, self.shinfo, self.time, self.clock, self.timers,
                                self.runstates, self.evtchn)
        self.hypercalls = Hypercalls(machine.mem, hypercall_table(self), self.native,
                                     wake=lambda: self.evtchn.wake(0))
        self._persist: XenPersist | None = None
        self.tree_pending: DomainInfo | None = None
        self._msi_failed = 0          # native MSI failures logged so far
        self._install(store_tree)

    def _mirror_events(self) -> EvtchnMirror:
        """The C copy of the event channels the native send and unmask read, and the hooks
        that keep it current."""
        mirror = EvtchnMirror(self.native.events, self.evtchn, self.shinfo, self.upcalls,
                              self.machine.memmap)
        self.evtchn.mirror = mirror
        self.evtchn.native_sends = self.native.sends
        self.overlay.on_mode_change = mirror.delivery
        self.shinfo.on_change = mirror.delivery
        self.upcalls.on_change = mirror.delivery
        self.machine.memmap.ram_listeners.append(mirror.memory)
        mirror.everything()
        return mirror

    def _tick(self) -> None:
        """The timer thread's regular work: refresh guest time, retry untaken upcalls, log
        upcalls C failed to send (as Upcalls.inject logs its own)."""
        self.time.refresh()
        with self.machine.host_access():
            self.upcalls.retry_all()
        failed, err = self.native.msi_failures()
        if failed != self._msi_failed:
            log.warning("%d upcall(s) sent by native event-channel calls failed: "
                        "KVM_SIGNAL_MSI: %s", failed - self._msi_failed, os.strerror(err))
            self._msi_failed = failed

    @property
    def persist(self) -> XenPersist:
        """Saving and loading; imported when first used (it brings in the snapshot layer,
        which a guest that is never saved does not need)."""
        if self._persist is None:
            from xend_lite.xen.persist import XenPersist

            self._persist = XenPersist(self)
        return self._persist

    # -- set-up --------------------------------------------------------------------------

    def _install(self, store_tree: bool) -> None:
        m = self.machine
        cfg = xcpuid.XenCpuidConfig(*self.version_tuple, self.domid, self.time.tsc_khz)
        for r in m.runners:
            r.vcpu.set_cpuid2(vcpu_cpuid(xcpuid.build_cpuid(m.cpuid, cfg, r.index), r.index))
        m.register_msr(xcpuid.HYPERCALL_MSR, write=self._write_hypercall_msr)
        m.exits.register_doorbell(HYPERCALL_PORT, self.hypercalls.on_hypercall, hook=NATIVE_HOOK,
                                  ctx=self.native.ctx)
        # the store's backend is replaced by a reset (soft_reset): the poll serves the current one
        self.ring_poll = RingPoll(lambda: m.state == "running",
                                  [self.console.serve, lambda: self.xenstore.serve()])
        self._default_params(store_tree)
        m.owner.every(POLL_EVERY, self.ring_poll)

    def _reserve_special_pages(self) -> tuple[int, int]:
        """The xenstore and console rings: real guest pages, reported reserved in the e820."""
        mm = self.machine.memmap
        low_top = min(r.end for r in mm.ram if r.gpa == 0)
        store, console = low_top - 2 * PAGE_SIZE, low_top - PAGE_SIZE
        if "xenstore" not in {n for _g, _s, n in mm.reserved}:
            mm.reserved.append((store, PAGE_SIZE, "xenstore"))
            mm.reserved.append((console, PAGE_SIZE, "xen-console"))
        return store, console

    def _default_params(self, store_tree: bool = True) -> None:
        """The store and console ports, bound to their backends, and the toolstack's tree
        (kept back in ``tree_pending`` unless ``store_tree``)."""
        ev = self.evtchn
        store_port, store_dport = ev.bind_to_daemon(lambda: self._guest_signalled(self.xenstore.serve))
        console_port, console_dport = ev.bind_to_daemon(lambda: self._guest_signalled(self.console.serve))
        self.xenstore.notify = lambda: ev.notify_guest(store_dport)
        self.console.notify = lambda: ev.notify_guest(console_dport)
        self.params.clear()
        self.params.update({X.HVM_PARAM_STORE_PFN: self.store_gpa >> 12,
                            X.HVM_PARAM_CONSOLE_PFN: self.console_gpa >> 12,
                            X.HVM_PARAM_STORE_EVTCHN: store_port,
                            X.HVM_PARAM_CONSOLE_EVTCHN: console_port})
        tree = DomainInfo(
            name=self.cfg.name, memory_kib=self.machine.memory_bytes >> 10, vcpus=self.nr_vcpus,
            store_port=store_port, store_ring_ref=self.store_gpa >> 12,
            console_port=console_port, console_ring_ref=self.console_gpa >> 12)
        self.tree_pending = None if store_tree else tree
        if store_tree:
            self.xenstore.write_domain_tree(tree)

    def _guest_signalled(self, serve: Callable[[], bool]) -> None:
        self.ring_poll.activity()
        serve()

    # -- the hypercall page --------------------------------------------------------------

    def _write_hypercall_msr(self, runner: VcpuRunner, value: int) -> bool:
        """The guest names its hypercall page: fill it, or #GP as Xen does for a bad one."""
        if value & 0xFFF:          # page index: Xen offers exactly one page
            return False
        gpa = value & ~0xFFF & U64
        seg = self.machine.memmap.find(gpa)
        if seg is None or seg.kind != "ram" or seg.end < gpa + PAGE_SIZE:
            return False
        try:
            self.machine.mem.write(gpa, HYPERCALL_PAGE)
        except GuestMemoryError:
            return False
        self.hypercall_page = gpa
        self.overlay.long_mode = runner.vcpu.in_long_mode()
        return True

    # -- VM-wide requests (on the owner) -------------------------------------------------

    def change_overlay(self, ch: OverlayChange) -> dict:
        """The one path for overlay changes. On the owner."""
        ov = self.overlay
        page = ov.check_page(ch.page)
        gpa = ch.gpa
        if not isinstance(gpa, int) or isinstance(gpa, bool) or not 0 <= gpa <= INVALID_GPA:
            raise InvalidArgument("gpa must be an integer from 0 to 2^64-1")
        was = ov.gpa(page)
        guest_had = was is not None and ov.mapped_by.get(page) == "guest"
        mapped = gpa != INVALID_GPA
        if ch.by == "operator":
            if mapped:
                self._refuse_reserved(gpa)
            if guest_had and not ch.force:
                raise InvalidArgument(
                    f"the guest mapped {page} at {was:#x} itself and is not told of "
                    "changes: moving or unmapping it breaks the guest (pass force=true to do it "
                    "anyway)")
        if ch.long_mode is not None and page == SHARED_INFO:
            ov.long_mode = ch.long_mode
        ov.apply(page, gpa, ch.by)
        if mapped and page == SHARED_INFO and ch.vcpu is not None:
            # the guest's own map: its TSC stamps a record now and the timer thread keeps it
            # current from then on, in the page wherever it lies (or whether it lies at
            # all), so a later map or move by anyone finds a live record without one
            self.time.publish_from(ch.vcpu)
            self.timers.start_refresh()
        entry = ov.entry_at(page, gpa if mapped else None)
        data = {"page": page, "by": ch.by}
        if mapped:
            data["gpa"] = gpa
        if ch.by == "operator" and guest_had:
            entry["guest_not_told"] = data["guest_not_told"] = True
        self.emit("XEN_OVERLAY_MAPPED" if mapped else "XEN_OVERLAY_UNMAPPED", data)
        return entry

    def _refuse_reserved(self, gpa: int) -> None:
        for g, n, name in self.machine.memmap.reserved:
            if g <= gpa < g + n:
                raise InvalidArgument(f"gpa {gpa:#x} is the {name} ring page: overlays may not "
                                      "cover it")

    def _guest_map_overlay(self, c: Call, page: str, gpa: int) -> None:
        long_mode = c.vcpu.in_long_mode() if page == SHARED_INFO else None
        c.runner.ask_owner(self.change_overlay, OverlayChange(page, gpa, "guest", False, long_mode,
                                                              c.vcpu))

    def _guest_shutdown(self, runner: VcpuRunner, name: str, reason: int) -> None:
        self.console.flush_output()
        code = self.sched.shutdown_code if self.sched.shutdown_code is not None else 0
        detail = f"vcpu{runner.index}: SCHEDOP_shutdown({name}" + \
                 (f" reason {reason})" if name == "unknown" else ")")
        self.machine.request_shutdown(name, code, detail)

    def _guest_soft_reset(self, runner: VcpuRunner) -> None:
        runner.ask_owner(self.soft_reset)

    def soft_reset(self, fresh_store: bool = False) -> None:
        """Xen's soft reset: overlays unmapped and zeroed, event channels closed, vcpu_info
        back in shared_info, timers stopped, xenstore watches and transactions dropped;
        guest memory is left alone. On the owner."""
        self.timers.stop_all()
        self.time.forget()
        self.runstates.reset()
        self.evtchn.reset()
        self.shinfo.reset()
        self.upcalls.vectors.clear()
        self.upcalls.untaken.clear()
        self.overlay.reset()
        self.console.reset()
        if fresh_store:
            self.xenstore = XenstoreBackend(self.domid, GuestPage(self.machine.mem, self.store_gpa))
        else:
            self.xenstore.reset()
        self._default_params()
        self.evtchn_mirror.everything()

    def reset(self) -> None:
        """A system reset: everything back to how a new domain starts. On the owner."""
        self.soft_reset(fresh_store=True)
        self.hypercall_page = None
        self.sched.shutdown_code = None
        self.grants.frames_in_use = 1
        self.memory.guest_map = None
        self.clock.set_now(0)
        self.time.forget()
        self.hypercalls.reset_counters()

    def close(self) -> None:
        self.timers.close()

    # -- introspection -------------------------------------------------------------------

    @property
    def internal_errors(self) -> int:
        return self.hypercalls.internal_errors

    @internal_errors.setter
    def internal_errors(self, n: int) -> None:
        self.hypercalls.internal_errors = n

    def counters(self) -> dict:
        return self.hypercalls.counters() | {"event_sends": self.evtchn.sends,
                                             "hypercall_page": self.hypercall_page}
