"""Xen time as a guest reads it from shared_info: system time, wallclock and each vCPU's
vcpu_time_info (a TSC stamp plus the scale that turns TSC ticks into nanoseconds).

System time is nanoseconds since the domain started, carried across save/restore. Updates
follow Xen's protocol: bump ``version`` to odd, write, bump to even, so a reader retries a
torn read.
"""

from __future__ import annotations

import time
from typing import Callable


def tsc_scale(tsc_khz: int) -> tuple[int, int]:
    """(mul, shift) with ns = ((ticks << shift) or (ticks >> -shift)) * mul >> 32, the most
    precise pair whose multiplier fits in 32 bits."""
    hz = max(1, tsc_khz) * 1000
    for shift in range(-31, 32):
        num = 10**9 << 32
        mul = (num >> shift) // hz if shift >= 0 else (num << -shift) // hz
        if mul < 1 << 32:
            return mul, shift
    return (1 << 32) - 1, 31


def scale_delta(delta: int, mul: int, shift: int) -> int:
    """What a guest computes from a TSC delta (for tests and checks)."""
    delta = delta << shift if shift >= 0 else delta >> -shift
    return (delta * mul) >> 32


class Clock:
    def __init__(self, on_zero: Callable[[int], None] | None = None) -> None:
        """``on_zero(ns)``: told the host's CLOCK_MONOTONIC at system time 0 whenever it is
        set (the native timers keep the same clock)."""
        self._on_zero = on_zero
        self._set_zero(time.monotonic_ns())

    def _set_zero(self, boot: int) -> None:
        self._boot = boot
        if self._on_zero is not None:
            self._on_zero(boot)

    def now(self) -> int:
        """Xen system time: ns since the domain started."""
        return time.monotonic_ns() - self._boot

    def set_now(self, system_time: int) -> None:
        """Continue from a saved system time (restore)."""
        self._set_zero(time.monotonic_ns() - system_time)

    def wallclock_at_zero(self) -> tuple[int, int]:
        """(seconds, nanoseconds) of real time when system time was zero."""
        ns = time.time_ns() - self.now()
        return ns // 10**9, ns % 10**9
