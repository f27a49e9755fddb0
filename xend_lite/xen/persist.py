"""Saving and restoring a whole domain: every component's declared State plus guest memory.

Sections: ``cpu/<n>`` per vCPU, ``vm`` (irqchip, PIT, KVM clock), ``memory_map`` (sizes,
ballooned frames), ``xen`` (hypercall page, HVM params, event channels, timers, counters,
console tail) and ``xen_overlay`` (page addresses, long mode, page contents); guest RAM is one
sparse region. A load validates the whole file and checks it fits this domain before it
changes anything; RAM then comes back as a copy-on-write mapping of the file, so restoring
costs the same for any guest size and the restored guest never writes into the snapshot.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from xend_lite.errors import InvalidArgument, SnapshotError
from xend_lite.machine.cpustate import apply_vcpu, apply_vm, capture_vcpu, capture_vm
from xend_lite.machine.memory import Backing
from xend_lite.snapshot import MemoryRegion, State, load_snapshot, save_snapshot
from xend_lite.xen.emulation import XenState
from xend_lite.xen.overlay import OverlayState

if TYPE_CHECKING:
    from xend_lite.xen.domain import Domain

log = logging.getLogger("xend_lite.persist")


@dataclass
class CpuState(State):
    NAME = "cpu"
    VERSION = 1
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class VmState(State):
    NAME = "vm"
    VERSION = 1
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class MemoryMapState(State):
    NAME = "memory_map"
    VERSION = 1
    ram_bytes: int = 0
    vcpus: int = 1
    ballooned: list[int] = field(default_factory=list)


CLASSES = [CpuState, VmState, MemoryMapState, XenState, OverlayState]

F_SETSIG, F_SETLEASE = 10, 1024


def _hold_lease(fd: int) -> bool:
    """A read lease on the snapshot while restored RAM still reads from it: anyone opening
    it to write or truncating it waits (up to the kernel's lease-break time) until RAM has
    moved off it and the lease is dropped. Its break notice is the harmless kick signal.
    Not every file system or owner allows leases; then there is no such protection."""
    import fcntl

    from xend_lite.kvm import kick_signal

    try:
        fcntl.fcntl(fd, F_SETSIG, kick_signal())
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        return True
    except OSError as exc:
        log.debug("no lease on the snapshot: %s", exc.strerror)
        return False


def release_lease(fd: int) -> None:
    import fcntl

    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass


def _sections(n_vcpus: int, xen: bool) -> list[str]:
    """Every section a snapshot of this domain holds (Xen's only in Xen mode)."""
    return ([f"cpu/{i}" for i in range(n_vcpus)] + ["vm", "memory_map"]
            + (["xen", "xen_overlay"] if xen else []))


def save_domain(domain: Domain, path: str, progress: Callable[[int, int], None] | None = None) -> dict:
    m = domain.machine
    msrs = domain.kvm.msr_index_list()
    states: dict[str, State] = {}
    for r in m.runners:
        states[f"cpu/{r.index}"] = CpuState(capture_vcpu(r.vcpu, msrs, m.irqchip))
    states["vm"] = VmState(capture_vm(m.vm, m.irqchip))
    states["memory_map"] = MemoryMapState(m.memory_bytes, len(m.runners), m.memmap.ballooned())
    if domain.xen is not None:
        states["xen"] = domain.xen.save()
        states["xen_overlay"] = domain.overlay.save()
    with m.ram_lock:   # RAM cannot move off a restored file while it is being read
        ram = m.ram
        region = (MemoryRegion("ram", 0, ram.size, buffer=ram.map) if ram.private
                  else MemoryRegion("ram", 0, ram.size, fd=ram.fd, offset=ram.offset,
                                    buffer=ram.map))
        info = save_snapshot(path, states, [region], progress=progress)
    return {"path": path, "size": info.logical_size, "size_on_disk": info.size_on_disk,
            "bytes_written": info.bytes_written}


def load_domain(domain: Domain, path: str, verify: bool = True) -> dict:
    """Validate ``path`` against this domain, then apply it (the VM paused or not started).
    ``verify`` also checks guest memory against its chunk checksums first (reading the data
    the file holds, skipping holes); without it only the metadata is checked and restore
    time does not depend on how much memory the guest used."""
    m = domain.machine
    n = len(m.runners)
    xen = domain.xen is not None
    snap = load_snapshot(path, CLASSES, required=_sections(n, xen), allowed=(),
                         verify_memory=verify)
    try:
        st = snap.states
        mm: MemoryMapState = st["memory_map"]
        if mm.ram_bytes != m.memory_bytes:
            raise SnapshotError(f"snapshot {path} is of a {mm.ram_bytes >> 20} MiB guest; this "
                                f"domain has {m.memory_bytes >> 20} MiB")
        if mm.vcpus != n:
            raise SnapshotError(f"snapshot {path} has {mm.vcpus} vCPUs; this domain has {n}")
        try:
            region = snap.region("ram")
        except KeyError:
            raise SnapshotError(f"snapshot {path} holds no guest RAM") from None
        if region.size != m.memory_bytes or region.gpa != 0 or len(snap.regions) != 1:
            raise SnapshotError(f"snapshot {path}: memory regions do not match this domain")
        for g in mm.ballooned:
            if not m.memmap.ram_region_at(g << 12):
                raise SnapshotError(f"snapshot {path}: ballooned frame {g:#x} is not RAM here")
        try:
            if xen:
                domain.xen.check_state(st["xen"])
                domain.overlay.check_state(st["xen_overlay"])
        except InvalidArgument as exc:
            raise SnapshotError(f"snapshot {path}: {exc}") from exc
        for i in range(n):
            data = st[f"cpu/{i}"].data
            if not {"regs", "sregs", "xsave", "msrs", "events"} <= set(data):
                raise SnapshotError(f"snapshot {path}: cpu/{i} is incomplete")
        # -- everything checked: apply ------------------------------------------------------
        _hold_lease(snap.fd)
        overlays = domain.overlay.mappings(st["xen_overlay"]) if xen else {}
        backing = Backing.from_file("ram", snap.fd, region.file_offset, region.size)
        backing.fd = -1  # the mapping outlives the file descriptor, closed below
        m.replace_ram(backing, overlays=overlays, ballooned=mm.ballooned)
        apply_vm(m.vm, st["vm"].data, m.irqchip)
        for i, r in enumerate(m.runners):
            apply_vcpu(r.vcpu, st[f"cpu/{i}"].data, m.irqchip)
        if xen:
            domain.xen.load(st["xen"])
            domain.overlay.load(st["xen_overlay"], remap=False)
            # contents stay as saved; refreshes (within a second) need the TSC offset again
            domain.xen.learn_tsc_offset(m.runners[0].vcpu)
        # RAM is still the file's pages: hand the caller the same file (not whatever has the
        # path now) to move RAM off it
        detach = (os.dup(snap.fd), region.file_offset)
        return {"path": path, "size": os.path.getsize(path), "_detach": detach}
    finally:
        snap.close()
