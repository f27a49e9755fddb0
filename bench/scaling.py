"""How costs grow with vCPU count and guest RAM: hypercall throughput with 1, 2 and 4 vCPUs
all making hypercalls, pause latency and overlay map latency with 1, 2 and 4 busy vCPUs, and
overlay map latency with 128 MiB, 1 GiB and 4 GiB of guest RAM. Each figure is against the
smallest configuration measured in the same run."""

from __future__ import annotations

import os
import statistics
import time

from bench._harness import Context, Figure, Section, Skip
from bench.hypercall import LOAD_GPA, build_guest
from bench.overlay import p99

TITLE = "scaling: vCPU count and guest RAM"
SUMMARY = (
    "Hypercalls: every vCPU runs bench/guests/hcloop.S (xen_version through the stub page) "
    "for a fixed time, served natively (in C in the vCPU loop) and through the Python "
    "dispatcher; the figure is host time per hypercall (wall time x vCPUs / calls), so "
    "1.0x means each vCPU is as fast as one alone; also the CPU time the vCPU threads spend "
    "per hypercall. This host has 2 cores, so 4 vCPUs share them. Pause: a bare pause + "
    "resume of all running vCPUs. Overlay: map + unmap of shared_info with the vCPUs "
    "spinning. RAM: the overlay map with 1 vCPU at each guest size (guest RAM is a memfd, "
    "so untouched memory costs nothing). Medians over many operations.")


def _machine(kvm, image: bytes, vcpus: int, ram: int):
    from xend_lite.machine.loader import boot_cpu, load_image
    from xend_lite.machine.machine import Machine

    m = Machine(kvm, ram, vcpus)
    info = load_image(m, image, flat_gpa=LOAD_GPA)
    for i in range(vcpus):
        bc = boot_cpu(m, info, i)
        m.set_boot_cpu(i, bc.replace(regs=bc.regs.replace(rsp=0x170000 - i * 0x4000)))
    return m


def _cpu_ns(m) -> int:
    """CPU time the vCPU threads have used so far."""
    return sum(time.clock_gettime_ns(time.pthread_getcpuclockid(r.thread.ident))
               for r in m.runners if r.thread is not None and r.thread.ident is not None)


def hypercalls(image: bytes, vcpus: int, seconds: float, native: bool = True) -> tuple[float, float]:
    """(ns of host time, ns of vCPU-thread CPU time) per hypercall with every vCPU calling
    (served natively or in Python)."""
    from xend_lite.kvm import Kvm
    from xend_lite.xen.platform import XenConfig, XenPlatform

    with Kvm() as kvm:
        m = _machine(kvm, image, vcpus, 16 << 20)
        try:
            xen = XenPlatform(m, XenConfig(grant_frames=1, native_hypercalls=native))
            m.start()
            time.sleep(0.2)
            c0, u0, t0 = xen.hypercalls.count(17), _cpu_ns(m), time.perf_counter_ns()
            time.sleep(seconds)
            c1, u1, t1 = xen.hypercalls.count(17), _cpu_ns(m), time.perf_counter_ns()
            if m.status is not None:
                raise RuntimeError(f"guest stopped: {m.status}")
        finally:
            m.close()
    calls = max(1, c1 - c0)
    return (t1 - t0) * vcpus / calls, (u1 - u0) / calls


def control(image: bytes, vcpus: int, ram: int, n: int) -> tuple[list[float], list[float]]:
    """(pause + resume, overlay map + unmap) latencies in ns with spinning vCPUs."""
    from xend_lite.kvm import Kvm
    from xend_lite.machine.backing import INVALID_GPA
    from xend_lite.xen.platform import OverlayChange, XenConfig, XenPlatform

    pauses, maps = [], []
    with Kvm() as kvm:
        m = _machine(kvm, image, vcpus, ram)
        try:
            xen = XenPlatform(m, XenConfig(grant_frames=1))

            def ovmap(gpa: int) -> None:   # the operator's request, on the VM owner
                m.owner.run(xen.change_overlay, OverlayChange("shared_info", gpa))
            m.start()
            time.sleep(0.05)
            clock = time.perf_counter_ns
            for i in range(n + 5):
                t = clock()
                m.pause()
                m.resume()
                t1 = clock()
                ovmap(0x800000 + (i % 32) * 0x1000)
                ovmap(INVALID_GPA)
                t2 = clock()
                if i >= 5:
                    pauses.append(t1 - t)
                    maps.append(t2 - t1)
                time.sleep(0.0005)
            xen.close()
            xen.overlay.close()
        finally:
            m.close()
    return pauses, maps


def run(ctx: Context) -> Section:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise Skip("/dev/kvm is missing or not accessible")
    image = build_guest(ctx).read_bytes()
    secs = 0.3 if ctx.smoke else 2.0
    n = ctx.count(500, 30)
    figures = []
    runs: dict[tuple[bool, int], list[tuple[float, float]]] = {}
    for _ in range(ctx.repeats):      # interleaved, so a noisy moment spreads over all
        for native in (True, False):
            for v in (1, 2, 4):
                runs.setdefault((native, v), []).append(hypercalls(image, v, secs, native))
    hc = {k: statistics.median(w for w, _c in x) for k, x in runs.items()}
    cpu = {k: statistics.median(c for _w, c in x) for k, x in runs.items()}
    for native, how in ((True, "native"), (False, "Python dispatch")):
        for v in (2, 4):
            figures.append(Figure(f"hypercall ({how}), {v} vCPUs calling", hc[native, v], "ns",
                                  "1 vCPU", hc[native, 1]))
            figures.append(Figure(f"hypercall ({how}), {v} vCPUs calling, vCPU CPU time",
                                  cpu[native, v], "ns", "1 vCPU", cpu[native, 1]))
    ctl = {v: control(image, v, 128 << 20, n) for v in (1, 2, 4)}
    for v in (2, 4):
        figures.append(Figure(f"pause + resume, {v} vCPUs, median", statistics.median(ctl[v][0]),
                              "ns", "1 vCPU", statistics.median(ctl[1][0])))
        figures.append(Figure(f"overlay map + unmap, {v} vCPUs, median",
                              statistics.median(ctl[v][1]), "ns", "1 vCPU",
                              statistics.median(ctl[1][1])))
        figures.append(Figure(f"overlay map + unmap, {v} vCPUs, p99", p99(ctl[v][1]), "ns",
                              "1 vCPU", p99(ctl[1][1])))
    sizes = [128 << 20] if ctx.smoke else [128 << 20, 1 << 30, 4 << 30]
    ram = {s: control(image, 1, s, n)[1] for s in sizes}
    for s in sizes[1:]:
        figures.append(Figure(f"overlay map + unmap, {s >> 20} MiB guest, median",
                              statistics.median(ram[s]), "ns", "128 MiB guest",
                              statistics.median(ram[sizes[0]])))
    notes = [f"Hypercalls over {secs} s per run, median of {ctx.repeats} run(s); "
             f"{n} pause and overlay operations per configuration.",
             f"This host has {os.cpu_count()} CPU(s): with more vCPUs than CPUs the host time "
             "per hypercall cannot fall below vCPUs / CPUs times one vCPU's; the vCPU threads' "
             "CPU time per hypercall (from their thread CPU clocks) has no such floor and shows "
             "what each call costs when the vCPUs do not wait for one another."]
    return Section(TITLE, SUMMARY, figures, notes)
