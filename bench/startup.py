"""Daemon start-up and footprint beside QEMU's in the same run: spawn to a control socket
that is ready and that answers, spawn to the guest's first console output, and the resident
memory of an idle VM with the guest's RAM counted apart."""

from __future__ import annotations

import compileall
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench._harness import Context, Figure, Section, median
from bench._qemu import SERIAL_MARKER, Qemu, Qmp, qemu_binary
from bench._xl import Daemon, Rpc, proc_status, require_kvm

TITLE = "startup: spawn to ready, to first guest output, and idle RSS, against QEMU"
SUMMARY = (
    "xend-lite runs its embedded default guest (no --image); QEMU (`-accel kvm -nodefaults`) "
    "boots a boot sector through SeaBIOS that writes `<Q>` to COM1 and spins; both with 128 MiB "
    "unless a figure says otherwise. Ready: READY=1 on a NOTIFY_SOCKET we bind (xend-lite) and "
    "the QMP greeting (QEMU). Answers: a client polling from the spawn on until query-status "
    "is answered (QMP: greeting, qmp_capabilities, query-status). First guest output: the "
    "first byte in --console-log (xend-lite) or the marker in the `-serial file:` log (QEMU), "
    "polled every 0.5 ms. RSS from /proc/PID/status after 0.5 s idle; \"without guest RAM\" "
    "subtracts RssShmem, which holds the guest RAM for both (xend-lite's RAM is a memfd; QEMU "
    "is given `memory-backend-memfd` for that figure). A second baseline boots the very ELF "
    "xend-lite embeds (xend_lite/guests/default.elf, PVH note) on QEMU's microvm machine "
    "(`-M microvm -kernel`, qboot, no SeaBIOS), its first console byte on port 0xe9 "
    "(isa-debugcon); without Xen leaves that guest idles after its first lines. The stack floor "
    "is a fresh interpreter of the same venv that only imports asyncio, aiohttp.web and "
    "jsonrpcserver, the libraries the control plane is built on: spawn to the end of those "
    "imports, and its VmRSS then; \"without ssl\" imports them as the daemon does, ssl hidden "
    "(the daemon never uses TLS). Times are medians; below 1 favours xend-lite.")

POLL = 0.0005
OWN_TARGET_MS = 20.0     # the daemon's own part of start-up: READY=1 minus the stack floor without ssl
RSS_TARGET_MIB = 5.0     # idle RSS without guest RAM, over the stack floor without ssl


