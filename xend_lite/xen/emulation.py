"""XenEmulation: what makes a KVM VM look like Xen to its guest.

It installs the CPUID leaves, traps the hypercall-page MSR, fills the page with stubs, and
answers every hypercall the stubs bring to the daemon. A stub is ``mov $nr, %eax; out %al,
$HYPERCALL_PORT; ret``: the same bytes work in 64-bit and 32-bit code and change no register
but RAX. The port write reaches the vCPU thread's hot path (a machine doorbell); dispatch reads
the arguments from the synced registers in the guest's current convention, runs one handler
from the table, and writes the result to RAX, all without another ioctl.

Handlers behave as Xen does toward an unprivileged HVM guest: its numbers, its structs, its
errno values, its order of argument checks. A handler raises XenError for a failure; any other
exception is a bug, counted and answered with -EINVAL, never allowed out of the vCPU loop.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from xend_lite.errors import GuestMemoryError, InvalidArgument
from xend_lite.kvm import KvmError
from xend_lite.xen.native import CALL_LONG, CALL_USER, DECODE_CALL, host_tsc
from xend_lite.xen.xenabi import X
from xend_lite.machine.machine import MemoryBusy
from xend_lite.machine.memory import INVALID_GPA, PAGE_SIZE
from xend_lite.snapshot.state import State
from xend_lite.xen import cpuid as xcpuid
from xend_lite.xen.abi import (PERIODIC_MAX_NS, PERIODIC_MIN_NS, SHINFO32, SHINFO64, TIME_FLAGS, TIME_TSC,
                               TIME_VERSION, SharedInfoLayout, guest_layout)
from xend_lite.xen.errors import Restart, XenError
from xend_lite.xen.evtchn import EventChannels
from xend_lite.xen.guestview import GuestView
from xend_lite.xen.timekeeping import Clock, scale_delta, tsc_scale

if TYPE_CHECKING:
    from xend_lite.machine.machine import Machine
    from xend_lite.machine.vcpu import VcpuRunner
    from xend_lite.xen.overlay import OverlayDevice

log = logging.getLogger("xend_lite.xen")

HYPERCALL_PORT = 0xE4
STUB_SIZE = 32
NR_STUBS = PAGE_SIZE // STUB_SIZE
TABLE_SIZE = 64
EFER_LMA = 1 << 10
MSR_IA32_TSC = 0x10
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
TIME_REFRESH = 1.0   # seconds between vcpu_time_info refreshes, as Xen's calibration

HYPERCALL_NAMES: dict[int, str] = {}
SHUTDOWN_REASONS: dict[int, str] = {}


def _names() -> None:
    from xend_lite.xen._xen import lib

    for n in dir(lib):
        if n.startswith("__HYPERVISOR_"):
            HYPERCALL_NAMES[getattr(lib, n)] = n.removeprefix("__HYPERVISOR_")
        elif n.startswith("SHUTDOWN_"):
            SHUTDOWN_REASONS[getattr(lib, n)] = n.removeprefix("SHUTDOWN_").replace("_", "-")


_names()

PRIVILEGED = {X.__HYPERVISOR_platform_op, X.__HYPERVISOR_sysctl, X.__HYPERVISOR_domctl,
              X.__HYPERVISOR_kexec_op, X.__HYPERVISOR_dm_op}



def stub(nr: int) -> bytes:
    """One hypercall stub: mov $nr,%eax; out %al,$port; ret; padded with int3."""
    code = b"\xb8" + nr.to_bytes(4, "little") + bytes([0xE6, HYPERCALL_PORT, 0xC3])
    return code.ljust(STUB_SIZE, b"\xcc")


HYPERCALL_PAGE = b"".join(stub(i) for i in range(NR_STUBS))
_EPERM, _ENOSYS, _EINVAL = -X.XEN_EPERM, -X.XEN_ENOSYS, -X.XEN_EINVAL


def _arity(fn: Callable) -> int:
    """How many argument registers a handler takes (it is called with exactly those)."""
    import inspect

    params = list(inspect.signature(fn).parameters.values())[1:]   # after the Call
    return 5 if any(p.kind == p.VAR_POSITIONAL for p in params) else len(params)


class Call:
    """One hypercall in progress on one vCPU."""

    __slots__ = ("xen", "runner", "vcpu", "index", "long_mode", "_view")

    def __init__(self, xen: XenEmulation, runner: VcpuRunner, long_mode: bool):
        self.xen = xen
        self.runner = runner
        self.vcpu = runner.vcpu
        self.index = runner.index
        self.long_mode = long_mode
        self._view: GuestView | None = None

    @property
    def view(self) -> GuestView:
        if self._view is None:
            self._view = GuestView.for_vcpu(self.xen.machine.mem, self.vcpu, self.long_mode)
        return self._view

    def lay(self, name: str):
        return guest_layout(name, self.long_mode)

    def read(self, name: str, gva: int) -> dict[str, int]:
        return self.view.read_struct(self.lay(name), gva)

    def write(self, name: str, gva: int, **values: int) -> None:
        self.view.write_fields(self.lay(name), gva, values)

    @property
    def ulong(self) -> int:
        return 8 if self.long_mode else 4


@dataclass
class XenState(State):
    """Saved state of the Xen emulation (everything but the overlay pages)."""

    NAME = "xen"
    VERSION = 2
    MIN_VERSION = 1
    hypercall_page: int = -1
    params: dict[str, int] = field(default_factory=dict)
    evtchn: dict[str, Any] = field(default_factory=dict)
    upcall_vectors: dict[str, int] = field(default_factory=dict)
    vcpu_info: dict[str, int] = field(default_factory=dict)
    timers: dict[str, int] = field(default_factory=dict)
    system_time: int = 0
    shutdown_code: int = -1
    counters: dict[str, list[int]] = field(default_factory=dict)
    console: bytes = b""
    # per vCPU: [period, next expiry] of its periodic timer, in ns of Xen system time
    periodic: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def upgrade(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        if version < 2:              # saved before periodic timers existed
            fields = fields | {"periodic": {}}
        return fields


class XenEmulation:
    def __init__(self, machine: Machine, spec: Any):
        self.machine = machine
        self.spec = spec
        major, minor = xcpuid.parse_version(getattr(spec, "xen_version", "4.16"))
        self.version = (major, minor)
        self.domid = int(getattr(spec, "domid", 1))
        if not 0 < self.domid < X.DOMID_FIRST_RESERVED:
            raise InvalidArgument(f"domid must be between 1 and {X.DOMID_FIRST_RESERVED - 1}")
        self.nr_vcpus = len(machine.runners)
        self.clock = Clock()
        self.overlay: OverlayDevice | None = None
        self.evtchn = EventChannels(self)
        self.hypercall_page: int | None = None
        self.params: dict[int, int] = {}
        self.upcall_vectors: dict[int, int] = {}
        self.vcpu_info_gpa: dict[int, int] = {}
        self.shutdown_code: int | None = None
        self.calls = [0] * (TABLE_SIZE + 1)
        self.errors = [0] * (TABLE_SIZE + 1)
        self.internal_errors = 0
        self.console_input = bytearray()
        self.grant_frames_in_use = 1
        self._time_lock = threading.Lock()
        self._time_anchor: tuple[int, int] | None = None
        self._time_last: tuple[int, int, int, int] | None = None
        self._tsc_offset: int | None = None
        self.emit: Callable[[str, dict], None] = lambda _e, _d: None
        self._lock = threading.RLock()
        self.timers = Timers(self)
        try:
            self.tsc_khz = machine.runners[0].vcpu.get_tsc_khz()
        except KvmError:
            self.tsc_khz = 0
        self.tsc_mul, self.tsc_shift = tsc_scale(self.tsc_khz or 1_000_000)
        self._table: list[tuple[Callable, int] | None] = [None] * TABLE_SIZE
        for nr, fn in self._handlers().items():
            self._table[nr] = (fn, _arity(fn))
        self._calls: dict[int, Call] = {}
        self._install()

    # -- set-up --------------------------------------------------------------------------

    def _install(self) -> None:
        m = self.machine
        m.xen_mode = True
        cfg = xcpuid.XenCpuidConfig(self.version[0], self.version[1], self.domid, self.tsc_khz,
                                    m.phys_bits)
        for r in m.runners:
            r.vcpu.set_cpuid2(xcpuid.build_cpuid(m.cpuid, cfg, r.index))
        m.register_msr(xcpuid.HYPERCALL_MSR, write=self._write_hypercall_msr)
        m.register_doorbell(HYPERCALL_PORT, self._on_hypercall, hook=DECODE_CALL)
        self._reserve_special_pages()
        self._default_params()

    def _reserve_special_pages(self) -> None:
        """The xenstore and console rings: real guest pages, reported reserved in the e820."""
        mm = self.machine.memmap
        low_top = min(r.end for r in mm.ram if r.gpa == 0)
        self.store_gpa = low_top - 2 * PAGE_SIZE
        self.console_gpa = low_top - PAGE_SIZE
        names = {n for _g, _s, n in mm.reserved}
        if "xenstore" not in names:
            mm.reserved.append((self.store_gpa, PAGE_SIZE, "xenstore"))
            mm.reserved.append((self.console_gpa, PAGE_SIZE, "xen-console"))

    def _default_params(self) -> None:
        self.params = {
            X.HVM_PARAM_STORE_PFN: self.store_gpa >> 12,
            X.HVM_PARAM_CONSOLE_PFN: self.console_gpa >> 12,
            X.HVM_PARAM_STORE_EVTCHN: self.evtchn.bind_to_daemon(),
            X.HVM_PARAM_CONSOLE_EVTCHN: self.evtchn.bind_to_daemon(),
        }

    def attach_overlay(self, overlay: OverlayDevice) -> None:
        self.overlay = overlay

    # -- shared_info access (for event channels and time) --------------------------------

    def shinfo_layout(self) -> SharedInfoLayout:
        return SHINFO64 if self.overlay is None or self.overlay.long_mode else SHINFO32

    def shinfo_addr(self) -> int:
        return self.overlay.shared_info.addr

    def read_shinfo_bit(self, off: int, bit: int, word: int) -> bool:
        v = self.overlay.shared_info.view
        return bool(int.from_bytes(v[off:off + word], "little") >> bit & 1)

    def _vcpu_info_slot(self, vcpu: int):
        """(backing, offset) of a vCPU's vcpu_info: where it registered it in guest memory,
        else its slot in shared_info; None when it has none."""
        gpa = self.vcpu_info_gpa.get(vcpu)
        if gpa is not None:
            seg = self.machine.memmap.find(gpa)
            if seg is None or seg.end < gpa + 64:
                return None
            return seg.backing, seg.offset + gpa - seg.gpa
        if vcpu < 32 and self.overlay is not None:
            return self.overlay.shared_info, vcpu * 64
        return None

    def vcpu_info_addr(self, vcpu: int) -> int:
        """Host address of a vCPU's vcpu_info, or 0 when it has none."""
        slot = self._vcpu_info_slot(vcpu)
        return 0 if slot is None else slot[0].addr + slot[1]

    def _vcpu_info_view(self, vcpu: int) -> tuple[memoryview, int] | None:
        slot = self._vcpu_info_slot(vcpu)
        return None if slot is None else (slot[0].view, slot[1])

    def publish_time(self, guest_tsc: int) -> None:
        """Write every vCPU's vcpu_time_info (guest TSC stamp, system time, scale) and the
        wallclock, each under the odd/even version protocol.

        System time never steps back for a guest extrapolating from the previous record:
        the new stamp's time is at least what the old record gives at that TSC. Over
        longer spans the TSC rate is measured against the host's clock and the scale
        corrected, as Xen's calibration does."""
        if self.overlay is None:
            return
        with self.machine.host_access(), self._time_lock:
            now = self.clock.now()
            anchor = self._time_anchor
            if anchor is None:
                self._time_anchor = (guest_tsc, now)
            elif now - anchor[1] >= 2_000_000_000 and guest_tsc > anchor[0]:
                khz = (guest_tsc - anchor[0]) * 1_000_000 // (now - anchor[1])
                if khz > 0 and abs(khz - self.tsc_khz) * 1000 < self.tsc_khz:   # within 0.1 %
                    self.tsc_mul, self.tsc_shift = tsc_scale(khz)
            last = self._time_last
            if last is not None and guest_tsc >= last[0]:
                now = max(now, last[1] + scale_delta(guest_tsc - last[0], last[2], last[3]))
            self._time_last = (guest_tsc, now, self.tsc_mul, self.tsc_shift)
            record = ((guest_tsc & U64).to_bytes(8, "little") + now.to_bytes(8, "little")
                      + self.tsc_mul.to_bytes(4, "little")
                      + (self.tsc_shift & 0xFF).to_bytes(1, "little") + b"\x00")
            for i in range(self.nr_vcpus):
                vv = self._vcpu_info_view(i)
                if vv is None:
                    continue
                view, off = vv
                t = off + 32
                odd = ((int.from_bytes(view[t:t + 4], "little") + 1) | 1) & U32
                view[t + TIME_VERSION:t + 4] = odd.to_bytes(4, "little")
                view[t + TIME_TSC:t + TIME_FLAGS + 1] = record
                view[t:t + 4] = ((odd + 1) & U32).to_bytes(4, "little")
            self.publish_wallclock()

    def _forget_time(self) -> None:
        with self._time_lock:
            self._time_anchor = self._time_last = self._tsc_offset = None

    def republish_time(self) -> None:
        """Refresh time from any thread, with the guest TSC estimated from the host's."""
        if self._tsc_offset is not None and self.overlay is not None:
            self.publish_time(host_tsc() + self._tsc_offset)

    def publish_wallclock(self) -> None:
        lay = self.shinfo_layout()
        view = self.overlay.shared_info.view
        sec, nsec = self.clock.wallclock_at_zero()
        ver = int.from_bytes(view[lay.wc_version:lay.wc_version + 4], "little")
        odd = (ver + 1) | 1
        view[lay.wc_version:lay.wc_version + 4] = (odd & U32).to_bytes(4, "little")
        view[lay.wc_sec:lay.wc_sec + 4] = (sec & U32).to_bytes(4, "little")
        view[lay.wc_nsec:lay.wc_nsec + 4] = nsec.to_bytes(4, "little")
        view[lay.wc_sec_hi:lay.wc_sec_hi + 4] = ((sec >> 32) & U32).to_bytes(4, "little")
        view[lay.wc_version:lay.wc_version + 4] = ((odd + 1) & U32).to_bytes(4, "little")

    def learn_tsc_offset(self, vcpu) -> int | None:
        """Read this vCPU's TSC (on its thread, or with it paused), remember its offset from
        the host's TSC for later refreshes, start those refreshes, and return it."""
        try:
            before = host_tsc()
            tsc = vcpu.get_msrs([MSR_IA32_TSC]).get(MSR_IA32_TSC)
            after = host_tsc()
        except KvmError:
            return None
        if tsc is None:
            return None
        self._tsc_offset = tsc - (before + after) // 2
        self.timers.start_refresh()
        return tsc

    def publish_time_from(self, vcpu) -> None:
        """Publish time now, stamped with this vCPU's TSC."""
        tsc = self.learn_tsc_offset(vcpu)
        if tsc is not None:
            self.publish_time(tsc)

    # -- delivery to vCPUs ---------------------------------------------------------------

    def inject_upcall(self, vcpu: int) -> None:
        vector = self.upcall_vectors.get(vcpu)
        via = self.params.get(X.HVM_PARAM_CALLBACK_IRQ, 0)
        kind = via >> 56
        try:
            if vector is None and kind == X.HVM_PARAM_CALLBACK_TYPE_VECTOR:
                vector = via & 0xFF
            if vector is not None and vector >= 0x10:
                self.machine.vm.signal_msi(0xFEE00000 | (vcpu & 0xFF) << 12, vector)
            elif kind == X.HVM_PARAM_CALLBACK_TYPE_GSI and vcpu == 0 and 0 < (via & U32) < 24:
                gsi = via & U32
                self.machine.vm.irq_line(gsi, 1)
                self.machine.vm.irq_line(gsi, 0)
        except KvmError as exc:
            log.warning("upcall to vcpu%d failed: %s", vcpu, exc)

    def register_vcpu_info(self, vcpu: int, gpa: int) -> None:
        """Move a vCPU's vcpu_info from shared_info into guest memory, keeping what was
        there and asking the guest to rescan every selector word."""
        with self.machine.host_access():
            self._move_vcpu_info(vcpu, gpa)

    def _move_vcpu_info(self, vcpu: int, gpa: int) -> None:
        old = self._vcpu_info_view(vcpu)
        data = bytes(old[0][old[1]:old[1] + 64]) if old else bytes(64)
        self.vcpu_info_gpa[vcpu] = gpa
        new = self._vcpu_info_view(vcpu)
        if new is None:
            del self.vcpu_info_gpa[vcpu]
            raise XenError(X.XEN_EINVAL, "vcpu_info frame is not memory")
        view, off = new
        view[off:off + 64] = data
        lay = self.shinfo_layout()
        view[off + lay.pending_sel:off + lay.pending_sel + lay.word] = b"\xff" * lay.word
        view[off + lay.upcall_pending] = 1

    def vcpu_is_up(self, vcpu: int) -> bool:
        if vcpu == 0:
            return True
        r = self.machine.runners[vcpu]
        return r.exits_total > 0 or r.last_rip != 0

    def domain_handle(self) -> bytes:
        """The domain's 16-byte handle (a UUID), stable for its life."""
        import uuid

        if not hasattr(self, "_handle"):
            self._handle = uuid.uuid5(uuid.NAMESPACE_OID, f"xend-lite-{self.domid}-{id(self)}").bytes
        return self._handle

    def max_ram_gfn(self) -> int:
        return max(r.end for r in self.machine.memmap.ram) // PAGE_SIZE - 1

    def e820(self) -> list[tuple[int, int, int]]:
        from xend_lite.machine.loader import e820_map

        return e820_map(self.machine)

    def overlay_event(self, page: str, gpa: int) -> None:
        if gpa == INVALID_GPA:
            self.emit("XEN_OVERLAY_UNMAPPED", {"page": page, "by": "guest"})
        else:
            self.emit("XEN_OVERLAY_MAPPED", {"page": page, "gpa": gpa, "by": "guest"})

    def wake_vcpu(self, vcpu: int, port: int = 0) -> None:
        for r in self.machine.runners:
            r.notify()

    # -- the hypercall page --------------------------------------------------------------

    def _write_hypercall_msr(self, runner: VcpuRunner, value: int) -> bool:
        """The guest names its hypercall page: fill it, or #GP as Xen does for a bad one."""
        if value & 0xFFF:          # page index: Xen offers exactly one page
            return False
        gpa = value & ~0xFFF & U64
        mm = self.machine.memmap
        seg = mm.find(gpa)
        if seg is None or seg.kind != "ram" or seg.end < gpa + PAGE_SIZE:
            return False
        try:
            self.machine.mem.write(gpa, HYPERCALL_PAGE)
        except GuestMemoryError:
            return False
        self.hypercall_page = gpa
        if self.overlay is not None:
            self.overlay.long_mode = runner.vcpu.in_long_mode()
        return True

    # -- dispatch ------------------------------------------------------------------------

    def _on_hypercall(self, runner: VcpuRunner) -> int | None:
        # The hot path of every hypercall: the call arrives decoded for the caller's mode
        # (Vcpu.exit_call), one Call object per vCPU is reused, and the result goes back to
        # the vCPU loop, which gives it to the guest with the next KVM_RUN.
        nr, flags, a1, a2, a3, a4, a5 = runner.vcpu.hook_values(7)
        if flags & CALL_USER:
            ret = _EPERM             # not from the guest kernel: Xen refuses
        else:
            entry = self._table[nr] if nr < TABLE_SIZE else None
            if entry is None:
                ret = _EPERM if nr in PRIVILEGED else _ENOSYS
            else:
                fn, nargs = entry
                c = self._calls.get(runner.index)
                if c is None:
                    c = self._calls[runner.index] = Call(self, runner, False)
                c.long_mode = flags & CALL_LONG != 0
                c._view = None
                try:
                    # exactly as many arguments as the handler takes
                    ret = (fn(c, a1, a2) if nargs == 2 else
                           fn(c, a1, a2, a3) if nargs == 3 else
                           fn(c, *(a1, a2, a3, a4, a5)[:nargs]))
                except XenError as exc:
                    ret = -exc.errno
                except (Restart, MemoryBusy):
                    vcpu = runner.vcpu
                    regs = vcpu.synced_regs()
                    regs.rip = (regs.rip - 2) & U64   # back to the stub's `out`
                    vcpu.set_synced_regs(regs)
                    return None
                except Exception:  # noqa: BLE001 - a handler bug must not reach the vCPU loop
                    ret = self._handler_failed(nr)
                    return ret & (U64 if flags & CALL_LONG else U32)
        slot = nr if nr < TABLE_SIZE else TABLE_SIZE
        self.calls[slot] += 1
        if ret < 0:
            self.errors[slot] += 1
        return ret & (U64 if flags & CALL_LONG else U32)

    def _handler_failed(self, nr: int) -> int:
        """A handler raised: the guest gets -EINVAL, and the call is counted (as a call and
        an error) before the internal error is, so whoever sees the internal error sees the
        call too."""
        self.calls[nr] += 1
        self.errors[nr] += 1
        self.internal_errors += 1
        if self.internal_errors <= 10:
            log.exception("hypercall %d failed inside the daemon", nr)
        return _EINVAL

    def counters(self) -> dict:
        out = {}
        for nr in range(TABLE_SIZE + 1):
            if self.calls[nr]:
                name = HYPERCALL_NAMES.get(nr, f"hypercall_{nr}") if nr < TABLE_SIZE else "unknown"
                out[name] = {"calls": self.calls[nr], "errors": self.errors[nr]}
        return {"hypercalls": out, "total": sum(self.calls), "internal_errors": self.internal_errors,
                "event_sends": self.evtchn.sends, "hypercall_page": self.hypercall_page}

    def _handlers(self) -> dict[int, Callable]:
        from xend_lite.xen import hypercalls as h

        return h.table(self)

    # -- control -------------------------------------------------------------------------

    def soft_reset(self, runner: VcpuRunner | None = None) -> None:
        """Xen's soft reset: overlays unmapped and zeroed, event channels closed, vcpu_info
        back in shared_info, timers stopped; guest memory is left alone."""
        self.timers.stop_all()
        self._forget_time()
        self.evtchn.reset()
        self.vcpu_info_gpa.clear()
        self.upcall_vectors.clear()
        if self.overlay is not None:
            if runner is None:
                self.overlay.reset()
            else:
                for name in list(self.machine.memmap.overlays()):
                    self.overlay.map_from_vcpu(runner, name, INVALID_GPA)
                self.overlay.zero_pages()
        self._default_params()

    def reset(self) -> None:
        """A system reset: everything back to how a new domain starts."""
        self.soft_reset()
        self.hypercall_page = None
        self.shutdown_code = None
        self.clock = Clock()
        self._forget_time()
        self.calls = [0] * (TABLE_SIZE + 1)
        self.errors = [0] * (TABLE_SIZE + 1)

    def close(self) -> None:
        self.timers.close()

    # -- saved state ---------------------------------------------------------------------

    def save(self) -> XenState:
        return XenState(
            hypercall_page=-1 if self.hypercall_page is None else self.hypercall_page,
            params={str(k): v for k, v in self.params.items()},
            evtchn=self.evtchn.to_state(),
            upcall_vectors={str(k): v for k, v in self.upcall_vectors.items()},
            vcpu_info={str(k): v for k, v in self.vcpu_info_gpa.items()},
            timers={str(k): v for k, v in self.timers.deadlines().items()},
            system_time=self.clock.now(),
            shutdown_code=-1 if self.shutdown_code is None else self.shutdown_code,
            counters={"calls": list(self.calls), "errors": list(self.errors)},
            console=self.machine.console.tail(64 * 1024),
            periodic={str(k): list(v) for k, v in self.timers.periodics().items()},
        )

    def check_state(self, st: XenState) -> None:
        per_vcpu = list(st.upcall_vectors) + list(st.vcpu_info) + list(st.timers) + list(st.periodic)
        for k in list(st.params) + per_vcpu:
            if not k.isdigit():
                raise InvalidArgument(f"xen state: bad key {k!r}")
        for k in per_vcpu:
            if int(k) >= self.nr_vcpus:
                raise InvalidArgument(f"xen state names vcpu {k}, this domain has {self.nr_vcpus}")
        for v in st.periodic.values():
            if len(v) != 2 or not PERIODIC_MIN_NS <= v[0] <= PERIODIC_MAX_NS:
                raise InvalidArgument("xen state: periodic timer malformed")
        for key in ("ports", "daemon_ports"):
            if not isinstance(st.evtchn.get(key), dict):
                raise InvalidArgument("xen state: event channel table malformed")

    def load(self, st: XenState) -> None:
        self.check_state(st)
        self.timers.stop_all()
        self.hypercall_page = None if st.hypercall_page < 0 else st.hypercall_page
        self.params = {int(k): v for k, v in st.params.items()}
        self.evtchn.from_state(st.evtchn)
        self.upcall_vectors = {int(k): v for k, v in st.upcall_vectors.items()}
        self.vcpu_info_gpa = {int(k): v for k, v in st.vcpu_info.items()}
        self.clock.set_now(st.system_time)
        self._forget_time()
        self.machine.console.restore_ring(st.console)
        self.shutdown_code = None if st.shutdown_code < 0 else st.shutdown_code
        calls, errors = st.counters.get("calls", []), st.counters.get("errors", [])
        if len(calls) == len(self.calls) and len(errors) == len(self.errors):
            self.calls, self.errors = list(calls), list(errors)
        for k, v in st.timers.items():
            self.timers.set(int(k), v)
        for k, (period, expiry) in st.periodic.items():
            self.timers.set_periodic(int(k), period, expiry)


