"""Saving and loading the Xen side of a domain: XenState (hypercall page, params, event
channels, timers, counters, console tail), the overlay pages, and the xenstore.

A load first checks every section against this domain (``prepare``) and only then changes
anything (``apply``), so a refused snapshot leaves the domain as it was. The overlay pages
are mapped by whoever replaces RAM (one memory-map change with it): see ``overlay_mappings``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from xend_lite.errors import InvalidArgument
from xend_lite.machine.backing import Backing
from xend_lite.xen.abi import PERIODIC_MAX_NS, PERIODIC_MIN_NS
from xend_lite.xen.memory import E820MAX
from xend_lite.xen.state import OverlayState, XenState
from xend_lite.xen.xenstore.state import XenstoreState

if TYPE_CHECKING:
    from xend_lite.snapshot.state import State
    from xend_lite.xen.platform import XenPlatform

SECTIONS = ("xen", "xen_overlay", "xenstore")
STATE_CLASSES = (XenState, OverlayState, XenstoreState)
OPTIONAL = ("xenstore",)      # snapshots made before the domain had a xenstore


@dataclass
class PreparedLoad:
    xen: XenState
    overlay: OverlayState
    xenstore: Callable[[], None] | None


class XenPersist:
    def __init__(self, p: XenPlatform):
        self.p = p

    def save(self) -> dict[str, State]:
        p = self.p
        return {
            "xen": XenState(
                hypercall_page=-1 if p.hypercall_page is None else p.hypercall_page,
                params={str(k): v for k, v in p.params.items()},
                evtchn=p.evtchn.to_state(),
                upcall_vectors={str(k): v for k, v in p.upcalls.vectors.items()},
                vcpu_info={str(k): v for k, v in p.shinfo.vcpu_info_gpa.items()},
                timers={str(k): v for k, v in p.timers.deadlines().items()},
                system_time=p.clock.now(),
                shutdown_code=-1 if p.sched.shutdown_code is None else p.sched.shutdown_code,
                counters=dict(zip(("calls", "errors"), p.hypercalls.totals())),
                console=p.machine.console.tail(64 * 1024),
                periodic={str(k): list(v) for k, v in p.timers.periodics().items()},
                grant_frames_in_use=p.grants.frames_in_use,
                guest_memory_map=None if p.memory.guest_map is None
                else [list(e) for e in p.memory.guest_map],
                runstate=p.runstates.to_state()),
            "xen_overlay": p.overlay.save(),
            "xenstore": p.xenstore.save(),
        }

    def prepare(self, states: dict[str, State]) -> PreparedLoad:
        """Check the sections against this domain; raises InvalidArgument (or
        SnapshotError for the xenstore) and changes nothing when one does not fit."""
        st = states["xen"]
        self._check_xen(st)
        self.p.overlay.check_state(states["xen_overlay"])
        store = states.get("xenstore")
        apply_store = self.p.xenstore.prepare_load(store) if store is not None else None
        return PreparedLoad(st, states["xen_overlay"], apply_store)

    def overlay_mappings(self, prep: PreparedLoad) -> dict[str, tuple[int, Backing]]:
        return self.p.overlay.mappings(prep.overlay)

    def _check_xen(self, st: XenState) -> None:
        n = self.p.nr_vcpus
        per_vcpu = list(st.upcall_vectors) + list(st.vcpu_info) + list(st.timers) + list(st.periodic)
        for k in list(st.params) + per_vcpu:
            if not k.isdigit():
                raise InvalidArgument(f"xen state: bad key {k!r}")
        for k in per_vcpu:
            if int(k) >= n:
                raise InvalidArgument(f"xen state names vcpu {k}, this domain has {n}")
        for v in st.periodic.values():
            if len(v) != 2 or not PERIODIC_MIN_NS <= v[0] <= PERIODIC_MAX_NS:
                raise InvalidArgument("xen state: periodic timer malformed")
        if not isinstance(st.runstate, dict):
            raise InvalidArgument("xen state: runstate table malformed")
        try:
            self.p.runstates.parse_state(st.runstate, n)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument("xen state: runstate table malformed") from exc
        for key in ("ports", "daemon_ports"):
            if not isinstance(st.evtchn.get(key), dict):
                raise InvalidArgument("xen state: event channel table malformed")
        gm = st.guest_memory_map
        if gm is not None and (len(gm) > E820MAX or any(
                len(e) != 3 or not (0 <= e[0] < 1 << 64 and 0 <= e[1] < 1 << 64
                                    and 0 <= e[2] < 1 << 32) for e in gm)):
            raise InvalidArgument("xen state: guest memory map malformed")

    def apply(self, prep: PreparedLoad) -> None:
        """Put a checked state in place (the VM paused, RAM already replaced)."""
        p = self.p
        st = prep.xen
        p.timers.stop_all()
        p.hypercall_page = None if st.hypercall_page < 0 else st.hypercall_page
        p.params.clear()
        p.params.update({int(k): v for k, v in st.params.items()})
        p.evtchn.from_state(st.evtchn)
        p.upcalls.vectors = {int(k): v for k, v in st.upcall_vectors.items()}
        p.shinfo.vcpu_info_gpa = {int(k): v for k, v in st.vcpu_info.items()}
        # whether KVM took each flagged upcall is not saved: the timer thread tries them again
        # (one the restored APIC already holds is not raised twice)
        p.upcalls.untaken.clear()
        p.upcalls.untaken |= set(range(p.nr_vcpus))
        p.clock.set_now(st.system_time)
        p.time.forget()
        p.machine.console.restore_ring(st.console)
        p.sched.shutdown_code = None if st.shutdown_code < 0 else st.shutdown_code
        p.hypercalls.load_counters(st.counters.get("calls", []), st.counters.get("errors", []))
        p.grants.frames_in_use = st.grant_frames_in_use
        p.memory.guest_map = None if st.guest_memory_map is None \
            else [(a, n, t) for a, n, t in st.guest_memory_map]
        p.runstates.from_state(st.runstate, p.nr_vcpus)
        for k, v in st.timers.items():
            p.timers.set(int(k), v)
        for k, (period, expiry) in st.periodic.items():
            p.timers.set_periodic(int(k), period, expiry)
        p.overlay.load(prep.overlay, remap=False)
        if prep.xenstore is not None:
            prep.xenstore()
        elif p.tree_pending is not None:       # a snapshot from before the store was saved
            p.xenstore.write_domain_tree(p.tree_pending)
        p.tree_pending = None
        # a fresh time record before the guest runs: it must match the guest's TSC as it is
        # now (a host may not give the saved TSC back), not as it was when saved
        p.time.publish_from(p.machine.runners[0].vcpu)
        p.timers.start_refresh()
        p.evtchn_mirror.everything()
