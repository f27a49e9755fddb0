"""Snapshot save and restore beside QEMU's migrate-to-file in the same run, for guests of
several sizes, mostly untouched (sparse) and with 256 MiB of random data (dense), with the
same guest bytes written by a plain C writer (bench/savefloor.c) as the save's floor."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench._harness import Context, Figure, Section, Skip, median
from bench._qemu import SERIAL_MARKER, Qemu, qemu_binary
from bench._xl import Daemon, RpcError, memfd_of, require_kvm, spin_image, write_random

TITLE = "snapshot: save and restore against QEMU migrate-to-file"
SUMMARY = (
    "Each guest spins (xend-lite: bench/guests/spin.S; QEMU: a `jmp $` boot sector). QEMU has "
    "its default RAM except for a dense save, where it has `memory-backend-memfd` RAM so the "
    "host can write into it; a restore has the RAM kind its save had (QEMU's stream names its RAM block). Dense guests get random bytes "
    "written by the host into their RAM memfd through /proc/PID/fd (256 MiB from 4 MiB on, less "
    "in a guest too small to hold it). Save: xend-lite `snapshot-save` over RPC (pause, write, "
    "fsync, rename, resume); QEMU `stop`, `migrate exec:cat > FILE` (max-bandwidth lifted), "
    "query-migrate polled every ms until completed, then fsync of the file. Restore in a "
    "running daemon: `snapshot-load` over RPC until it answers with the guest running again, "
    "with its default check of guest memory against the chunk checksums and with "
    "`verify: false`. "
    "Pre-started, against QEMU started with `-incoming defer` and waiting at its QMP socket: "
    "`migrate-incoming exec:cat FILE` until query-status says running. "
    "Fresh process: `xend-lite --restore FILE` to READY=1 (guest running) against QEMU "
    "`-incoming \"exec:cat FILE\"` to query-status running after `cont`. The floor: "
    "bench/savefloor.c reads the same guest RAM memfd (holes skipped with SEEK_DATA), writes "
    "its non-zero pages at their offsets into the same directory with the writer's writeback "
    "pattern (sync_file_range every 8 MiB), fsyncs, renames and fsyncs the directory. "
    "Dense saves are judged in back-to-back pairs with the floor (save then floor, floor then "
    "save, alternating; both earlier files removed and the disk synced before each step), and "
    "the figure is the median of the per-pair ratios, since the floor alone swings several-fold "
    "between minutes on a shared disk and VM. Files are on the disk holding bench/out, page cache warm "
    "for restores. Times are medians; below 1 favours xend-lite, for throughput above 1.")

MIB = 1 << 20
DENSE_AT = 4 * MIB
DENSE_BYTES = 256 * MIB
#: ``BENCH_SNAPSHOT=dense`` runs only the 1024 MiB dense guest and leaves QEMU out: a quick
#: look at save against the floor while working on the writer.
QUICK = os.environ.get("BENCH_SNAPSHOT") == "dense"


def dense_bytes(size_mib: int) -> int:
    return min(DENSE_BYTES, size_mib * MIB - 2 * DENSE_AT)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _settle(*paths: str) -> None:
    """Remove earlier files and flush the disk, so each timed step starts alike (the blocks
    and page cache an earlier file held are freed before, not during, the next one)."""
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)
    os.sync()


def c_floor(floor: Path, src: str, dst: str) -> float:
    """Seconds the C floor writer takes to write the guest RAM at ``src`` to ``dst``, by its
    own clock (no process start); the file is removed after."""
    out = subprocess.run([str(floor), src, dst], capture_output=True, text=True, check=True)
    os.unlink(dst)
    return int(out.stdout.split()[0]) / 1e9


def save_floor_pairs(c, path: str, floor_path: str, pairs: int, floor: Path,
                     ram: str) -> list[tuple[float, float, int]]:
    """``pairs`` snapshot-saves, each beside the C floor writing the same guest RAM (``ram``)
    on the same file system, back to back, the order alternating (save first, floor first,
    ...). Returns (save seconds, floor seconds, bytes) per pair; a snapshot is left at
    ``path``."""
    out = []
    nbytes = 0
    for i in range(pairs):
        times = {}
        for step in (("save", "floor") if i % 2 == 0 else ("floor", "save")):
            # Both files go before either step, so neither runs while an earlier file's blocks
            # and page cache are freed, and both start from the same free memory. (In a VM
            # whose balloon hands free memory back to its host, the first write into such
            # memory costs several times more; that still hits a step now and then, in
            # either role, which the median of many pairs absorbs.)
            _settle(floor_path, path)
            if step == "save":
                t = time.perf_counter()
                c.call("snapshot-save", {"path": os.path.basename(path)})
                times[step] = time.perf_counter() - t
                nbytes = allocated(path)
            else:
                times[step] = c_floor(floor, ram, floor_path)
        out.append((times["save"], times["floor"], nbytes))
    if pairs % 2:   # the last step was the floor: leave a snapshot for the restores
        _settle(floor_path, path)
        c.call("snapshot-save", {"path": os.path.basename(path)})
    return out


def xend_lite_round(spin: Path, size_mib: int, dense: bool, path: str, loads: int,
                    floor_path: str = "", pairs: int = 0,
                    floor: Path | None = None) -> tuple[dict[str, float], list]:
    """One daemon: save (dense: ``pairs`` saves, each paired with the floor), restore in it
    ``loads`` times with and without verify, then restore in a fresh process."""
    # snapshots are names in the daemon's snapshot directory: the one ``path`` lies in
    args = ("--image", str(spin), "--memory", str(size_mib), "--snapshot-dir", os.path.dirname(path))
    name = os.path.basename(path)
    res: dict[str, float] = {}
    paired: list[tuple[float, float, int]] = []
    with Daemon(*args) as d:
        d.wait_ready()
        if dense:
            write_random(memfd_of(d.pid, "xend-lite:ram"), DENSE_AT, dense_bytes(size_mib))
        with d.rpc() as c:
            if pairs:
                # the bytes the floor writes come from the save before it, so the first pair
                # saves first
                assert floor is not None
                paired = save_floor_pairs(c, path, floor_path, pairs, floor,
                                          memfd_of(d.pid, "xend-lite:ram"))
                res["save"] = median([p[0] for p in paired])
            else:
                t = time.perf_counter()
                c.call("snapshot-save", {"path": name})
                res["save"] = time.perf_counter() - t
            res["bytes"] = allocated(path)
            res["apparent"] = os.path.getsize(path)
            for key, params in (("load_live", {"path": name}),
                                ("load_live_noverify", {"path": name, "verify": False})):
                times = []
                for _ in range(loads):
                    t = time.perf_counter()
                    try:
                        c.call("snapshot-load", params)
                    except RpcError:
                        if "verify" in params:  # a daemon without the option
                            break
                        raise
                    times.append(time.perf_counter() - t)
                    st = c.call("query-status")
                    if st["status"] != "running":
                        raise RuntimeError(f"after snapshot-load the guest is {st['status']}")
                if times:
                    res[key] = median(times)
    with Daemon(*args, "--restore", path) as d:
        res["load_fresh"] = d.wait_ready()
        with d.rpc() as c:
            st = c.call("query-status")
            if st["status"] != "running":
                raise RuntimeError(f"after --restore the guest is {st['status']}")
    return res, paired


def _poll(fn, done, timeout: float = 600.0, every: float = 0.001):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if done(v):
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"still {v!r}")
        time.sleep(every)


def qemu_until_running(c) -> None:
    """Wait out QEMU's incoming migration; ``cont`` if it ends paused, until it runs."""
    st = _poll(lambda: c.call("query-status")["status"], lambda s: s not in ("inmigrate",))
    if st != "running":
        c.call("cont")
        _poll(lambda: c.call("query-status")["status"], lambda s: s == "running")