def _poll_answer(connect, timeout: float = 60.0) -> float:
    """perf_counter when the first query-status is answered (connecting as soon as possible)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            c = connect()
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise TimeoutError("the control socket never answered") from None
            time.sleep(POLL)
    try:
        c.call("query-status")
        return time.perf_counter()
    finally:
        c.close()


def _watch_file(path: str, done: dict, marker: bytes | None, timeout: float = 60.0) -> threading.Thread:
    """A thread that stores in done['t'] the time ``path`` first holds output (or ``marker``)."""
    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done.get("stop"):
            try:
                if marker is None:
                    if os.stat(path).st_size > 0:
                        done["t"] = time.perf_counter()
                        return
                else:
                    with open(path, "rb") as f:
                        if marker in f.read():
                            done["t"] = time.perf_counter()
                            return
            except FileNotFoundError:
                pass
            time.sleep(POLL)
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    return th


def _rss(pid: int) -> dict[str, float]:
    st = proc_status(pid)
    return {"rss": st["VmRSS"] / 1024, "rss_nonguest": (st["VmRSS"] - st.get("RssShmem", 0)) / 1024}


def xend_lite_once(memory_mib: int = 128) -> dict[str, float]:
    d = Daemon("--memory", str(memory_mib), console_log=True)
    try:
        console: dict = {}
        watcher = _watch_file(d.console, console, None)
        ready: dict = {}

        def wait_ready() -> None:
            try:
                ready["s"] = d.wait_ready()
            except Exception as exc:  # noqa: BLE001 - reported below
                ready["error"] = exc
        rt = threading.Thread(target=wait_ready, daemon=True)
        rt.start()
        t_answer = _poll_answer(lambda: Rpc(d.socket, timeout=60))
        rt.join(60)
        if "error" in ready:
            raise ready["error"]
        watcher.join(10)
        console["stop"] = True
        if "t" not in console:
            raise RuntimeError("the default guest printed nothing on its console")
        time.sleep(0.5)
        return {"ready": ready["s"], "answer": t_answer - d.t_spawn, "console": console["t"] - d.t_spawn,
                **_rss(d.pid)}
    finally:
        d.close()


def qemu_once(ctx: Context, memory_mib: int = 128, memfd: bool = False,
              kernel: str | None = None) -> dict[str, float]:
    q = Qemu(ctx.workdir, memory_mib, serial=True, memfd=memfd, kernel=kernel)
    try:
        console: dict = {}
        watcher = _watch_file(q.serial, console, None if kernel else SERIAL_MARKER)
        greeted: dict = {}

        def connect() -> Qmp:
            c = Qmp(q.qmp_path, timeout=60, handshake=False)
            greeted.setdefault("t", time.perf_counter())
            c.call("qmp_capabilities")
            return c
        t_answer = _poll_answer(connect)
        watcher.join(30)
        console["stop"] = True
        if "t" not in console:
            raise RuntimeError(f"the QEMU guest never wrote its marker: {q.stderr_text()}")
        time.sleep(0.5)
        return {"ready": greeted["t"] - q.t_spawn, "answer": t_answer - q.t_spawn,
                "console": console["t"] - q.t_spawn, **_rss(q.pid)}
    finally:
        q.close()


def run(ctx: Context) -> Section:
    require_kvm()
    qemu_binary()
    big = 4096 if _fits(4096) else None
    from xend_lite.guests import default_image

    elf = ctx.workdir / "default-guest.elf"  # the embedded guest, for QEMU's -kernel
    elf.write_bytes(default_image())
    _compile_bytecode()
    vmfloor = ctx.cc(Path(__file__).parent / "vmfloor.c", "vmfloor")
    xend_lite_once()  # warm-up launches (page cache), not counted
    qemu_once(ctx, kernel=str(elf))
    xs, qs, qm, qv, xb, qb = [], [], [], [], [], []
    imports: list[float] = []
    floor: list[dict[str, float]] = []
    floor_nossl: list[dict[str, float]] = []
    floor_nogc: list[dict[str, float]] = []
    vm_floor: list[dict[str, float]] = []
    for _ in range(ctx.repeats):  # interleaved, so drift hits both alike
        vm_floor.append(_vm_floor(vmfloor))
        imports.append(_import_time())
        floor.append(_stack_floor())
        floor_nossl.append(_stack_floor(without_ssl=True))
        floor_nogc.append(_stack_floor(without_ssl=True, without_gc=True))
        xs.append(xend_lite_once())
        qs.append(qemu_once(ctx))
        qm.append(qemu_once(ctx, memfd=True))
        qv.append(qemu_once(ctx, kernel=str(elf)))
        if big and not ctx.smoke:
            xb.append(xend_lite_once(big))
            qb.append(qemu_once(ctx, big))

    def m(rows: list[dict], key: str, scale: float = 1.0) -> float:
        return median([r[key] for r in rows]) * scale

    q = "QEMU"
    figures = [
        Figure("spawn to control socket ready (READY=1 / QMP greeting)", m(xs, "ready", 1e3), "ms",
               q, m(qs, "ready", 1e3)),
        Figure("spawn to first query-status answered", m(xs, "answer", 1e3), "ms", q, m(qs, "answer", 1e3)),
        Figure("spawn to the guest's first console output", m(xs, "console", 1e3), "ms",
               q, m(qs, "console", 1e3)),
    ]
    if qv:
        mv = "QEMU microvm, same guest ELF"
        figures += [
            Figure("spawn to control socket ready (READY=1 / QMP greeting)", m(xs, "ready", 1e3), "ms",
                   mv, m(qv, "ready", 1e3)),
            Figure("spawn to first query-status answered", m(xs, "answer", 1e3), "ms",
                   mv, m(qv, "answer", 1e3)),
            Figure("spawn to the guest's first console output", m(xs, "console", 1e3), "ms",
                   mv, m(qv, "console", 1e3)),
            Figure("idle RSS, whole process", m(xs, "rss"), "MiB", mv, m(qv, "rss")),
        ]
    figures += [
        Figure("idle RSS, whole process", m(xs, "rss"), "MiB", q, m(qs, "rss")),
        Figure("idle RSS without guest RAM (VmRSS - RssShmem)", m(xs, "rss_nonguest"), "MiB",
               "QEMU, memfd guest RAM", m(qm, "rss_nonguest")),
    ]
    sf, sn = "the stack floor", "the stack floor without ssl"
    figures += [
        Figure("stack floor (its imports only): spawn to imports done",
               m(floor, "time", 1e3), "ms", "QEMU (QMP greeting)", m(qs, "ready", 1e3)),
        Figure("stack floor (its imports only): RSS", m(floor, "rss"), "MiB", q, m(qs, "rss")),
        Figure("stack floor without ssl: spawn to imports done", m(floor_nossl, "time", 1e3), "ms",
               "QEMU (QMP greeting)", m(qs, "ready", 1e3)),
        Figure("stack floor without ssl: RSS", m(floor_nossl, "rss"), "MiB", q, m(qs, "rss")),
        Figure("spawn to control socket ready (READY=1)", m(xs, "ready", 1e3), "ms", sf,
               m(floor, "time", 1e3)),
        Figure("spawn to first query-status answered", m(xs, "answer", 1e3), "ms", sf,
               m(floor, "time", 1e3)),
        Figure("idle RSS, whole process", m(xs, "rss"), "MiB", sf, m(floor, "rss")),
        Figure("spawn to first query-status answered", m(xs, "answer", 1e3), "ms", sn,
               m(floor_nossl, "time", 1e3)),
        Figure("idle RSS, whole process", m(xs, "rss"), "MiB", sn, m(floor_nossl, "rss")),
    ]
    own = [x["ready"] - f["time"] for x, f in zip(xs, floor_nossl)]
    own_nogc = [x["ready"] - f["time"] for x, f in zip(xs, floor_nogc)]
    own_answer = [x["answer"] - f["time"] for x, f in zip(xs, floor_nossl)]
    over = [x["rss_nonguest"] - f["rss"] for x, f in zip(xs, floor_nossl)]
    own_ms, over_mib = median(own) * 1e3, median(over)
    vmf = {k: median([r[k] for r in vm_floor]) * 1e3 for k in vm_floor[0]}
    figures += [
        Figure("own start-up: READY=1 minus the floor without ssl", own_ms, "ms",
               "target", OWN_TARGET_MS),
        Figure("own start-up: query-status answered minus that floor",
               median(own_answer) * 1e3, "ms", "target", OWN_TARGET_MS),
        Figure("own idle RSS: without guest RAM minus that floor's", over_mib, "MiB",
               "target", RSS_TARGET_MIB),
        Figure("stack floor without ssl, collector off: spawn to imports done",
               m(floor_nogc, "time", 1e3), "ms", "the stack floor without ssl",
               m(floor_nossl, "time", 1e3)),
        Figure("own start-up: READY=1 minus the floor without ssl, collector off",
               median(own_nogc) * 1e3, "ms", "target", OWN_TARGET_MS),
        Figure("VM build in C (bench/vmfloor.c), /dev/kvm to vCPU 0", vmf["total"], "ms",
               "own start-up (READY=1)", own_ms),
    ]
    if xb:
        figures += [
            Figure(f"spawn to control socket ready, {big} MiB guest", m(xb, "ready", 1e3), "ms",
                   f"QEMU, {big} MiB", m(qb, "ready", 1e3)),
            Figure(f"spawn to first query-status answered, {big} MiB guest", m(xb, "answer", 1e3), "ms",
                   f"QEMU, {big} MiB", m(qb, "answer", 1e3)),
            Figure(f"idle RSS, whole process, {big} MiB guest", m(xb, "rss"), "MiB",
                   f"QEMU, {big} MiB", m(qb, "rss")),
        ]
    notes = [
        f"{ctx.repeats} interleaved launch(es) of each; median kept.",
        "Targets: start-up within 3x QEMU's; RSS no more than QEMU's.",
        (f"Own part (what xend-lite adds to the libraries it is built on; each launch paired with "
         f"the floor launch just before it, median of the differences): spawn to READY=1 "
         f"{own_ms:.1f} ms over the stack floor without ssl, target <= {OWN_TARGET_MS:.0f} ms: "
         f"{'met' if own_ms <= OWN_TARGET_MS else 'not met'}; idle RSS without guest RAM "
         f"{over_mib:.1f} MiB over that floor's, target <= {RSS_TARGET_MIB:.0f} MiB: "
         f"{'met' if over_mib <= RSS_TARGET_MIB else 'not met'}. Below 1x the target favours "
         "xend-lite. Per launch (ms): " + ", ".join(f"{v * 1e3:.1f}" for v in own) + "."),
        ("The xend-lite command imports the stack with the garbage collector off (from its first "
         "line to READY=1, cli/daemon.py), which the floor does not: part of the own part's "
         "distance to the floor is the collector's work on the stack's imports. Like for like, "
         "against the same imports with the collector off (spawn to imports done "
         f"{m(floor_nogc, 'time', 1e3):.0f} ms, against {m(floor_nossl, 'time', 1e3):.0f} ms "
         f"with it on), the own part is {median(own_nogc) * 1e3:.1f} ms; per launch (ms): "
         + ", ".join(f"{v * 1e3:.1f}" for v in own_nogc) + "."),
        ("Of that own part the kernel takes its share whatever the language: building the same "
         "VM in C (bench/vmfloor.c, 128 MiB) takes " + ", ".join(
             f"{k.replace('_', ' ')} {v:.2f}" for k, v in vmf.items() if k != "total")
         + f" ms, {vmf['total']:.1f} ms in all; xend-lite overlaps it with loading its "
         "modules (daemon/early.py)."),
        ("xend-lite's ready point comes after the VM is built and booted (the guest is already "
        "running when READY=1 is sent); QEMU greets on QMP before SeaBIOS has run."),
        (f"Of xend-lite's start, the interpreter and its imports alone (`python -c 'import "
        f"{'; import '.join(IMPORTS)}'`) take {median(imports) * 1e3:.0f} ms to exit; the stack "
        f"floor alone (`python -c 'import {', '.join(STACK)}'`) takes {m(floor, 'time', 1e3):.0f} ms "
        f"to its imports done and {m(floor, 'rss'):.1f} MiB ({m(floor_nossl, 'time', 1e3):.0f} ms and "
        f"{m(floor_nossl, 'rss'):.1f} MiB without ssl, as the daemon imports it), against a "
        f"3x-QEMU start-up target of {3 * m(qs, 'ready', 1e3):.0f} ms and an RSS target of "
        f"{m(qs, 'rss'):.1f} MiB: those libraries cost that much before any code of xend-lite runs."),
        ("xend-lite's bytecode is compiled before the launches, as an installed package has it "
         "(with PYTHONDONTWRITEBYTECODE set, every launch would otherwise compile its sources)."),
        "Per-launch values (ms; MiB): " + "; ".join(
            f"{name} " + ", ".join(f"{k}={v * (1e3 if k in ('ready', 'answer', 'console') else 1):.1f}"
                                   for k, v in r.items())
            for name, rows in (("xend-lite", xs), ("qemu", qs), ("qemu-memfd", qm), ("qemu-microvm", qv),
                               (f"xend-lite-{big}", xb),
                               (f"qemu-{big}", qb)) for r in rows),
    ]
    return Section(TITLE, SUMMARY, figures, notes)


IMPORTS = ("xend_lite.cli.daemon", "xend_lite.daemon.main", "xend_lite.daemon.service",
           "xend_lite.daemon.server", "xend_lite.vmm.domain", "xend_lite.xen.platform")
STACK = ("asyncio", "aiohttp.web", "jsonrpcserver")


def _import_time() -> float:
    """Seconds for a fresh interpreter to import what the daemon imports, and exit."""
    argv = [sys.executable, "-c", "; ".join(f"import {m}" for m in IMPORTS)]
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def _stack_floor(without_ssl: bool = False, without_gc: bool = False) -> dict[str, float]:
    """A fresh interpreter that only imports the fixed stack: seconds from spawn to the end of
    its imports, and its VmRSS (MiB) then. ``without_ssl``: as the daemon imports it, ssl
    hidden (asyncio and aiohttp then set up no TLS, and aiohttp's client loads no CA store).
    ``without_gc``: with the garbage collector off, as the xend-lite command imports it."""
    hide = "import sys\nsys.modules['ssl'] = None\n" if without_ssl else ""
    if without_gc:
        hide = "import gc\ngc.disable()\n" + hide
    code = (f"import time\n{hide}import {', '.join(STACK)}\nt = time.perf_counter()\n"
            "rss = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmRSS:'))\n"
            "print(repr(t), rss)")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    return {"time": float(out[-2]) - t, "rss": int(out[-1]) / 1024}


def _vm_floor(exe: Path) -> dict[str, float]:
    """One run of bench/vmfloor.c: seconds per step of building a VM like xend-lite's."""
    out = subprocess.run([str(exe), "128"], check=True, capture_output=True, text=True).stdout
    return {k: int(v) / 1e9 for k, v in (item.split("=") for item in out.split())}


def _compile_bytecode() -> None:
    """Write xend-lite's bytecode caches, which an installed package has and an editable
    install gets at its first run (unless PYTHONDONTWRITEBYTECODE is set, as it may be here)."""
    import xend_lite

    for path in xend_lite.__path__:
        compileall.compile_dir(path, quiet=1)


def _fits(mib: int) -> bool:
    """Enough free host memory to boot a guest this large twice over (it stays untouched)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024 > 2 * mib
    except OSError:
        pass
    return False
