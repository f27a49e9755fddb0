"""Saving and restoring a whole domain: every component's declared State plus guest memory.

Sections: ``cpu/<n>`` per vCPU, ``vm`` (irqchip, PIT, KVM clock), ``memory_map`` (sizes,
ballooned frames) and, in Xen mode, the Xen platform's (xen/persist.py: ``xen``,
``xen_overlay``, ``xenstore``); guest RAM is one sparse region. A load validates the whole
file and checks it fits this domain before it changes anything; RAM then comes back as a
copy-on-write mapping of the file, so restoring costs the same for any guest size and the
restored guest never writes into the snapshot. Both run on the VM owner with the VM paused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from xend_lite.errors import InvalidArgument, SnapshotError
from xend_lite.kvm import const
from xend_lite.machine.backing import Backing
from xend_lite.machine.cpustate import apply_vcpu, apply_vm, capture_vcpu, capture_vm
from xend_lite.snapshot import MemoryRegion, State, check_sections, load_snapshot, save_snapshot
from xend_lite.vmm import detach  # noqa: F401 - a restore's RAM then moves off its file
from xend_lite.vmm.shape import DomainShapeState
from xend_lite.xen.persist import OPTIONAL, SECTIONS, STATE_CLASSES

if TYPE_CHECKING:
    from xend_lite.vmm.domain import Domain

log = logging.getLogger("xend_lite.persist")

CPU_FIELDS = ("regs", "sregs", "xsave", "xcrs", "msrs", "lapic", "events", "mp_state", "debugregs")


@dataclass
class CpuState(State):
    """One vCPU's complete KVM state (machine/cpustate.py captures and applies it)."""

    NAME = "cpu"
    VERSION = 2
    MIN_VERSION = 1
    regs: dict[str, int] = field(default_factory=dict)
    sregs: dict[str, Any] = field(default_factory=dict)
    xsave: bytes = b""
    xcrs: bytes = b""
    msrs: dict[str, int] = field(default_factory=dict)
    lapic: bytes = b""
    events: bytes = b""
    mp_state: int = 0
    debugregs: bytes = b""

    @classmethod
    def upgrade(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        if version < 2:              # one untyped "data" table
            data = fields.get("data")
            if not isinstance(data, dict) or not set(CPU_FIELDS) <= set(data):
                raise SnapshotError("cpu state (version 1) is incomplete")
            fields = {k: data[k] for k in CPU_FIELDS}
        return fields

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in CPU_FIELDS}


