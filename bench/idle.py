"""Host CPU time of an idle guest's VMM: xend-lite with its embedded default guest (between
its heartbeats) beside QEMU with a guest halted with interrupts on, over the same period."""

from __future__ import annotations

import os
import shutil
import time

from bench._harness import Context, Figure, Section, Skip, interleaved, samples_note
from bench._qemu import SERIAL_MARKER, Qemu
from bench._xl import Daemon, require_kvm

TITLE = "idle: host CPU time of a VMM whose guest is idle"
SUMMARY = (
    "xend-lite runs its embedded default guest (it halts between heartbeats); QEMU "
    "(`-accel kvm`, SeaBIOS) runs a boot sector that halts with interrupts on (`sti; hlt` "
    "in a loop, woken by the BIOS timer) once its BIOS is done. After start-up settles, each process's CPU time "
    "(user + system, every thread, from /proc/PID/task/*/schedstat) is read over the same "
    "period, one process at a time, alternating. The figure is CPU time per second of "
    "wall time; below 1 favours xend-lite. Target: no more than QEMU's.")

SETTLE = 1.0


def cpu_ns(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass      # a thread that ended meanwhile
    return total


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def over(pid: int, seconds: float) -> float:
    """CPU ns per wall second over ``seconds``."""
    a, t = cpu_ns(pid), time.perf_counter()
    time.sleep(seconds)
    return (cpu_ns(pid) - a) / (time.perf_counter() - t)


def xend_lite_idle(seconds: float) -> float:
    with Daemon() as d:
        d.wait_ready()
        time.sleep(SETTLE)
        return over(d.pid, seconds)


def qemu_idle(ctx: Context, seconds: float) -> float:
    with Qemu(ctx.workdir, 128, idle=True, serial=True) as q:
        q.wait_qmp().close()
        deadline = time.monotonic() + 120
        while SERIAL_MARKER not in _read(q.serial):     # past the BIOS: the guest is idle
            if time.monotonic() > deadline:
                raise TimeoutError("QEMU's idle guest never reached its halt loop")
            time.sleep(0.01)
        time.sleep(SETTLE)
        return over(q.pid, seconds)


def run(ctx: Context) -> Section:
    require_kvm()
    if shutil.which("qemu-system-x86_64") is None:
        raise Skip("qemu-system-x86_64 is not installed: no same-run baseline")
    seconds = 2.0 if ctx.smoke else 20.0
    repeats = 1 if ctx.smoke else ctx.repeats
    samples, med = interleaved({"xend-lite": lambda: xend_lite_idle(seconds),
                                "qemu": lambda: qemu_idle(ctx, seconds)}, repeats)
    xl, qe = med["xend-lite"], med["qemu"]
    figures = [Figure("CPU time per second, idle guest", xl / 1e6, "ms/s",
                      "QEMU, idle guest", qe / 1e6)]
    notes = [f"{seconds:.0f} s per process after {SETTLE:.0f} s to settle; {repeats} interleaved "
             "run(s), median kept.",
             samples_note({k: [v / 1e3 for v in vs] for k, vs in samples.items()}, "us CPU per s"),
             f"Target: no more than QEMU's ({'met' if xl <= qe else 'NOT met'})."]
    return Section(TITLE, SUMMARY, figures, notes)
