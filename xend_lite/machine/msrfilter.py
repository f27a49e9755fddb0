"""KVM MSR filter ranges that send exactly a given set of MSRs to user space."""

from __future__ import annotations

from xend_lite.kvm import MsrFilterRange
from xend_lite.kvm import const as K


def msr_filter_ranges(indices: list[int]) -> list[MsrFilterRange]:
    """Filter ranges trapping exactly ``indices`` (sorted). A bitmap covers whole bytes, i.e.
    8 MSRs, and KVM obeys the first range holding an index, so indices close together share
    one range (clear bit: trap, set bit: KVM handles it) instead of overlapping ranges."""
    flags = K.KVM_MSR_FILTER_READ | K.KVM_MSR_FILTER_WRITE
    groups: list[list[int]] = []
    for idx in indices:
        if groups and idx - groups[-1][0] < 0x400:
            groups[-1].append(idx)
        else:
            groups.append([idx])
    ranges = []
    for group in groups:
        base = group[0]
        bitmap = bytearray(b"\xff" * ((group[-1] - base) // 8 + 1))
        for idx in group:
            bitmap[(idx - base) // 8] &= ~(1 << ((idx - base) % 8)) & 0xFF
        ranges.append(MsrFilterRange(flags, base, bytes(bitmap)))
    return ranges
