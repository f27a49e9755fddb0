"""grant_table_op: the grant table's size, its frames and its version (v1 only).

The frames themselves are the overlay device's grant pages, which the guest maps with
XENMEM_add_to_physmap (XENMAPSPACE_grant_table).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xend_lite.xen.errors import XenError, inval
from xend_lite.xen.hvm import self_domain
from xend_lite.xen.overlay import grant_page
from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.xen.hypercall import Call
    from xend_lite.xen.overlay import OverlayDevice

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
GNTTAB_MAX_VERSION = 1
SINGLE = (X.GNTTABOP_setup_table, X.GNTTABOP_query_size, X.GNTTABOP_set_version,
          X.GNTTABOP_get_version)


class GrantOps:
    def __init__(self, domid: int, overlay: OverlayDevice):
        self.domid = domid
        self.overlay = overlay
        self.frames_in_use = 1

    def grant_table_op(self, c: Call, cmd: int, uop: int, count: int) -> int:
        if cmd in SINGLE and count != 1:
            raise inval("this op takes exactly one argument")
        ov = self.overlay
        ours = (X.DOMID_SELF, self.domid)
        if cmd == X.GNTTABOP_query_size:
            lay = c.lay("gnttab_query_size")
            q = c.view.read_struct(lay, uop)
            if q["dom"] not in ours:
                c.view.write_fields(lay, uop, {"status": X.GNTST_bad_domain})
                return 0
            c.view.write_fields(lay, uop, {"nr_frames": self.frames_in_use,
                                           "max_nr_frames": ov.grant_frames, "status": X.GNTST_okay})
            return 0
        if cmd == X.GNTTABOP_setup_table:
            return self._setup_table(c, uop)
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
            self_domain(g["dom"], self.domid)
            c.view.write_fields(lay, uop, {"version": 1})
            return 0
        if cmd == X.GNTTABOP_get_status_frames:
            raise inval("status frames exist only in grant table v2")
        raise XenError(X.XEN_ENOSYS, "grant operation not offered")

    def _setup_table(self, c: Call, uop: int) -> int:
        ov = self.overlay
        lay = c.lay("gnttab_setup_table")
        s = c.view.read_struct(lay, uop)
        if s["nr_frames"] > ov.grant_frames:
            c.view.write_fields(lay, uop, {"status": X.GNTST_general_error})
            return 0
        if s["dom"] not in (X.DOMID_SELF, self.domid):
            c.view.write_fields(lay, uop, {"status": X.GNTST_bad_domain})
            return 0
        n = s["nr_frames"]
        self.frames_in_use = max(self.frames_in_use, n)
        invalid = U64 if c.long_mode else U32
        frames = [ov.gfn_of(grant_page(i)) for i in range(n)]
        raw = b"".join(((invalid if f is None else f) & invalid).to_bytes(c.ulong, "little")
                       for f in frames)
        if n:
            c.view.write(s["frame_list"], raw)
        c.view.write_fields(lay, uop, {"status": X.GNTST_okay})
        return 0
