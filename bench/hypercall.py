"""A hypercall round trip (xen_version VERSION, and set_timer_op, through the stub page)
through xend-lite's dispatch, against a C host running the very same guest image and
answering the same exit."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

from bench._harness import HERE, Context, Figure, Section, Skip, bench_guest, interleaved, samples_note
from bench.exitloop import c_exitloop

TITLE = "hypercall: xen_version round trip through the hypercall page"
SUMMARY = (
    "The guest (bench/guests/hcloop.S, flat 32-bit) calls xen_version(XENVER_version) through "
    "its hypercall page in a loop and checks the answer. xend-lite runs it with the Xen "
    "emulation: natively (the call served in C inside the vCPU's KVM_RUN loop, "
    "xen/dispatch.py NATIVE) and through the Python dispatcher (native_hypercalls off: "
    "doorbell port, SYNC_REGS, dispatch table, handler, RAX); the C host "
    "(bench/exitloop.c) runs the same image and answers the stub's port write with the same "
    "value through SYNC_REGS (`io-sync`) or through KVM_GET_REGS/SET_REGS (`io-regs`). The "
    "same guest built with -DTIMER=1 calls set_timer_op (a deadline 13 days on, answer 0) "
    "instead: the one-shot timer xend-lite keeps in C memory for its timer thread, which a "
    "guest kernel sets at every tick. Time per hypercall, median of the repeats.")

PORT = 0xE4
LOAD_GPA = 0x100000
VERSION = 4 << 16 | 16
WARM, TOTAL, BAD = 0x180000, 0x180004, 0x180008


def build_guest(ctx: Context, timer: bool = False) -> Path:
    if timer:
        return bench_guest(ctx, "hcloop", flat=True, variant="timer", defines={"TIMER": 1})
    return bench_guest(ctx, "hcloop", flat=True)


def c_host(exe: Path, image: Path, mode: str, n: int, warmup: int, answer: int = VERSION) -> float:
    return c_exitloop(exe, image, mode, n, warmup, port=PORT, extra=["-r", hex(answer)])


def py_xen(image: bytes, n: int, warmup: int, native: bool = True, timer: bool = False) -> float:
    """ns per hypercall through Machine + XenPlatform, served natively or in Python."""
    from xend_lite.kvm import Kvm
    from xend_lite.machine.loader import load_image
    from xend_lite.machine.machine import Machine
    from xend_lite.xen.platform import XenConfig, XenPlatform
    from xend_lite.xen.xenabi import X

    marks: dict[str, int] = {}
    with Kvm() as kvm:
        m = Machine(kvm, 16 << 20, 1)
        try:
            xen = XenPlatform(m, XenConfig(grant_frames=1, native_hypercalls=native))
            m.exits.register_io_out(0xF1, lambda _r, _e: marks.setdefault("t0", time.perf_counter_ns()))

            def stop(_r, _e) -> None:
                marks["t1"] = time.perf_counter_ns()
                m.request_shutdown("stopped", detail="benchmark done")
            m.exits.register_io_out(0xF2, stop)
            load_image(m, image, flat_gpa=LOAD_GPA)
            m.mem.write(WARM, struct.pack("<II", warmup, warmup + n))
            m.start()
            status = m.wait(600)
            if status is None or status.detail != "benchmark done":
                raise RuntimeError(f"guest stopped early: {status}")
            if struct.unpack("<I", m.mem.read(BAD, 4))[0]:
                raise RuntimeError("the guest saw a wrong xen_version result")
            if xen.internal_errors:
                raise RuntimeError("dispatch reported internal errors")
            call = X.__HYPERVISOR_set_timer_op if timer else X.__HYPERVISOR_xen_version
            if xen.hypercalls.count(call) < warmup + n:
                raise RuntimeError("the counters missed hypercalls")
            if timer and xen.timers.deadlines() != {0: 1 << 50}:
                raise RuntimeError("the guest's timer is not set")
        finally:
            m.close()
    return (marks["t1"] - marks["t0"]) / n


def run(ctx: Context) -> Section:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise Skip("/dev/kvm is missing or not accessible")
    exe = ctx.cc(HERE / "exitloop.c", "exitloop")
    flat, flat_timer = build_guest(ctx), build_guest(ctx, timer=True)
    image, image_timer = flat.read_bytes(), flat_timer.read_bytes()
    n_c, n_py = ctx.count(100_000, 400), ctx.count(30_000, 300)
    w_c, w_py = max(1, n_c // 10), max(1, n_py // 10)
    configs = {
        "c-sync": lambda: c_host(exe, flat, "io-sync", n_c, w_c),
        "c-regs": lambda: c_host(exe, flat, "io-regs", n_c, w_c),
        "xend-lite": lambda: py_xen(image, n_c, w_c),
        "xend-lite-python": lambda: py_xen(image, n_py, w_py, native=False),
        "c-sync-timer": lambda: c_host(exe, flat_timer, "io-sync", n_c, w_c, answer=0),
        "xend-lite-timer": lambda: py_xen(image_timer, n_c, w_c, timer=True),
        "xend-lite-timer-python": lambda: py_xen(image_timer, n_py, w_py, native=False, timer=True),
    }
    samples, v = interleaved(configs, ctx.repeats)
    figures = [
        Figure("xend-lite hypercall, native", v["xend-lite"], "ns",
               "C host, SYNC_REGS", v["c-sync"]),
        Figure("xend-lite hypercall, Python dispatch + handler", v["xend-lite-python"], "ns",
               "C host, SYNC_REGS", v["c-sync"]),
        Figure("xend-lite hypercall, native", v["xend-lite"], "ns",
               "C host, GET/SET_REGS", v["c-regs"]),
        Figure("C host, GET/SET_REGS", v["c-regs"], "ns", "C host, SYNC_REGS", v["c-sync"]),
        Figure("set_timer_op, native", v["xend-lite-timer"], "ns",
               "C host, SYNC_REGS, same guest", v["c-sync-timer"]),
        Figure("set_timer_op, Python dispatch + handler", v["xend-lite-timer-python"], "ns",
               "C host, SYNC_REGS, same guest", v["c-sync-timer"]),
        Figure("set_timer_op, native", v["xend-lite-timer"], "ns",
               "set_timer_op, Python dispatch + handler", v["xend-lite-timer-python"]),
    ]
    notes = [
        f"Counts: C and xend-lite native {n_c} hypercalls, xend-lite Python {n_py} per run "
        f"after a warm-up of a tenth as many; {ctx.repeats} interleaved run(s), median kept.",
        samples_note(samples, "ns/hypercall"),
        "Targets: native 1.05x the C SYNC_REGS host; the Python path 1.15x.",
    ]
    return Section(TITLE, SUMMARY, figures, notes)
