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
