"""The Xen side's saved state: XenState (everything but the overlay pages and the xenstore)
and OverlayState (the overlay pages, which overlay.py saves); the xenstore's is in
xenstore/state.py. Apart from the devices so that a VM that never saves or loads does not
load the snapshot layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xend_lite.snapshot.state import State


@dataclass
class XenState(State):
    NAME = "xen"
    VERSION = 4
    MIN_VERSION = 1
    hypercall_page: int = -1
    params: dict[str, int] = field(default_factory=dict)
    # ports: port -> [state, vcpu, virq, remote domain, remote port]; daemon_ports: the
    # daemon side's port -> the guest port bound to it, or -1
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
    grant_frames_in_use: int = 1
    # the memory map the guest set for itself (XENMEM_set_memory_map): [addr, size, type]
    guest_memory_map: list[list[int]] | None = None
    # per vCPU: [[[gpa, bytes]...], long mode, state, entry time, [4 times]] (runstate.py)
    runstate: dict[str, list] = field(default_factory=dict)

    @classmethod
    def upgrade(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        if version < 2:              # saved before periodic timers existed
            fields = fields | {"periodic": {}}
        if version < 3:              # saved before the grant table's size was kept
            fields = fields | {"grant_frames_in_use": 1}
        if version < 4:              # saved before guest memory maps and runstate areas
            fields = fields | {"guest_memory_map": None, "runstate": {}}
        return fields


@dataclass
class OverlayState(State):
    """Saved state of the overlay device: where each page is and what it holds."""

    NAME = "xen_overlay"
    VERSION = 2
    MIN_VERSION = 1
    gpas: dict[str, int] = field(default_factory=dict)       # mapped pages only
    long_mode: bool = True
    contents: dict[str, bytes] = field(default_factory=dict)  # non-zero pages only
    grant_frames: int = 0
    operator_pages: list[str] = field(default_factory=list)   # mapped by the operator

    @classmethod
    def upgrade(cls, version: int, fields: dict) -> dict:
        if version < 2:              # saved before the device knew who mapped a page
            fields = fields | {"operator_pages": []}
        return fields