class Timers:
    """Per-vCPU timers in Xen system time, a one-shot and a periodic one each, as Xen has;
    either raises VIRQ_TIMER when it expires."""

    def __init__(self, xen: XenEmulation):
        self.xen = xen
        self._deadline: dict[int, int] = {}
        self._periodic: dict[int, list[int]] = {}     # vcpu -> [period, next expiry]
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start_refresh(self) -> None:
        """Start the thread (it also refreshes guest time every TIME_REFRESH seconds)."""
        with self._cond:
            self._ensure()

    def _ensure(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="xen-timers", daemon=True)
            self._thread.start()

    def set(self, vcpu: int, deadline_ns: int) -> None:
        with self._cond:
            self._deadline[vcpu] = deadline_ns
            self._ensure()
            self._cond.notify()

    def stop(self, vcpu: int) -> None:
        with self._cond:
            self._deadline.pop(vcpu, None)

    def stop_all(self) -> None:
        with self._cond:
            self._deadline.clear()
            self._periodic.clear()

    def set_periodic(self, vcpu: int, period_ns: int, expiry: int | None = None) -> None:
        """Expire every period_ns from now (or first at ``expiry``), until stopped."""
        with self._cond:
            first = self.xen.clock.now() + period_ns if expiry is None else expiry
            self._periodic[vcpu] = [period_ns, first]
            self._ensure()
            self._cond.notify()

    def stop_periodic(self, vcpu: int) -> None:
        with self._cond:
            self._periodic.pop(vcpu, None)

    def periodics(self) -> dict[int, tuple[int, int]]:
        with self._cond:
            return {v: (p, e) for v, (p, e) in self._periodic.items()}

    def deadline(self, vcpu: int) -> int | None:
        return self._deadline.get(vcpu)

    def deadlines(self) -> dict[int, int]:
        with self._cond:
            return dict(self._deadline)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        next_refresh = time.monotonic() + TIME_REFRESH
        while True:
            fire = []
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + TIME_REFRESH
                try:
                    self.xen.republish_time()
                except Exception:  # noqa: BLE001
                    log.exception("refreshing guest time failed")
            with self._cond:
                if self._closed:
                    return
                now = self.xen.clock.now()
                for v, d in list(self._deadline.items()):
                    if d <= now:
                        fire.append(v)
                        del self._deadline[v]
                for v, pe in self._periodic.items():
                    if pe[1] <= now:        # as Xen: one event, the next a period from now
                        fire.append(v)
                        pe[1] = now + pe[0]
                if not fire:
                    nxt = min([*self._deadline.values(), *(e for _, e in self._periodic.values())],
                              default=None)
                    wait = 1.0 if nxt is None else max(0.0, (nxt - now) / 1e9)
                    self._cond.wait(min(wait, 1.0))
                    continue
            for v in fire:
                try:
                    with self.xen.machine.host_access():   # before the event-channel lock
                        self.xen.evtchn.raise_virq(v, X.VIRQ_TIMER)
                    self.xen.wake_vcpu(v)
                except Exception:  # noqa: BLE001
                    log.exception("timer for vcpu%d failed", v)
