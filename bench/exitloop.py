"""One guest -> host -> guest I/O exit, through our Python bindings and machine layer,
against a C host (bench/exitloop.c) running the very same guest image in the same run."""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import time
from pathlib import Path

from bench._harness import HERE, Context, Figure, Section, Skip, bench_guest, interleaved, samples_note

TITLE = "exitloop: one I/O exit round trip (guest -> host -> guest)"
SUMMARY = (
    "The guest (bench/guests/outloop.S, a flat 32-bit image) writes EAX to port 0x510 in a "
    "tight loop. On each exit the host does nothing (`io`), or sets RAX = RAX + 1 through "
    "KVM_GET_REGS/KVM_SET_REGS (`io-regs`) or through the SYNC_REGS area of kvm_run "
    "(`io-sync`), as a hypercall handler would. The C host is bench/exitloop.c, compiled at "
    "bench time; the Python figures use xend_lite.kvm directly (a bare `Vcpu.run()` loop) and "
    "the machine layer's vCPU thread with a registered port handler. Time per exit, median "
    "of the repeats.")

PORT = 0x510
LOAD_GPA = 0x100000
MEM_BYTES = 16 << 20
TSS_ADDR = 0xFFFB_D000


def build_guest(ctx: Context) -> Path:
    return bench_guest(ctx, "outloop", flat=True)


def c_exitloop(exe: Path, image: Path, mode: str, n: int, warmup: int, port: int = PORT,
               extra: list[str] | None = None) -> float:
    """ns per exit from the C host."""
    cmd = [str(exe), "-m", mode, "-n", str(n), "-w", str(warmup), "-i", str(image),
           "-a", hex(LOAD_GPA), "-p", hex(port), *(extra or [])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"exitloop {mode}: {out.stderr.strip()}")
    m = re.search(r"ns_per_exit=([0-9.]+)", out.stdout)
    if not m:
        raise RuntimeError(f"exitloop {mode}: unexpected output {out.stdout!r}")
    return float(m.group(1))


