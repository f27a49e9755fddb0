"""xen_version: the version, its strings, the features offered, the page size."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from xend_lite.machine.backing import PAGE_SIZE
from xend_lite.xen.errors import XenError, inval
from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.xen.hypercall import Call

XEN_EXTRAVERSION = b".0-xend-lite"
CAPABILITIES_TEXT = b"hvm-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p"
XENVER_PLATFORM_VIRT_START = {True: 0xFFFF800000000000, False: 0xF5800000}
COMPILE_INFO = (b"gcc".ljust(64, b"\0") + b"xend-lite".ljust(16, b"\0")
                + b"localdomain".ljust(32, b"\0") + b"2026-11-26".ljust(32, b"\0"))
#: submap 0 of XENVER_get_features, each with what serves it: the hypercall page and
#: physmap through the overlay device (auto-translated, guest page tables its own), event
#: upcalls by vector (hvm.Upcalls), vcpu_time_info kept by vcputime.VcpuTime
FEATURES = (1 << X.XENFEAT_writable_page_tables | 1 << X.XENFEAT_auto_translated_physmap
            | 1 << X.XENFEAT_hvm_callback_vector | 1 << X.XENFEAT_hvm_safe_pvclock)
XENVER_VERSION = X.XENVER_version


class VersionOps:
    def __init__(self, major: int, minor: int, domid: int):
        self.version_word = major << 16 | minor
        self.handle = uuid.uuid5(uuid.NAMESPACE_OID, f"xend-lite-{domid}-{uuid.uuid4()}").bytes

    def xen_version(self, c: Call, cmd: int, arg: int) -> int:
        if cmd == XENVER_VERSION:        # the one guests call in loops: answered first
            return self.version_word
        if cmd == X.XENVER_extraversion:
            c.view.write(arg, XEN_EXTRAVERSION.ljust(16, b"\0"))
            return 0
        if cmd == X.XENVER_compile_info:
            c.view.write(arg, COMPILE_INFO)
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
            c.view.write_uint(arg + lay.offset("submap"), 4, FEATURES if idx == 0 else 0)
            return 0
        if cmd == X.XENVER_pagesize:
            return PAGE_SIZE
        if cmd == X.XENVER_guest_handle:
            c.view.write(arg, self.handle)
            return 0
        if cmd in (X.XENVER_commandline, X.XENVER_build_id):
            raise XenError(X.XEN_EPERM, "for the control domain only")
        raise XenError(X.XEN_ENOSYS, "unknown xen_version sub-op")