def qemu_deferred_load(ctx: Context, size_mib: int, path: str,
                       memfd: bool = False) -> dict[str, float]:
    """QEMU started with ``-incoming defer``, then ``migrate-incoming`` of ``path``: seconds
    from the request to running (``load``) and from spawn to running (``fresh``)."""
    with Qemu(ctx.workdir, size_mib, memfd=memfd, serial=True, incoming="defer") as q:
        c = q.wait_qmp()
        t = time.perf_counter()
        c.call("migrate-incoming", {"uri": f"exec:cat {path}"})
        qemu_until_running(c)
        done = time.perf_counter()
        c.close()
        return {"load": done - t, "fresh": done - q.t_spawn}


def qemu_round(ctx: Context, size_mib: int, dense: bool, path: str) -> dict[str, float]:
    res: dict[str, float] = {"save": qemu_save(ctx, size_mib, dense, path)}
    res["bytes"] = allocated(path)
    res["load_live"] = qemu_deferred_load(ctx, size_mib, path, memfd=dense)["load"]
    with Qemu(ctx.workdir, size_mib, memfd=dense, serial=True, incoming=f"exec:cat {path}") as q:
        c = q.wait_qmp()
        qemu_until_running(c)
        res["load_fresh"] = time.perf_counter() - q.t_spawn
        c.close()
    return res


