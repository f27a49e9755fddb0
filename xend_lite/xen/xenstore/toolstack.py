"""The nodes a toolstack (libxl) writes for a new guest, with the permissions libxl gives.

Under the guest's home ``/local/domain/<domid>``: nodes readable but not writable by the
guest (owner domain 0, ``r<domid>``) for what the toolstack states (name, domid, vm,
memory, cpu, the control directory, store and console ring details), and nodes the guest
owns for what it reports or is asked (control/shutdown, control/feature-*, data, drivers,
feature, attr, error). ``/vm/<uuid>`` holds the uuid and name. Only what this daemon serves
is there: the store and console ring nodes appear when the integrator gives their values,
and the only platform feature claimed is XS_RESET_WATCHES, which the server implements.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from typing import TYPE_CHECKING

from xend_lite.errors import InvalidArgument
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

if TYPE_CHECKING:   # a domain's info is made with the domain, its tree written with the store
    from xend_lite.xen.xenstore.store import Edit, Perms

__all__ = ["DomainInfo", "write_domain_tree", "CONSOLE_LIMIT"]

CONSOLE_LIMIT = 1048576             # LIBXL_XENCONSOLE_LIMIT
_NAME = re.compile(r"[\x20-\x7e]{1,64}\Z")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_U32 = (1 << 32) - 1


class DomainInfo(Frozen):
    __slots__ = ("name", "memory_kib", "vcpus", "target_kib", "uuid", "store_port",
                 "store_ring_ref", "console_port", "console_ring_ref")
    name: str
    memory_kib: int                     # memory/static-max
    vcpus: int
    target_kib: int | None              # memory/target (default: memory_kib)
    uuid: str | None                    # default: derived from the name
    store_port: int | None              # event channel of the store ring
    store_ring_ref: int | None          # its frame number
    console_port: int | None
    console_ring_ref: int | None

    def __init__(self, name: str, memory_kib: int, vcpus: int = 1, target_kib: int | None = None,
                 uuid: str | None = None, store_port: int | None = None,
                 store_ring_ref: int | None = None, console_port: int | None = None,
                 console_ring_ref: int | None = None):
        _set(self, "name", name)
        _set(self, "memory_kib", memory_kib)
        _set(self, "vcpus", vcpus)
        _set(self, "target_kib", target_kib)
        _set(self, "uuid", uuid)
        _set(self, "store_port", store_port)
        _set(self, "store_ring_ref", store_ring_ref)
        _set(self, "console_port", console_port)
        _set(self, "console_ring_ref", console_ring_ref)
        self._check()

    def _check(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InvalidArgument("domain name must be 1..64 printable ASCII characters")
        if self.uuid is not None and (not isinstance(self.uuid, str)
                                      or not _UUID.match(self.uuid)):
            raise InvalidArgument("uuid must look like 01234567-89ab-cdef-0123-456789abcdef")
        for f, hi in (("memory_kib", 1 << 52), ("vcpus", 4096), ("target_kib", 1 << 52),
                      ("store_port", _U32), ("store_ring_ref", 1 << 52),
                      ("console_port", _U32), ("console_ring_ref", 1 << 52)):
            v = getattr(self, f)
            if v is None and f not in ("memory_kib", "vcpus"):
                continue
            if type(v) is not int or not (1 if f == "vcpus" else 0) <= v <= hi:
                raise InvalidArgument(f"{f} must be an int in range, not {v!r}")

    def vm_uuid(self) -> str:
        return self.uuid or str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"{self.name}.xend-lite"))


def write_domain_tree(edit: Edit, domid: int, info: DomainInfo) -> None:
    """Write the guest's tree as domain 0 in one edit (all or nothing)."""
    from xend_lite.xen.xenstore import ops
    from xend_lite.xen.xenstore.protocol import home_path

    dom = home_path(domid)
    vm = f"/vm/{info.vm_uuid()}"
    ro: Perms = ((0, "n"), (domid, "r"))        # libxl's roperm
    rw: Perms = ((domid, "n"),)                 # libxl's rwperm: the guest owns it
    front: Perms = ((domid, "n"), (0, "r"))     # a device frontend, backend domain 0
    ro_front: Perms = ((0, "n"), (domid, "r"))

    def node(path: str, perms: Perms, value: str | None = None) -> None:
        ops.rm(edit, path)
        ops.write(edit, path, (value or "").encode())
        ops.set_perms(edit, path, perms)

    for path in ("/local", "/local/domain", "/vm"):
        ops.mkdir(edit, path)
    node(dom, ro)
    node(vm, ro)
    ops.write(edit, f"{vm}/uuid", info.vm_uuid().encode())
    ops.write(edit, f"{vm}/name", info.name.encode())
    values = {"vm": vm, "name": info.name, "domid": str(domid),
              "memory/static-max": str(info.memory_kib),
              "memory/target": str(info.target_kib if info.target_kib is not None
                                   else info.memory_kib),
              "control/platform-feature-xs_reset_watches": "1"}
    for sub in ("cpu", "memory", "device", "control"):
        node(f"{dom}/{sub}", ro)
    for sub in ("control/shutdown", "control/feature-poweroff", "control/feature-reboot",
                "control/feature-suspend", "control/sysrq", "data", "drivers", "feature",
                "attr", "error"):
        node(f"{dom}/{sub}", rw)
    for i in range(info.vcpus):
        values[f"cpu/{i}/availability"] = "online"
    if info.store_port is not None and info.store_ring_ref is not None:
        values["store/port"] = str(info.store_port)
        values["store/ring-ref"] = str(info.store_ring_ref)
    for sub, value in values.items():
        ops.write(edit, f"{dom}/{sub}", value.encode())
    if info.console_port is not None and info.console_ring_ref is not None:
        con = f"{dom}/console"
        node(con, front)
        node(f"{con}/backend-id", front, "0")
        for sub, value in (("limit", str(CONSOLE_LIMIT)), ("type", "xenconsoled"),
                           ("output", "pty"), ("port", str(info.console_port)),
                           ("ring-ref", str(info.console_ring_ref))):
            node(f"{con}/{sub}", ro_front, value)
