"""One handler per hypercall, each taking (call, arg1..arg5) and returning RAX.

The order of checks inside each handler is Xen's, so a guest probing with bad arguments sees
the errno Xen would give it. Guest pointers go through ``call.view`` (guest-virtual, bounds
checked: a bad one is -EFAULT).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from xend_lite.errors import XendLiteError
from xend_lite.xen.xenabi import X
from xend_lite.machine.memory import INVALID_GPA, PAGE_SHIFT, PAGE_SIZE
from xend_lite.xen.abi import PERIODIC_MAX_NS, PERIODIC_MIN_NS
from xend_lite.xen.errors import Restart, XenError, inval
from xend_lite.xen.evtchn import PER_VCPU_VIRQS

BLOCK_SLICE = 0.010   # longest SCHEDOP_block wait before the guest looks again
from xend_lite.xen.overlay import SHARED_INFO, grant_page

if TYPE_CHECKING:
    from xend_lite.xen.emulation import Call, XenEmulation

# HVM params a guest may read / set on itself (the rest are the toolstack's: -EPERM).
# Numbers without a name in our compiled headers: PAE_ENABLED 4, VM86_TSS 15,
# ACPI_IOPORTS_LOCATION 19, BUFIOREQ_EVTCHN 26, VM_GENERATION_ID_ADDR 34, ALTP2M 35,
# X87_FIP_WIDTH 36, VM86_TSS_SIZED 37.
GUEST_READABLE = {X.HVM_PARAM_CALLBACK_IRQ, X.HVM_PARAM_STORE_PFN, X.HVM_PARAM_STORE_EVTCHN,
                  X.HVM_PARAM_CONSOLE_PFN, X.HVM_PARAM_CONSOLE_EVTCHN, 4, X.HVM_PARAM_IOREQ_PFN,
                  X.HVM_PARAM_BUFIOREQ_PFN, 26, 35, 36}
GUEST_WRITABLE = {X.HVM_PARAM_CALLBACK_IRQ, 15, 37, 19, 34, X.HVM_PARAM_STORE_EVTCHN,
                  X.HVM_PARAM_CONSOLE_EVTCHN, 36}

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
MEMOP_EXTENT_SHIFT = 6
MEMOP_CMD_MASK = (1 << MEMOP_EXTENT_SHIFT) - 1
MAX_EXTENT_ORDER = 9
MAX_POLL_PORTS = 128
CONSOLE_CHUNK = 4096
GNTTAB_MAX_VERSION = 1
XEN_EXTRAVERSION = b".0-xend-lite"
XENVER_PLATFORM_VIRT_START = {True: 0xFFFF800000000000, False: 0xF5800000}
EFER_LMA = 1 << 10
XENVER_VERSION = X.XENVER_version


def table(xen: XenEmulation) -> dict[int, Callable]:
    h = Handlers(xen)
    return {
        X.__HYPERVISOR_xen_version: h.xen_version,
        X.__HYPERVISOR_memory_op: h.memory_op,
        X.__HYPERVISOR_hvm_op: h.hvm_op,
        X.__HYPERVISOR_console_io: h.console_io,
        X.__HYPERVISOR_sched_op: h.sched_op,
        X.__HYPERVISOR_sched_op_compat: h.sched_op_compat,
        X.__HYPERVISOR_event_channel_op: h.event_channel_op,
        X.__HYPERVISOR_grant_table_op: h.grant_table_op,
        X.__HYPERVISOR_vcpu_op: h.vcpu_op,
        X.__HYPERVISOR_set_timer_op: h.set_timer_op,
    }


def _self_domain(xen: XenEmulation, domid: int) -> None:
    """Xen's rcu_lock_domain_by_any_id plus the XSM check for an unprivileged caller."""
    if domid in (X.DOMID_SELF, xen.domid):
        return
    if domid == 0:
        raise XenError(X.XEN_EPERM, "not allowed on domain 0")
    raise XenError(X.XEN_ESRCH, f"no domain {domid}")