@dataclass
class VmState(State):
    """The VM-wide KVM devices: the KVM clock and, with the in-kernel irqchip, the PICs, the
    IOAPIC and the PIT."""

    NAME = "vm"
    VERSION = 2
    MIN_VERSION = 1
    clock: int = 0
    pic0: bytes = b""
    pic1: bytes = b""
    ioapic: bytes = b""
    pit: bytes = b""

    @classmethod
    def upgrade(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        if version < 2:
            data = fields.get("data")
            if not isinstance(data, dict) or "clock" not in data:
                raise SnapshotError("vm state (version 1) is incomplete")
            fields = {k: data.get(k, b"") for k in ("pic0", "pic1", "ioapic", "pit")} | {"clock": data["clock"]}
        return fields

    def as_dict(self, irqchip: bool) -> dict[str, Any]:
        d: dict[str, Any] = {"clock": self.clock}
        if irqchip:
            d |= {"pic0": self.pic0, "pic1": self.pic1, "ioapic": self.ioapic, "pit": self.pit}
        return d


@dataclass
class MemoryMapState(State):
    NAME = "memory_map"
    VERSION = 1
    ram_bytes: int = 0
    vcpus: int = 1
    ballooned: list[int] = field(default_factory=list)


CLASSES = [CpuState, VmState, MemoryMapState, DomainShapeState, *STATE_CLASSES]

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


def save_domain(domain: Domain, path: Any, progress: Callable[[int, int], None] | None = None) -> dict:
    m = domain.machine
    msrs = domain.kvm.msr_index_list()
    states: dict[str, State] = {}
    for r in m.runners:
        states[f"cpu/{r.index}"] = CpuState(**capture_vcpu(r.vcpu, msrs, m.irqchip))
    vm = capture_vm(m.vm, m.irqchip)
    states["vm"] = VmState(**vm)
    states["memory_map"] = MemoryMapState(m.memory_bytes, len(m.runners), m.memmap.ballooned())
    states["domain"] = DomainShapeState.of(domain.spec, m.memory_bytes, len(m.runners))
    if domain.xen is not None:
        states.update(domain.xen.persist.save())
    with m.ram_lock:   # RAM cannot move off a restored file while it is being read
        ram = m.ram
        region = (MemoryRegion("ram", 0, ram.size, buffer=ram.map) if ram.private
                  else MemoryRegion("ram", 0, ram.size, fd=ram.fd, offset=ram.offset,
                                    buffer=ram.map))
        info = save_snapshot(path, states, [region], progress=progress)
    return {"path": os.fspath(path), "size": info.logical_size, "size_on_disk": info.size_on_disk,
            "bytes_written": info.bytes_written}


def _check(domain: Domain, snap: Any, path: Any) -> tuple[MemoryMapState, Any]:
    m = domain.machine
    n = len(m.runners)
    st = snap.states
    mm: MemoryMapState = st["memory_map"]
    if mm.ram_bytes != m.memory_bytes:
        raise SnapshotError(f"snapshot {path} is of a {mm.ram_bytes >> 20} MiB guest; this "
                            f"domain has {m.memory_bytes >> 20} MiB")
    if mm.vcpus != n:
        raise SnapshotError(f"snapshot {path} has {mm.vcpus} vCPUs; this domain has {n}")
    shape = st.get("domain")
    if isinstance(shape, DomainShapeState):
        spec = domain.spec
        for name in ("xen", "xen_version", "domid"):
            if getattr(shape, name) != getattr(spec, name):
                raise SnapshotError(f"snapshot {path} was saved with {name} "
                                    f"{getattr(shape, name)}; this domain has {getattr(spec, name)}")
    try:
        region = snap.region("ram")
    except KeyError:
        raise SnapshotError(f"snapshot {path} holds no guest RAM") from None
    if region.size != m.memory_bytes or region.gpa != 0 or len(snap.regions) != 1:
        raise SnapshotError(f"snapshot {path}: memory regions do not match this domain")
    for g in mm.ballooned:
        if not m.memmap.ram_region_at(g << 12):
            raise SnapshotError(f"snapshot {path}: ballooned frame {g:#x} is not RAM here")
    for i in range(n):
        if not st[f"cpu/{i}"].regs or not st[f"cpu/{i}"].sregs:
            raise SnapshotError(f"snapshot {path}: cpu/{i} is incomplete")
    return mm, region


def sections(vcpus: int, xen: bool) -> tuple[list[str], tuple[str, ...]]:
    """The sections a domain of that shape requires, and the others it allows."""
    required = [f"cpu/{i}" for i in range(vcpus)] + ["vm", "memory_map"]
    if xen:
        required += [s for s in SECTIONS if s not in OPTIONAL]
    return required, ((*OPTIONAL, "domain") if xen else ("domain",))


def load_domain(domain: Domain, path: Any, verify: bool = True) -> dict:
    """Validate ``path`` against this domain, then apply it (the VM paused or not started).
    ``verify`` also checks guest memory against its chunk checksums first (reading the data
    the file holds, skipping holes); without it only the metadata is checked and restore
    time does not depend on how much memory the guest used."""
    required, allowed = sections(len(domain.machine.runners), domain.xen is not None)
    snap = load_snapshot(path, CLASSES, required=required, allowed=allowed, verify_memory=verify)
    try:
        return apply_snapshot(domain, snap, path)
    finally:
        snap.close()


def open_snapshot(path: Any, verify: bool = True) -> Any:
    """Open and validate a snapshot for a domain that is yet to be built on it: every
    section decoded (and memory checked with ``verify``), then the sections its own shape
    requires (``shape_of``). The caller closes it."""
    snap = load_snapshot(path, CLASSES, required=["memory_map"], verify_memory=verify)
    try:
        shape = shape_of(snap, path)
        check_sections([s.name for s in snap.sections], *sections(shape["vcpus"], shape["xen"]))
        return snap
    except BaseException:
        snap.close()
        raise


def ram_backing(snap: Any) -> Backing:
    """Guest RAM as a copy-on-write mapping of the snapshot's memory (it outlives the fd)."""
    region = snap.region("ram")
    backing = Backing.from_file("ram", snap.fd, region.file_offset, region.size)
    backing.fd = -1
    return backing


def apply_snapshot(domain: Domain, snap: Any, path: Any, ram_in_place: bool = False) -> dict:
    """Check a validated snapshot against this domain, then apply it. ``ram_in_place``: the
    machine was built on this snapshot's RAM (``ram_backing``), so only the overlay pages and
    ballooned frames are laid into its memory map. Returns what the caller reports, and in
    ``_detach`` a descriptor of the same file (not whatever has the path by now) and the RAM's
    offset in it, to move RAM off it later."""
    m = domain.machine
    xen = domain.xen is not None
    mm, region = _check(domain, snap, path)
    st = snap.states
    try:
        prep = domain.xen.persist.prepare(st) if xen else None
    except InvalidArgument as exc:
        raise SnapshotError(f"snapshot {path}: {exc}") from exc
    # -- everything checked: apply ----------------------------------------------------------
    _hold_lease(snap.fd)
    overlays = domain.xen.persist.overlay_mappings(prep) if prep is not None else {}
    m.replace_ram(m.ram if ram_in_place else ram_backing(snap), overlays=overlays,
                  ballooned=mm.ballooned)
    apply_vm(m.vm, st["vm"].as_dict(m.irqchip), m.irqchip)
    for i, r in enumerate(m.runners):
        cpu = st[f"cpu/{i}"]
        apply_vcpu(r.vcpu, cpu.as_dict(), m.irqchip)
        r.started = cpu.mp_state != const.KVM_MP_STATE_UNINITIALIZED
    if prep is not None:
        domain.xen.persist.apply(prep)
    detach = (os.dup(snap.fd), region.file_offset)
    return {"path": os.fspath(path), "size": os.fstat(snap.fd).st_size, "_detach": detach}


def snapshot_shape(path: Any) -> dict[str, Any]:
    """What a domain must be to take the snapshot at ``path`` (see ``shape_of``); memory is
    not read, a bad file raises its SnapshotError."""
    snap = load_snapshot(path, CLASSES, required=["memory_map"], verify_memory=False)
    try:
        return shape_of(snap, path)
    finally:
        snap.close()


def shape_of(snap: Any, path: Any) -> dict[str, Any]:
    """What a domain must be to take this snapshot: ``memory_mib``, ``vcpus``, ``xen`` and,
    in Xen mode, ``grant_frames``; with the snapshot's domain section also ``xen_version``
    and ``domid``."""
    mm: MemoryMapState = snap.states["memory_map"]
    if mm.ram_bytes <= 0 or mm.ram_bytes % (1 << 20):
        raise SnapshotError(f"snapshot {path}: guest RAM of {mm.ram_bytes} bytes is not "
                            "a whole number of MiB")
    shape: dict[str, Any] = {"memory_mib": mm.ram_bytes >> 20, "vcpus": mm.vcpus,
                             "xen": "xen" in snap.states}
    overlay = snap.states.get("xen_overlay")
    if overlay is not None:
        shape["grant_frames"] = overlay.grant_frames
    dom = snap.states.get("domain")
    if isinstance(dom, DomainShapeState):
        if (dom.memory_mib, dom.vcpus) != (shape["memory_mib"], shape["vcpus"]):
            raise SnapshotError(f"snapshot {path}: its domain and memory_map sections disagree")
        shape.update(xen=dom.xen, xen_version=dom.xen_version, domid=dom.domid,
                     grant_frames=dom.grant_frames)
    return shape