def py_bare(image: bytes, mode: str, n: int, warmup: int) -> float:
    """ns per exit for a bare Vcpu.run() loop (no machine layer)."""
    from xend_lite.kvm import SYNC_REGS, Kvm, Regs, exits
    from xend_lite.machine.native import buffer_address
    from xend_lite.machine.loader import flat32_sregs

    mem = mmap.mmap(-1, MEM_BYTES, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    try:
        with Kvm() as kvm, kvm.create_vm() as vm:
            vm.set_tss_addr(TSS_ADDR)
            mem[LOAD_GPA:LOAD_GPA + len(image)] = image
            vm.set_user_memory_region(0, 0, MEM_BYTES, buffer_address(mem))
            v = vm.create_vcpu(0)
            try:
                v.set_sregs(flat32_sregs(v.get_sregs()))
                v.set_regs(Regs(rip=LOAD_GPA, rflags=2))
                run = v.run
                if mode == "io":
                    def loop(k: int) -> None:
                        for _ in range(k):
                            run()
                elif mode == "io-sync":
                    v.enable_sync_regs(SYNC_REGS)
                    rax, set_rax = v.synced_rax, v.set_rax

                    def loop(k: int) -> None:
                        for _ in range(k):
                            run()
                            set_rax(rax() + 1)
                elif mode == "io-regs":
                    get, put = v.get_regs, v.set_regs

                    def loop(k: int) -> None:
                        for _ in range(k):
                            run()
                            r = get()
                            r.rax += 1
                            put(r)
                else:
                    raise ValueError(mode)
                loop(warmup)
                t = time.perf_counter_ns()
                loop(n)
                dt = time.perf_counter_ns() - t
                last = run()
                if not (isinstance(last, exits.IoOut) and last.port == PORT):
                    raise RuntimeError(f"guest left the loop: {last!r}")
                seen = int.from_bytes(last.data, "little")
                if mode != "io" and seen != (warmup + n) & 0xFFFFFFFF:
                    raise RuntimeError(f"guest saw {seen} results, expected {warmup + n}")
            finally:
                v.close()
    finally:
        mem.close()
    return dt / n


def py_machine(image: bytes, kind: str, n: int, warmup: int) -> float:
    """ns per exit through Machine's vCPU thread and a registered port handler."""
    from xend_lite.kvm import Kvm
    from xend_lite.machine.loader import load_image
    from xend_lite.machine.machine import Machine

    total = warmup + n
    state = {"count": 0, "t0": 0, "t1": 0}
    with Kvm() as kvm:
        m = Machine(kvm, MEM_BYTES, 1)
        try:
            def tick(r) -> None:
                v = r.vcpu
                v.set_rax(v.synced_rax() + 1)
                c = state["count"] = state["count"] + 1
                if c == warmup:
                    state["t0"] = time.perf_counter_ns()
                elif c == total:
                    state["t1"] = time.perf_counter_ns()
                    m.request_shutdown("stopped", detail="benchmark done")

            if kind == "doorbell":
                m.exits.register_doorbell(PORT, tick)
            else:
                m.exits.register_io_out(PORT, lambda r, ex: tick(r))
            load_image(m, image, flat_gpa=LOAD_GPA)
            m.start()
            status = m.wait(600)
            if status is None or status.detail != "benchmark done":
                raise RuntimeError(f"guest stopped early: {status}")
        finally:
            m.close()
    return (state["t1"] - state["t0"]) / n


def run(ctx: Context) -> Section:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise Skip("/dev/kvm is missing or not accessible")
    exe = ctx.cc(HERE / "exitloop.c", "exitloop")
    flat = build_guest(ctx)
    image = flat.read_bytes()
    n_c, n_py = ctx.count(200_000, 400), ctx.count(50_000, 300)
    w_c, w_py = max(1, n_c // 10), max(1, n_py // 10)
    configs = {
        "c-io": lambda: c_exitloop(exe, flat, "io", n_c, w_c),
        "c-regs": lambda: c_exitloop(exe, flat, "io-regs", n_c, w_c),
        "c-sync": lambda: c_exitloop(exe, flat, "io-sync", n_c, w_c),
        "py-io": lambda: py_bare(image, "io", n_py, w_py),
        "py-regs": lambda: py_bare(image, "io-regs", n_py, w_py),
        "py-sync": lambda: py_bare(image, "io-sync", n_py, w_py),
        "m-io-out": lambda: py_machine(image, "io_out", n_py, w_py),
        "m-doorbell": lambda: py_machine(image, "doorbell", n_py, w_py),
    }
    samples, v = interleaved(configs, ctx.repeats)
    c_io, c_regs, c_sync = "C io (bare exit)", "C io-regs", "C io-sync"
    figures = [
        Figure("Python Vcpu.run(), no register work", v["py-io"], "ns", c_io, v["c-io"]),
        Figure("Python Vcpu.run() + GET/SET_REGS", v["py-regs"], "ns", c_regs, v["c-regs"]),
        Figure("Python Vcpu.run() + SYNC_REGS RAX", v["py-sync"], "ns", c_sync, v["c-sync"]),
        Figure("Machine vCPU thread, port handler (register_io_out)", v["m-io-out"], "ns", c_sync, v["c-sync"]),
        Figure("Machine vCPU thread, doorbell handler (register_doorbell)", v["m-doorbell"], "ns", c_sync,
               v["c-sync"]),
        Figure("C io-regs (GET/SET_REGS per exit)", v["c-regs"], "ns", c_sync, v["c-sync"]),
        Figure("C io-sync (SYNC_REGS per exit)", v["c-sync"], "ns", c_io, v["c-io"]),
    ]
    notes = [
        f"Counts: C {n_c} exits, Python {n_py} exits per run after a warm-up of a tenth as many; "
        f"{ctx.repeats} interleaved run(s) per figure, median kept.",
        samples_note(samples, "ns/exit"),
        "The Python io-sync and Machine figures check that the guest saw every RAX result.",
        "The C host also runs any flat image: `exitloop -m io-sync -n N -i IMAGE -a LOAD_GPA "
        "[-e ENTRY] [-p PORT] [-r RAX]` (e.g. a hypercall loop, answering with a fixed RAX).",
    ]
    return Section(TITLE, SUMMARY, figures, notes)
