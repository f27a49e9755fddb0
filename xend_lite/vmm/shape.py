"""A VM's shape, saved in its snapshot so that a restore can build the same VM without the
operator repeating it: memory, vCPUs, Xen mode and the Xen settings the guest saw.

Snapshots made before the shape was saved still give memory and vCPUs (from their
memory_map section); their Xen settings are then the daemon's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xend_lite.errors import SnapshotError
from xend_lite.snapshot import State

# the configuration fields a shape sets, in the order errors name them
SHAPE_FIELDS = ("memory_mib", "vcpus", "xen_version", "domid", "grant_frames")


@dataclass
class DomainShapeState(State):
    NAME = "domain"
    VERSION = 1
    memory_mib: int = 0
    vcpus: int = 1
    xen: bool = True
    xen_version: str = ""
    domid: int = 1
    grant_frames: int = 64

    @classmethod
    def of(cls, spec: Any, memory_bytes: int, vcpus: int) -> DomainShapeState:
        return cls(memory_mib=memory_bytes >> 20, vcpus=vcpus, xen=bool(spec.xen),
                   xen_version=str(spec.xen_version), domid=int(spec.domid),
                   grant_frames=int(spec.grant_frames))


def read_shape(path: str) -> dict[str, Any]:
    """The shape of the VM saved at ``path``: config field -> value (``xen`` too when the
    snapshot says). Reads the sections only, not guest memory. SnapshotError when the file is
    not a snapshot of a VM."""
    from xend_lite.snapshot import load_snapshot
    from xend_lite.vmm.persist import CLASSES

    with load_snapshot(path, CLASSES, required=["memory_map"]) as snap:
        st = snap.states
        mm = st["memory_map"]
        shape: dict[str, Any] = {"memory_mib": mm.ram_bytes >> 20, "vcpus": mm.vcpus}
        dom = st.get("domain")
        if isinstance(dom, DomainShapeState):
            if (dom.memory_mib, dom.vcpus) != (shape["memory_mib"], shape["vcpus"]):
                raise SnapshotError(f"snapshot {path}: its domain and memory_map sections disagree")
            shape.update(xen=dom.xen, xen_version=dom.xen_version, domid=dom.domid,
                         grant_frames=dom.grant_frames)
        else:
            shape["xen"] = "xen" in st
    return shape