class Handlers:
    def __init__(self, xen: XenEmulation):
        self.xen = xen
        self.version_word = xen.version[0] << 16 | xen.version[1]

    # -- xen_version ---------------------------------------------------------------------

    def xen_version(self, c: Call, cmd: int, arg: int) -> int:
        if cmd == XENVER_VERSION:        # the one guests call in loops: answered first
            return self.version_word
        xen = self.xen
        if cmd == X.XENVER_extraversion:
            c.view.write(arg, XEN_EXTRAVERSION.ljust(16, b"\0"))
            return 0
        if cmd == X.XENVER_compile_info:
            info = (b"gcc".ljust(64, b"\0") + b"xend-lite".ljust(16, b"\0")
                    + b"localdomain".ljust(32, b"\0") + b"2026-11-26".ljust(32, b"\0"))
            c.view.write(arg, info)
            return 0
        if cmd == X.XENVER_capabilities:
            c.view.write(arg, CAPABILITIES_TEXT.ljust(1024, b"\0"))
            return 0
        if cmd == X.XENVER_changeset:
            c.view.write(arg, b"xend-lite".ljust(64, b"\0"))
            return 0
        if cmd == X.XENVER_platform_parameters:
            c.view.write_uint(arg, c.ulong, XENVER_PLATFORM_VIRT_START[c.long_mode])
            return 0
        if cmd == X.XENVER_get_features:
            lay = c.lay("xen_feature_info")
            idx = c.view.read_uint(arg + lay.offset("submap_idx"), 4)
            if idx >= X.XENFEAT_NR_SUBMAPS:
                raise inval("feature submap out of range")
            bits = 0
            if idx == 0:
                bits = (1 << X.XENFEAT_writable_page_tables | 1 << X.XENFEAT_auto_translated_physmap
                        | 1 << X.XENFEAT_hvm_callback_vector | 1 << X.XENFEAT_hvm_safe_pvclock)
            c.view.write_uint(arg + lay.offset("submap"), 4, bits)
            return 0
        if cmd == X.XENVER_pagesize:
            return PAGE_SIZE
        if cmd == X.XENVER_guest_handle:
            c.view.write(arg, xen.domain_handle())
            return 0
        if cmd in (X.XENVER_commandline, X.XENVER_build_id):
            raise XenError(X.XEN_EPERM, "for the control domain only")
        raise XenError(X.XEN_ENOSYS, "unknown xen_version sub-op")

    # -- memory_op -----------------------------------------------------------------------

    def memory_op(self, c: Call, cmd_word: int, arg: int) -> int:
        cmd = cmd_word & MEMOP_CMD_MASK
        start = cmd_word >> MEMOP_EXTENT_SHIFT
        if cmd in (X.XENMEM_increase_reservation, X.XENMEM_decrease_reservation,
                   X.XENMEM_populate_physmap):
            return self._reservation(c, cmd, start, arg)
        if cmd == X.XENMEM_add_to_physmap:
            if start > 0xFFFF:
                raise XenError(X.XEN_EDOM, "continuation out of range")
            return self._add_to_physmap(c, arg)
        if cmd == X.XENMEM_remove_from_physmap:
            return self._remove_from_physmap(c, arg)
        if cmd == X.XENMEM_memory_map:
            return self._memory_map(c, arg)
        if cmd == X.XENMEM_maximum_ram_page:
            return self.xen.max_ram_gfn() + 1
        if cmd in (X.XENMEM_current_reservation, X.XENMEM_maximum_reservation,
                   X.XENMEM_maximum_gpfn):
            domid = c.view.read_uint(arg, 2)
            _self_domain(self.xen, domid)
            mm = self.xen.machine.memmap
            if cmd == X.XENMEM_current_reservation:
                return (mm.ram_bytes >> PAGE_SHIFT) - mm.ballooned_pages
            if cmd == X.XENMEM_maximum_reservation:
                return mm.ram_bytes >> PAGE_SHIFT
            return self.xen.max_ram_gfn()
        if cmd == X.XENMEM_machine_memory_map:
            raise XenError(X.XEN_EPERM, "for the control domain only")
        raise XenError(X.XEN_ENOSYS, "unknown memory_op sub-op")

    def _add_to_physmap(self, c: Call, arg: int) -> int:
        xatp = c.read("xen_add_to_physmap", arg)
        space = xatp["space"]
        if space == X.XENMAPSPACE_gmfn_foreign:
            raise XenError(X.XEN_ENOSYS, "foreign mappings need add_to_physmap_batch")
        _self_domain(self.xen, xatp["domid"])
        ov = self.xen.overlay
        if ov is None:
            raise XenError(X.XEN_ENOSYS, "this domain has no overlay device")
        idx, gpfn = xatp["idx"], xatp["gpfn"]
        if space == X.XENMAPSPACE_shared_info:
            if idx != 0:
                raise inval("shared_info has index 0 only")
            page = SHARED_INFO
        elif space == X.XENMAPSPACE_grant_table:
            if idx & X.XENMAPIDX_grant_table_status:
                raise inval("grant status frames exist only in grant table v2")
            if idx >= ov.grant_frames:
                raise inval(f"grant frame {idx} beyond {ov.grant_frames}")
            page = grant_page(idx)
        elif space in (X.XENMAPSPACE_gmfn, X.XENMAPSPACE_gmfn_range, X.XENMAPSPACE_dev_mmio):
            raise XenError(X.XEN_ENOSYS, "moving guest frames is not offered")
        else:
            raise inval("unknown map space")
        all_ones = U64 if c.long_mode else U32
        gpa = INVALID_GPA if gpfn == all_ones else gpfn << PAGE_SHIFT
        if gpa != INVALID_GPA:
            try:
                self.xen.machine.memmap.check_gpa(gpa)
            except XendLiteError as exc:
                raise inval(str(exc)) from exc
            holder = ov.page_at(gpa)
            if holder is not None and holder != page:
                raise inval(f"frame holds {holder}")
        if space == X.XENMAPSPACE_shared_info:
            ov.long_mode = c.vcpu.in_long_mode()
        try:
            ov.map_from_vcpu(c.runner, page, gpa)
        except XendLiteError as exc:
            raise inval(str(exc)) from exc
        if space == X.XENMAPSPACE_grant_table:
            self.xen.grant_frames_in_use = max(self.xen.grant_frames_in_use, idx + 1)
        if page == SHARED_INFO and gpa != INVALID_GPA:
            self.xen.publish_time_from(c.vcpu)
        self.xen.overlay_event(page, gpa)
        return 0

    def _remove_from_physmap(self, c: Call, arg: int) -> int:
        xrfp = c.read("xen_remove_from_physmap", arg)
        _self_domain(self.xen, xrfp["domid"])
        gfn = xrfp["gpfn"]
        ov = self.xen.overlay
        page = ov.page_at(gfn << PAGE_SHIFT) if ov is not None and gfn < 1 << 52 else None
        if page is not None:
            ov.map_from_vcpu(c.runner, page, INVALID_GPA)
            self.xen.overlay_event(page, INVALID_GPA)
            return 0
        mm = self.xen.machine.memmap
        if gfn >= 1 << 52 or not mm.is_ram_page(gfn):
            raise inval("nothing at that frame")
        self.xen.machine.vcpu_update_memory(c.runner, lambda m: m.balloon([gfn], []))
        return 0

    def _memory_map(self, c: Call, arg: int) -> int:
        lay = c.lay("xen_memory_map")
        mmap_ = c.view.read_struct(lay, arg)
        entries = self.xen.e820()
        n = min(mmap_["nr_entries"], len(entries))
        buf = b"".join(a.to_bytes(8, "little") + s.to_bytes(8, "little") + t.to_bytes(4, "little")
                       for a, s, t in entries[:n])
        if n:
            c.view.write(mmap_["buffer"], buf)
        c.view.write_fields(lay, arg, {"nr_entries": n})
        return 0

    def _reservation(self, c: Call, cmd: int, start: int, arg: int) -> int:
        # Xen answers every refusal here with the number of extents done so far.
        lay = c.lay("xen_memory_reservation")
        try:
            r = c.view.read_struct(lay, arg)
        except XenError:
            return start
        nr, order, handle = r["nr_extents"], r["extent_order"], r["extent_start"]
        if nr > U32 >> MEMOP_EXTENT_SHIFT or start >= nr:
            return start
        if r["domid"] not in (X.DOMID_SELF, self.xen.domid) or order > MAX_EXTENT_ORDER:
            return start
        mm = self.xen.machine.memmap
        step = c.ulong
        done = start
        take, back = [], []
        pending: set[int] = set()
        budget = 4096  # frames per call; the guest gets the count done and asks again
        while done < nr and len(take) + len(back) < budget:
            try:
                gfn = c.view.read_uint(handle + done * step, step)
            except XenError:
                break
            frames = [gfn + i for i in range(1 << order)]
            if cmd == X.XENMEM_decrease_reservation:
                if not all(mm.is_ram_page(f) and f not in pending for f in frames):
                    break
                take += frames
            else:
                if not all(mm.is_ballooned(f) and f not in pending for f in frames):
                    break
                back += frames
            pending.update(frames)
            done += 1
        if take or back:
            try:
                self.xen.machine.vcpu_update_memory(c.runner, lambda m: m.balloon(take, back))
            except XendLiteError:
                return start
        return done

    # -- hvm_op --------------------------------------------------------------------------

    def hvm_op(self, c: Call, op: int, arg: int) -> int:
        xen = self.xen
        if op in (X.HVMOP_set_param, X.HVMOP_get_param):
            lay = c.lay("xen_hvm_param")
            p = c.view.read_struct(lay, arg)
            index = p["index"]
            if index >= X.HVM_NR_PARAMS:
                raise inval("no such HVM param")
            _self_domain(xen, p["domid"])
            if op == X.HVMOP_get_param:
                if index not in GUEST_READABLE:
                    raise XenError(X.XEN_EPERM, "param is the toolstack's")
                c.view.write_fields(lay, arg, {"value": xen.params.get(index, 0)})
                return 0
            if index not in GUEST_WRITABLE:
                raise XenError(X.XEN_EPERM, "param is the toolstack's")
            value = p["value"]
            if index == X.HVM_PARAM_CALLBACK_IRQ:
                kind = value >> 56
                if kind > X.HVM_PARAM_CALLBACK_TYPE_VECTOR:
                    raise inval("unknown callback type")
                if xen.overlay is not None:
                    xen.overlay.long_mode = c.vcpu.in_long_mode()
            xen.params[index] = value
            return 0
        if op == X.HVMOP_set_evtchn_upcall_vector:
            lay = c.lay("xen_hvm_evtchn_upcall_vector")
            u = c.view.read_struct(lay, arg)
            if u["vector"] < 0x10:
                raise inval("vector below 0x10")
            if u["vcpu"] >= xen.nr_vcpus:
                raise XenError(X.XEN_ENOENT, "no such vcpu")
            xen.upcall_vectors[u["vcpu"]] = u["vector"]
            return 0
        if op == X.HVMOP_get_time:
            c.view.write_uint(arg, 8, xen.clock.now())
            return 0
        if op == X.HVMOP_flush_tlbs:
            if arg:
                raise inval("flush_tlbs takes no argument")
            return 0
        if op == X.HVMOP_pagetable_dying:
            raise XenError(X.XEN_ENOSYS, "shadow paging hint not used")
        raise XenError(X.XEN_ENOSYS, "unknown hvm_op")

    # -- console_io ----------------------------------------------------------------------

    def console_io(self, c: Call, cmd: int, count: int, buf: int) -> int:
        console = self.xen.machine.console
        if cmd == X.CONSOLEIO_write:
            done = 0
            while done < count:
                n = min(CONSOLE_CHUNK, count - done)
                console.write(c.view.read(buf + done, n))
                done += n
                if done < count and c.runner.should_yield():
                    # continue after the pause: the rest of the buffer, as Xen's continuation
                    self._advance(c, done)
                    raise Restart()
            return 0
        if cmd == X.CONSOLEIO_read:
            with self.xen._lock:
                data = bytes(self.xen.console_input[:count])
                if data:
                    c.view.write(buf, data)
                    del self.xen.console_input[:len(data)]
            return len(data)
        raise XenError(X.XEN_ENOSYS, "unknown console_io command")

    @staticmethod
    def _advance(c: Call, done: int) -> None:
        regs = c.vcpu.synced_regs()
        if c.long_mode:
            regs.rsi -= done
            regs.rdx += done
        else:
            regs.rcx = (regs.rcx - done) & U32
            regs.rdx = (regs.rdx + done) & U32
        c.vcpu.set_synced_regs(regs)

    # -- sched_op ------------------------------------------------------------------------

    def sched_op(self, c: Call, cmd: int, arg: int) -> int:
        xen = self.xen
        if cmd == X.SCHEDOP_yield:
            time.sleep(0)
            return 0
        if cmd == X.SCHEDOP_block:
            return self._block(c)
        if cmd in (X.SCHEDOP_shutdown, X.SCHEDOP_shutdown_code):
            reason = c.view.read_uint(arg, 4)
            if cmd == X.SCHEDOP_shutdown_code:
                if xen.shutdown_code is None:
                    xen.shutdown_code = reason & 0xFF
                return 0
            return self._shutdown(c, reason)
        if cmd == X.SCHEDOP_poll:
            return self._poll(c, arg)
        if cmd in (X.SCHEDOP_remote_shutdown, X.SCHEDOP_pin_override):
            raise XenError(X.XEN_EPERM, "for the control domain only")
        raise XenError(X.XEN_ENOSYS, "unknown sched_op")

    def sched_op_compat(self, c: Call, cmd: int, arg: int) -> int:
        if cmd == X.SCHEDOP_yield:
            return 0
        if cmd == X.SCHEDOP_block:
            return self._block(c)
        if cmd == X.SCHEDOP_shutdown:
            return self._shutdown(c, arg)
        raise XenError(X.XEN_ENOSYS, "unknown sched_op_compat")

    def _shutdown(self, c: Call, reason: int) -> int:
        """As Xen: the reason is taken as a u8 and any value shuts the domain down; one
        outside the known SHUTDOWN_* values reaches the host as "unknown" (its number in the
        detail), which the daemon treats as a poweroff."""
        xen = self.xen
        reason &= 0xFF
        if reason == X.SHUTDOWN_soft_reset:
            xen.soft_reset(c.runner)
            return 0
        name = SHUTDOWN_NAMES.get(reason, "unknown")
        code = xen.shutdown_code if xen.shutdown_code is not None else 0
        xen.machine.request_shutdown(name, code, f"vcpu{c.index}: SCHEDOP_shutdown({name}"
                                                 f"{'' if name != 'unknown' else f' reason {reason}'})")
        return 0

    def _block(self, c: Call) -> int:
        xen = self.xen

        def pending() -> bool:
            vv = xen._vcpu_info_view(c.index)
            return bool(vv and vv[0][vv[1]])
        deadline = xen.timers.deadline(c.index)
        slice_s = BLOCK_SLICE
        if deadline is not None:
            slice_s = min(slice_s, max(0.0, (deadline - xen.clock.now()) / 1e9))
        c.runner.block(slice_s, pending)
        return 0

    def _poll(self, c: Call, arg: int) -> int:
        xen = self.xen
        lay = c.lay("sched_poll")
        p = c.view.read_struct(lay, arg)
        n = p["nr_ports"]
        if n > MAX_POLL_PORTS:
            raise inval("too many ports")
        raw = c.view.read(p["ports"], 4 * n)
        ports = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 4 * n, 4)]
        limit = xen.evtchn.max_ports()
        for port in ports:               # one pass, as Xen: a pending port before a bad one wins
            if port >= limit:
                raise inval("port out of range")
            if xen.evtchn.is_pending(port):
                return 0
        timeout = p["timeout"]
        while True:
            now = xen.clock.now()
            if timeout and now >= timeout:
                return 0
            wait = None if not timeout else (timeout - now) / 1e9
            woke = c.runner.block(wait, lambda: any(xen.evtchn.is_pending(q) for q in ports))
            if woke:
                return 0
            if c.runner.should_yield():
                raise Restart()     # after the pause the same poll goes on (absolute timeout)

    # -- event_channel_op ----------------------------------------------------------------

    def event_channel_op(self, c: Call, cmd: int, arg: int) -> int:
        xen, ev = self.xen, self.xen.evtchn
        if cmd == X.EVTCHNOP_alloc_unbound:
            lay = c.lay("evtchn_alloc_unbound")
            a = c.view.read_struct(lay, arg)
            _self_domain(xen, a["dom"])
            remote = a["remote_dom"]          # any domain may bind later: Xen does not check
            port = ev.alloc_unbound(xen.domid if remote == X.DOMID_SELF else remote)
            c.view.write_fields(lay, arg, {"port": port})
            return 0
        if cmd == X.EVTCHNOP_bind_interdomain:
            lay = c.lay("evtchn_bind_interdomain")
            a = c.view.read_struct(lay, arg)
            port = ev.bind_interdomain(a["remote_dom"], a["remote_port"], xen.domid)
            c.view.write_fields(lay, arg, {"local_port": port})
            return 0
        if cmd == X.EVTCHNOP_bind_virq:
            lay = c.lay("evtchn_bind_virq")
            a = c.view.read_struct(lay, arg)
            virq, vcpu = a["virq"], a["vcpu"]
            if virq >= X.NR_VIRQS:
                raise inval("no such VIRQ")
            if virq not in PER_VCPU_VIRQS and vcpu != 0:
                raise inval("a global VIRQ binds on vcpu 0")
            if vcpu >= xen.nr_vcpus:
                raise XenError(X.XEN_ENOENT, "no such vcpu")
            port = ev.bind_virq(virq, vcpu)
            c.view.write_fields(lay, arg, {"port": port})
            return 0
        if cmd == X.EVTCHNOP_bind_ipi:
            lay = c.lay("evtchn_bind_ipi")
            a = c.view.read_struct(lay, arg)
            if a["vcpu"] >= xen.nr_vcpus:
                raise XenError(X.XEN_ENOENT, "no such vcpu")
            port = ev.bind_ipi(a["vcpu"])
            c.view.write_fields(lay, arg, {"port": port})
            return 0
        if cmd == X.EVTCHNOP_close:
            ev.close(c.read("evtchn_close", arg)["port"])
            return 0
        if cmd == X.EVTCHNOP_send:
            ev.send(c.read("evtchn_send", arg)["port"])
            return 0
        if cmd == X.EVTCHNOP_status:
            return self._evtchn_status(c, arg)
        if cmd == X.EVTCHNOP_unmask:
            ev.unmask(c.read("evtchn_unmask", arg)["port"])
            return 0
        if cmd == X.EVTCHNOP_bind_vcpu:
            a = c.read("evtchn_bind_vcpu", arg)
            if a["vcpu"] >= xen.nr_vcpus:
                raise XenError(X.XEN_ENOENT, "no such vcpu")
            ev.bind_vcpu(a["port"], a["vcpu"])
            return 0
        if cmd == X.EVTCHNOP_reset:
            _self_domain(xen, c.view.read_uint(arg, 2))
            ev.reset()
            return 0
        if cmd in (X.EVTCHNOP_init_control, X.EVTCHNOP_expand_array, X.EVTCHNOP_set_priority):
            raise XenError(X.XEN_ENOSYS, "only the 2-level event channel ABI is offered")
        if cmd == X.EVTCHNOP_bind_pirq:
            raise XenError(X.XEN_EPERM, "no physical IRQs")
        raise XenError(X.XEN_ENOSYS, "unknown event_channel_op")

    def _evtchn_status(self, c: Call, arg: int) -> int:
        xen = self.xen
        lay = c.lay("evtchn_status")
        a = c.view.read_struct(lay, arg)
        _self_domain(xen, a["dom"])
        p = xen.evtchn.status(a["port"])
        out = bytearray(c.view.read(arg, 24))
        status = X.EVTCHNSTAT_closed if p is None else p.state
        vcpu = 0 if p is None else p.vcpu
        out[8:12] = status.to_bytes(4, "little")
        out[12:16] = vcpu.to_bytes(4, "little")
        u = bytearray(8)
        if p is not None:
            if status == X.EVTCHNSTAT_unbound:
                u[0:2] = (p.remote_dom & 0xFFFF).to_bytes(2, "little")
            elif status == X.EVTCHNSTAT_interdomain:
                u[0:2] = (p.remote_dom & 0xFFFF).to_bytes(2, "little")
                u[4:8] = p.remote_port.to_bytes(4, "little")
            elif status == X.EVTCHNSTAT_virq:
                u[0:4] = p.virq.to_bytes(4, "little")
        out[16:24] = u
        c.view.write(arg + 8, bytes(out[8:24]))
        return 0

    # -- grant_table_op ------------------------------------------------------------------

    def grant_table_op(self, c: Call, cmd: int, uop: int, count: int) -> int:
        xen = self.xen
        ov = xen.overlay
        if cmd in (X.GNTTABOP_setup_table, X.GNTTABOP_query_size, X.GNTTABOP_set_version,
                   X.GNTTABOP_get_version) and count != 1:
            raise inval("this op takes exactly one argument")
        if cmd == X.GNTTABOP_query_size:
            lay = c.lay("gnttab_query_size")
            q = c.view.read_struct(lay, uop)
            if q["dom"] not in (X.DOMID_SELF, xen.domid):
                c.view.write_fields(lay, uop, {"status": X.GNTST_bad_domain})
                return 0
            c.view.write_fields(lay, uop, {"nr_frames": xen.grant_frames_in_use,
                                           "max_nr_frames": ov.grant_frames, "status": X.GNTST_okay})
            return 0
        if cmd == X.GNTTABOP_setup_table:
            lay = c.lay("gnttab_setup_table")
            s = c.view.read_struct(lay, uop)
            if s["nr_frames"] > ov.grant_frames:
                c.view.write_fields(lay, uop, {"status": X.GNTST_general_error})
                return 0
            if s["dom"] not in (X.DOMID_SELF, xen.domid):
                c.view.write_fields(lay, uop, {"status": X.GNTST_bad_domain})
                return 0
            n = s["nr_frames"]
            xen.grant_frames_in_use = max(xen.grant_frames_in_use, n)
            invalid = U64 if c.long_mode else U32
            frames = [ov.gfn_of(grant_page(i)) for i in range(n)]
            step = c.ulong
            raw = b"".join(((invalid if f is None else f) & invalid).to_bytes(step, "little")
                           for f in frames)
            if n:
                c.view.write(s["frame_list"], raw)
            c.view.write_fields(lay, uop, {"status": X.GNTST_okay})
            return 0
        if cmd == X.GNTTABOP_set_version:
            lay = c.lay("gnttab_set_version")
            v = c.view.read_struct(lay, uop)["version"]
            if v not in (1, 2):
                raise inval("grant table version is 1 or 2")
            c.view.write_fields(lay, uop, {"version": 1})
            if v > GNTTAB_MAX_VERSION:
                raise XenError(X.XEN_EACCES, "only grant table v1 is offered")
            return 0
        if cmd == X.GNTTABOP_get_version:
            lay = c.lay("gnttab_get_version")
            g = c.view.read_struct(lay, uop)
            _self_domain(xen, g["dom"])
            c.view.write_fields(lay, uop, {"version": 1})
            return 0
        if cmd == X.GNTTABOP_get_status_frames:
            raise inval("status frames exist only in grant table v2")
        raise XenError(X.XEN_ENOSYS, "grant operation not offered")

    # -- vcpu_op -------------------------------------------------------------------------

    def vcpu_op(self, c: Call, cmd: int, vcpuid: int, arg: int) -> int:
        xen = self.xen
        if vcpuid >= xen.nr_vcpus:
            raise XenError(X.XEN_ENOENT, "no such vcpu")
        if cmd == X.VCPUOP_register_vcpu_info:
            lay = c.lay("vcpu_register_vcpu_info")
            r = c.view.read_struct(lay, arg)
            if r["offset"] + 64 > PAGE_SIZE or r["rsvd"]:
                raise inval("vcpu_info must fit in its page")
            if vcpuid in xen.vcpu_info_gpa:
                raise inval("vcpu_info already registered")
            gfn = r["mfn"]
            if gfn >= 1 << 40 or not xen.machine.memmap.is_ram_page(gfn):
                raise inval("vcpu_info frame is not RAM")
            xen.register_vcpu_info(vcpuid, (gfn << PAGE_SHIFT) + r["offset"])
            xen.publish_time_from(c.vcpu)
            return 0
        if cmd == X.VCPUOP_is_up:
            return 1 if xen.vcpu_is_up(vcpuid) else 0
        if cmd == X.VCPUOP_set_singleshot_timer:
            if vcpuid != c.index:
                raise inval("only the calling vcpu's timer")
            t = c.read("vcpu_set_singleshot_timer", arg)
            if t["flags"] & X.VCPU_SSHOTTMR_future and t["timeout_abs_ns"] < xen.clock.now():
                raise XenError(X.XEN_ETIME, "timeout already passed")
            xen.timers.set(vcpuid, t["timeout_abs_ns"])
            return 0
        if cmd == X.VCPUOP_stop_singleshot_timer:
            if vcpuid != c.index:
                raise inval("only the calling vcpu's timer")
            xen.timers.stop(vcpuid)
            return 0
        if cmd == X.VCPUOP_set_periodic_timer:     # any vCPU of the domain, as in Xen
            period = c.read("vcpu_set_periodic_timer", arg)["period_ns"]
            if not PERIODIC_MIN_NS <= period <= PERIODIC_MAX_NS:
                raise inval("periodic timer period must be 1 ms or more")
            xen.timers.set_periodic(vcpuid, period)
            return 0
        if cmd == X.VCPUOP_stop_periodic_timer:
            xen.timers.stop_periodic(vcpuid)
            return 0
        raise XenError(X.XEN_ENOSYS, "vcpu_op not offered")

    # -- set_timer_op --------------------------------------------------------------------

    def set_timer_op(self, c: Call, a1: int, a2: int) -> int:
        xen = self.xen
        timeout = a1 if c.long_mode else (a2 << 32 | a1)
        if timeout == 0:
            xen.timers.stop(c.index)
        else:
            xen.timers.set(c.index, timeout)
        return 0


CAPABILITIES_TEXT = b"hvm-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p"
SHUTDOWN_NAMES = {X.SHUTDOWN_poweroff: "poweroff", X.SHUTDOWN_reboot: "reboot",
                  X.SHUTDOWN_suspend: "suspend", X.SHUTDOWN_crash: "crash",
                  X.SHUTDOWN_watchdog: "watchdog", X.SHUTDOWN_soft_reset: "soft-reset"}

