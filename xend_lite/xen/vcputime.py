"""Each vCPU's vcpu_time_info (a guest TSC stamp, the system time then, and the scale that
turns TSC ticks into nanoseconds), kept right as Xen keeps it.

System time never steps back for a guest extrapolating from the previous record: the new
stamp's time is at least what the old record gives at that TSC. Over longer spans the TSC rate
is measured against the host's clock and the scale corrected, as Xen's calibration does.
Records are refreshed about once a second by the timer thread (see timers.py).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from xend_lite.kvm import KvmError, Vcpu
from xend_lite.xen.abi import TIME_FLAGS, TIME_TSC, TIME_VERSION
from xend_lite.xen.native import host_tsc
from xend_lite.xen.timekeeping import Clock, scale_delta, tsc_scale

if TYPE_CHECKING:
    from xend_lite.machine.machine import Machine
    from xend_lite.xen.shinfo import SharedInfo

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
MSR_IA32_TSC = 0x10
TIME_RECORD = 32               # offset of vcpu_time_info inside vcpu_info
CALIBRATE_NS = 2_000_000_000   # measure the TSC rate over at least this long


class VcpuTime:
    """Locking: ``_lock`` guards the anchor, the last record and the TSC offset; callers
    off the vCPU and owner threads already hold machine.host_access()."""

    def __init__(self, machine: Machine, shinfo: SharedInfo, clock: Clock, nr_vcpus: int):
        self.machine = machine
        self.shinfo = shinfo
        self.clock = clock
        self.nr_vcpus = nr_vcpus
        try:
            self.tsc_khz = machine.runners[0].vcpu.get_tsc_khz()
        except KvmError:
            self.tsc_khz = 0
        self.tsc_mul, self.tsc_shift = tsc_scale(self.tsc_khz or 1_000_000)
        self._lock = threading.Lock()
        self._anchor: tuple[int, int] | None = None
        self._last: tuple[int, int, int, int] | None = None
        self._tsc_offset: int | None = None

    def publish(self, guest_tsc: int) -> None:
        """Write every vCPU's vcpu_time_info and the wallclock, each under the odd/even
        version protocol."""
        with self.machine.host_access(), self._lock:
            now = self.clock.now()
            anchor = self._anchor
            if anchor is None:
                self._anchor = (guest_tsc, now)
            elif now - anchor[1] >= CALIBRATE_NS and guest_tsc > anchor[0]:
                khz = (guest_tsc - anchor[0]) * 1_000_000 // (now - anchor[1])
                if khz > 0 and abs(khz - self.tsc_khz) * 1000 < self.tsc_khz:   # within 0.1 %
                    self.tsc_mul, self.tsc_shift = tsc_scale(khz)
            last = self._last
            if last is not None and guest_tsc >= last[0]:
                now = max(now, last[1] + scale_delta(guest_tsc - last[0], last[2], last[3]))
            self._last = (guest_tsc, now, self.tsc_mul, self.tsc_shift)
            record = ((guest_tsc & U64).to_bytes(8, "little") + now.to_bytes(8, "little")
                      + self.tsc_mul.to_bytes(4, "little")
                      + (self.tsc_shift & 0xFF).to_bytes(1, "little") + b"\x00")
            for i in range(self.nr_vcpus):
                vv = self.shinfo.vcpu_info_view(i)
                if vv is None:
                    continue
                view, off = vv
                t = off + TIME_RECORD
                odd = ((int.from_bytes(view[t:t + 4], "little") + 1) | 1) & U32
                view[t + TIME_VERSION:t + 4] = odd.to_bytes(4, "little")
                view[t + TIME_TSC:t + TIME_FLAGS + 1] = record
                view[t:t + 4] = ((odd + 1) & U32).to_bytes(4, "little")
            self.shinfo.publish_wallclock(self.clock)

    def learn_tsc_offset(self, vcpu: Vcpu) -> int | None:
        """Read this vCPU's TSC (on its thread, or with it paused), remember its offset from
        the host's TSC for later refreshes, and return it."""
        try:
            before = host_tsc()
            tsc = vcpu.get_msrs([MSR_IA32_TSC]).get(MSR_IA32_TSC)
            after = host_tsc()
        except KvmError:
            return None
        if tsc is None:
            return None
        with self._lock:
            self._tsc_offset = tsc - (before + after) // 2
        return tsc

    def publish_from(self, vcpu: Vcpu) -> None:
        """Publish now, stamped with this vCPU's TSC."""
        tsc = self.learn_tsc_offset(vcpu)
        if tsc is not None:
            self.publish(tsc)

    def refresh(self) -> None:
        """Publish from any thread, with the guest TSC estimated from the host's."""
        offset = self._tsc_offset
        if offset is not None:
            self.publish(host_tsc() + offset)

    def forget(self) -> None:
        """A reset or a restore: the next record starts afresh."""
        with self._lock:
            self._anchor = self._last = self._tsc_offset = None