def qemu_save(ctx: Context, size_mib: int, dense: bool, path: str) -> float:
    """QEMU's spinning guest migrated to ``path`` (stop, migrate, fsync); seconds taken.
    memfd RAM only where the host must write into it."""
    with Qemu(ctx.workdir, size_mib, memfd=dense, serial=True) as q:
        c = q.wait_qmp()
        c.call("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        # Past SeaBIOS (which uses RAM all over while it runs) and spinning: its marker.
        _poll(lambda: SERIAL_MARKER in Path(q.serial).read_bytes(), bool, timeout=60, every=0.01)
        if dense:
            write_random(memfd_of(q.pid, "memory-backend"), DENSE_AT, dense_bytes(size_mib))
        t = time.perf_counter()
        c.call("stop")
        c.call("migrate", {"uri": f"exec:cat > {path}"})
        st = _poll(lambda: c.call("query-migrate").get("status"), lambda s: s in ("completed", "failed"))
        if st != "completed":
            raise RuntimeError(f"QEMU migration to file {st}")
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        took = time.perf_counter() - t
        c.close()
    return took


def run(ctx: Context) -> Section:
    require_kvm()
    qemu_binary()
    spin = spin_image(ctx)
    floor = ctx.cc(Path(__file__).parent / "savefloor.c", "savefloor")
    sizes = [256] if ctx.smoke else [1024] if QUICK else [256, 1024, 4096]
    variants = [False] if ctx.smoke else [True] if QUICK else [False, True]
    loads = ctx.count(5, 2)
    pairs = ctx.count(4, 2)
    snapdir = ctx.workdir / "snapshots"
    snapdir.mkdir(exist_ok=True)
    xl_path, q_path, dd_path = (str(snapdir / n) for n in ("xend-lite.snap", "qemu.mig", "seq.bin"))
    figures: list[Figure] = []
    notes: list[str] = []
    skipped: list[str] = []
    raw: list[str] = []
    try:
        for size in sizes:
            for dense in variants:
                label = f"{size} MiB {'dense' if dense else 'sparse'}"
                need = (2 * (dense_bytes(size) if dense else 64 * MIB) + size * MIB + 512 * MIB)
                free = shutil.disk_usage(snapdir).free
                if free < need:
                    skipped.append(f"{label}: {free // MIB} MiB free, {need // MIB} MiB needed")
                    continue
                if not _ram_fits(size):
                    skipped.append(f"{label}: not enough free host RAM for two {size} MiB guests")
                    continue
                xs, qs, paired = [], [], []
                for _ in range(ctx.repeats):
                    r, p = xend_lite_round(spin, size, dense, xl_path, loads, dd_path,
                                           pairs if dense else 0, floor)
                    xs.append(r)
                    paired += p
                    if not QUICK:
                        qs.append(qemu_round(ctx, size, dense, q_path))
                    for p in (xl_path, q_path):
                        if os.path.exists(p):
                            os.unlink(p)
                X = {k: median([r[k] for r in xs]) for k in xs[0]}
                Q = {k: median([r[k] for r in qs]) for k in qs[0]} if qs else {}
                qm = "QEMU migrate to file"

                def q(key: str, scale: float, Q=Q) -> float | None:
                    return Q[key] * scale if key in Q else None
                figures += [
                    Figure(f"{label}: save", X["save"] * 1e3, "ms", qm, q("save", 1e3)),
                    Figure(f"{label}: snapshot size on disk", X["bytes"] / MIB, "MiB", qm, q("bytes", 1 / MIB)),
                    Figure(f"{label}: restore in the running daemon (snapshot-load)", X["load_live"] * 1e3,
                           "ms", "QEMU -incoming defer + migrate-incoming", q("load_live", 1e3)),
                ]
                if "load_live_noverify" in X:
                    figures.append(Figure(f"{label}: restore in the running daemon, verify=false",
                                          X["load_live_noverify"] * 1e3, "ms",
                                          "QEMU -incoming defer + migrate-incoming", q("load_live", 1e3)))
                figures += [
                    Figure(f"{label}: restore in a fresh process (--restore to READY=1)",
                           X["load_fresh"] * 1e3, "ms", "QEMU -incoming, fresh process",
                           q("load_fresh", 1e3)),
                ]
                if paired:
                    saves = [b / s / MIB for s, _, b in paired]
                    floors = [b / f / MIB for _, f, b in paired]
                    ratios = sorted(f / s for s, f, _ in paired)
                    figures += [
                        Figure(f"{label}: save throughput", median(saves), "MiB/s",
                               "C floor writer (savefloor.c)", median(floors)),
                        Figure(f"{label}: save throughput vs the floor, median of {len(ratios)} pairs",
                               median(ratios), "x", "the same pair's C floor writer", 1.0),
                    ]
                    notes.append(f"{label}: save/floor ratio per pair, sorted: "
                                 + " ".join(f"{x:.2f}" for x in ratios)
                                 + f" (median {median(ratios):.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f});"
                                 " save/floor MiB/s in run order: "
                                 + " ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(saves, floors)))
                raw.append(f"{label}: xend-lite " + "; ".join(
                    ", ".join(f"{k}={v * 1e3:.1f}ms" if k not in ("bytes", "apparent") else f"{k}={v / MIB:.1f}MiB"
                              for k, v in r.items()) for r in xs)
                    + (" | qemu " + "; ".join(
                    ", ".join(f"{k}={v * 1e3:.1f}ms" if k != "bytes" else f"{k}={v / MIB:.1f}MiB"
                              for k, v in r.items()) for r in qs) if qs else ""))
    finally:
        for p in (xl_path, q_path, dd_path):
            if os.path.exists(p):
                os.unlink(p)
        shutil.rmtree(snapdir, ignore_errors=True)
    if not figures:
        raise Skip("no guest size fits: " + "; ".join(skipped))
    notes += [
        (f"{ctx.repeats} interleaved round(s) per size; restore in the running daemon is the median "
        f"of {loads} loads per round; dense saves: {pairs} save/floor pairs per round, the save "
        f"figure is their median. Dense: {DENSE_BYTES // MIB} MiB of random bytes at "
        f"{DENSE_AT // MIB} MiB (a 256 MiB guest holds {dense_bytes(256) // MIB} MiB)."),
        ("Targets: dense save >= 0.9x the C floor writer; sparse save faster than QEMU; restore "
        "flat across sizes, faster than QEMU at every size, < 10 ms in a running daemon."),
        ("xend-lite maps the snapshot's RAM copy-on-write (pages are read when the guest touches "
        "them), after reading the data the file holds to check its checksums unless verify=false "
        "(`--restore` always checks); QEMU reads the whole stream before the guest runs, so "
        "restores compare a lazy load against a full read: the guest's first touches of its "
        "memory cost page faults on our side that QEMU paid up front."),
        *(f"Skipped {s}" for s in skipped),
        "Per-round values: " + " || ".join(raw),
    ]
    if ctx.smoke:
        notes.append("Smoke run: 256 MiB sparse only.")
    if QUICK:
        notes.append("BENCH_SNAPSHOT=dense: 1024 MiB dense only, no QEMU.")
    return Section(TITLE, SUMMARY, figures, notes)


def _ram_fits(size_mib: int) -> bool:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024 > 2 * size_mib + 1024
    except OSError:
        pass
    return True
