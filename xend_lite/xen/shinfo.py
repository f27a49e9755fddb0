"""The shared_info page as the hypervisor side writes it: its layout for the guest's mode,
where each vCPU's vcpu_info lives (in shared_info, or where the guest registered it), and the
wallclock.

The page itself belongs to the overlay device; this only reads and writes it. A registered
vcpu_info lies in guest RAM: threads other than the vCPUs and the owner go through
``machine.host_access()`` around any access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from xend_lite.xen.abi import SHINFO32, SHINFO64, SharedInfoLayout
from xend_lite.xen.errors import inval
from xend_lite.xen.timekeeping import Clock

if TYPE_CHECKING:
    from xend_lite.machine.backing import Backing
    from xend_lite.machine.machine import Machine
    from xend_lite.xen.overlay import OverlayDevice

U32 = (1 << 32) - 1
VCPU_INFO_SIZE = 64
LEGACY_VCPUS = 32          # vcpu_info slots inside shared_info


class SharedInfo:
    def __init__(self, machine: Machine, overlay: OverlayDevice):
        self.machine = machine
        self.overlay = overlay
        self.page: Backing = overlay.shared_info
        self.vcpu_info_gpa: dict[int, int] = {}     # vcpu -> guest-physical address
        self.on_change: Callable[[], None] = lambda: None   # a vcpu_info moved

    @property
    def layout(self) -> SharedInfoLayout:
        return SHINFO64 if self.overlay.long_mode else SHINFO32

    @property
    def addr(self) -> int:
        """The page's host address (event-channel bitmaps are updated atomically there)."""
        return self.page.addr

    def read_bit(self, off: int, bit: int, word: int) -> bool:
        v = self.page.view
        return bool(int.from_bytes(v[off:off + word], "little") >> bit & 1)

    # -- vcpu_info -----------------------------------------------------------------------

    def _slot(self, vcpu: int) -> tuple[Backing, int] | None:
        gpa = self.vcpu_info_gpa.get(vcpu)
        if gpa is not None:
            seg = self.machine.memmap.find(gpa)
            if seg is None or seg.end < gpa + VCPU_INFO_SIZE:
                return None
            return seg.backing, seg.offset + gpa - seg.gpa
        if vcpu < LEGACY_VCPUS:
            return self.page, vcpu * VCPU_INFO_SIZE
        return None

    def vcpu_info_addr(self, vcpu: int) -> int:
        """Host address of a vCPU's vcpu_info, or 0 when it has none."""
        slot = self._slot(vcpu)
        return 0 if slot is None else slot[0].addr + slot[1]

    def vcpu_info_view(self, vcpu: int) -> tuple[memoryview, int] | None:
        slot = self._slot(vcpu)
        return None if slot is None else (slot[0].view, slot[1])

    def upcall_pending(self, vcpu: int) -> bool:
        vv = self.vcpu_info_view(vcpu)
        return bool(vv and vv[0][vv[1]])

    def register_vcpu_info(self, vcpu: int, gpa: int) -> None:
        """Move a vCPU's vcpu_info from shared_info into guest memory, keeping what was
        there and asking the guest to rescan every selector word (the caller flags and
        delivers the upcall that makes it look)."""
        with self.machine.host_access():
            old = self.vcpu_info_view(vcpu)
            data = bytes(old[0][old[1]:old[1] + VCPU_INFO_SIZE]) if old else bytes(VCPU_INFO_SIZE)
            self.vcpu_info_gpa[vcpu] = gpa
            new = self.vcpu_info_view(vcpu)
            if new is None:
                del self.vcpu_info_gpa[vcpu]
                raise inval("vcpu_info frame is not memory")
            view, off = new
            view[off:off + VCPU_INFO_SIZE] = data
            lay = self.layout
            view[off + lay.pending_sel:off + lay.pending_sel + lay.word] = b"\xff" * lay.word
        self.on_change()

    # -- wallclock -----------------------------------------------------------------------

    def publish_wallclock(self, clock: Clock) -> None:
        """The time of day at system time zero, under the odd/even version protocol."""
        lay = self.layout
        view = self.page.view
        sec, nsec = clock.wallclock_at_zero()
        ver = int.from_bytes(view[lay.wc_version:lay.wc_version + 4], "little")
        odd = (ver + 1) | 1
        view[lay.wc_version:lay.wc_version + 4] = (odd & U32).to_bytes(4, "little")
        view[lay.wc_sec:lay.wc_sec + 4] = (sec & U32).to_bytes(4, "little")
        view[lay.wc_nsec:lay.wc_nsec + 4] = nsec.to_bytes(4, "little")
        view[lay.wc_sec_hi:lay.wc_sec_hi + 4] = ((sec >> 32) & U32).to_bytes(4, "little")
        view[lay.wc_version:lay.wc_version + 4] = ((odd + 1) & U32).to_bytes(4, "little")

    def reset(self) -> None:
        self.vcpu_info_gpa.clear()
        self.on_change()
