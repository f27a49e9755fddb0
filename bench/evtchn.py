"""An event-channel round trip: a vCPU sends on an IPI port bound to itself and takes the
upcall the send raises, with EVTCHNOP_send served natively and through the Python
dispatcher, with 1 and 2 vCPUs all doing it."""

from __future__ import annotations

import os
import statistics
import struct
import time

from bench._harness import HERE, Context, Figure, Section, Skip, interleaved, samples_note
from bench.scaling import _cpu_ns

TITLE = "event channels: send to itself and take the upcall"
SUMMARY = (
    "Every vCPU runs bench/guests/evtloop64.S: EVTCHNOP_send on an IPI port bound to itself, "
    "then a wait for the upcall (the callback vector, delivered as an MSI through the in-kernel "
    "local APIC) whose handler clears the flag, selector and pending bit and EOIs. The send is "
    "served in C on the vCPU thread (xen/dispatch.py NATIVE, the event-channel mirror) or by "
    "the Python dispatcher and evtchn.py (native_hypercalls off). Figure: time per round trip "
    "on each vCPU (wall time x vCPUs / round trips over a fixed time), and the CPU time the "
    "vCPU threads spend per round trip (which another load on the host does not inflate).")

DATA = 0x300000
BAD = DATA + 0x208


def build_guest(ctx: Context) -> bytes:
    from xend_lite.guests.build import build, toolchain_missing

    missing = toolchain_missing()
    if missing:
        raise Skip(missing)
    return build(HERE / "guests" / "evtloop64.S", ctx.workdir / "evtloop64.elf", bits=64).read_bytes()


def round_trip(image: bytes, vcpus: int, seconds: float, native: bool) -> tuple[float, float]:
    """(ns of wall time, ns of vCPU-thread CPU time) per round trip on each vCPU, every vCPU
    sending to itself."""
    from xend_lite.kvm import Kvm
    from xend_lite.machine.loader import boot_cpu, load_image
    from xend_lite.machine.machine import Machine
    from xend_lite.xen.platform import XenConfig, XenPlatform

    def rounds() -> int:
        return sum(struct.unpack(f"<{vcpus}Q", m.mem.read(DATA, 8 * vcpus)))

    with Kvm() as kvm:
        m = Machine(kvm, 32 << 20, vcpus)
        try:
            xen = XenPlatform(m, XenConfig(grant_frames=1, native_hypercalls=native))
            info = load_image(m, image)
            for i in range(1, vcpus):
                m.set_boot_cpu(i, boot_cpu(m, info, i))
            m.start()
            deadline = time.monotonic() + 10
            while rounds() < 100 * vcpus:
                if m.status is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the guest did not start its rounds: {m.status}")
                time.sleep(0.01)
            r0, u0, t0 = rounds(), _cpu_ns(m), time.perf_counter_ns()
            time.sleep(seconds)
            r1, u1, t1 = rounds(), _cpu_ns(m), time.perf_counter_ns()
            if struct.unpack("<Q", m.mem.read(BAD, 8))[0]:
                raise RuntimeError("a send did not return 0")
            if xen.internal_errors:
                raise RuntimeError("dispatch reported internal errors")
        finally:
            m.close()
    n = max(1, r1 - r0)
    return (t1 - t0) * vcpus / n, (u1 - u0) / n


def run(ctx: Context) -> Section:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise Skip("/dev/kvm is missing or not accessible")
    image = build_guest(ctx)
    seconds = 0.05 if ctx.smoke else 1.0
    vcpu_counts = [v for v in (1, 2) if v <= max(1, os.cpu_count() or 1)]
    runs = {(native, v): (lambda native=native, v=v: round_trip(image, v, seconds, native))
            for v in vcpu_counts for native in (True, False)}
    got: dict[tuple[bool, int], list[float]] = {k: [] for k in runs}
    cpu: dict[tuple[bool, int], list[float]] = {k: [] for k in runs}

    def sample(key):
        def fn() -> float:
            wall, used = runs[key]()
            cpu[key].append(used)
            return wall
        return fn
    samples, med = interleaved({k: sample(k) for k in runs}, ctx.repeats)
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    figures = []
    for v in vcpu_counts:
        figures.append(Figure(f"send + upcall, native, {v} vCPU(s)", med[True, v], "ns",
                              f"Python path, {v} vCPU(s)", med[False, v]))
        figures.append(Figure(f"send + upcall, native, {v} vCPU(s), vCPU CPU time",
                              med_cpu[True, v], "ns", f"Python path, {v} vCPU(s)",
                              med_cpu[False, v]))
    for native, how in ((True, "native"), (False, "Python path")):
        for v in vcpu_counts[1:]:
            figures.append(Figure(f"send + upcall, {how}, {v} vCPUs", med[native, v], "ns",
                                  f"{how}, 1 vCPU", med[native, 1]))
            figures.append(Figure(f"send + upcall, {how}, {v} vCPUs, vCPU CPU time",
                                  med_cpu[native, v], "ns", f"{how}, 1 vCPU", med_cpu[native, 1]))
    notes = [f"{seconds:g} s per run, {ctx.repeats} interleaved run(s), median kept.",
             samples_note({f"{'native' if n else 'python'}-{v}": s
                           for (n, v), s in samples.items()}, "ns/round trip")]
    return Section(TITLE, SUMMARY, figures, notes)
