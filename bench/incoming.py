"""Restore into a process that waits for it: `xend-lite --incoming` + snapshot-load beside
QEMU `-incoming defer` + migrate-incoming, at several guest sizes, in the same run."""

from __future__ import annotations

import os
import shutil
import time

from bench._harness import Context, Figure, Section, Skip
from bench._qemu import qemu_binary
from bench._xl import Daemon, require_kvm, spin_image
from bench.snapshot import MIB, _ram_fits, qemu_deferred_load, qemu_save

TITLE = "incoming: restore into a waiting process, against QEMU -incoming defer"
SUMMARY = (
    "Each VMM is started waiting for its state: `xend-lite --incoming` (no VM until "
    "snapshot-load) and QEMU `-incoming defer` (its default RAM, spinning boot "
    "sector saved by `migrate exec:cat > FILE`). Once each answers on its control socket, the "
    "clock runs from the load request to the guest running: xend-lite's `snapshot-load` "
    "(it builds the VM the file describes, maps its RAM copy-on-write and runs it; with and "
    "without the memory checksums), QEMU's `migrate-incoming exec:cat FILE` until query-status "
    "leaves inmigrate (and `cont` if needed). Sparse guests (the spinning guest only), page "
    "cache warm. Also spawn to guest running for both, from the same rounds. Below 1 favours "
    "xend-lite. Target: snapshot-load to running <= 10 ms at every size.")


def xend_lite_once(snapdir: str, name: str, verify: bool) -> dict[str, float]:
    with Daemon("--incoming", "--snapshot-dir", snapdir) as d:
        d.wait_ready()
        with d.rpc() as c:
            t = time.perf_counter()
            c.call("snapshot-load", {"path": name, "verify": verify})
            took = time.perf_counter() - t
            st = c.call("query-status")["status"]
            if st != "running":
                raise RuntimeError(f"after snapshot-load the guest is {st}")
            return {"load": took, "fresh": time.perf_counter() - d.t_spawn}


def _save_xend_lite(spin, size_mib: int, snapdir: str, name: str) -> None:
    with Daemon("--image", str(spin), "--memory", str(size_mib), "--snapshot-dir", snapdir) as d:
        d.wait_ready()
        with d.rpc() as c:
            c.call("snapshot-save", {"path": name})


def run(ctx: Context) -> Section:
    require_kvm()
    qemu_binary()
    spin = spin_image(ctx)
    sizes = [256] if ctx.smoke else [256, 1024, 4096]
    snapdir = ctx.workdir / "incoming"
    snapdir.mkdir(exist_ok=True)
    figures: list[Figure] = []
    raw: list[str] = []
    skipped: list[str] = []
    try:
        for size in sizes:
            if not _ram_fits(size):
                skipped.append(f"{size} MiB: not enough free host RAM")
                continue
            name, q_path = f"xl-{size}.snap", str(snapdir / f"qemu-{size}.mig")
            _save_xend_lite(spin, size, str(snapdir), name)
            qemu_save(ctx, size, False, q_path)
            rounds = {"xl": lambda: xend_lite_once(str(snapdir), name, True),
                      "xl-noverify": lambda: xend_lite_once(str(snapdir), name, False),
                      "qemu": lambda: qemu_deferred_load(ctx, size, q_path)}
            samples: dict[str, list[dict[str, float]]] = {k: [] for k in rounds}
            for _ in range(ctx.repeats):        # interleaved: one of each per round
                for key, fn in rounds.items():
                    samples[key].append(fn())
            med = {k: {f: sorted(r[f] for r in rs)[len(rs) // 2] for f in rs[0]} for k, rs in samples.items()}
            q = med["qemu"]
            figures += [
                Figure(f"{size} MiB: snapshot-load to running (--incoming)", med["xl"]["load"] * 1e3,
                       "ms", "QEMU migrate-incoming to running", q["load"] * 1e3),
                Figure(f"{size} MiB: the same, verify=false", med["xl-noverify"]["load"] * 1e3, "ms",
                       "QEMU migrate-incoming to running", q["load"] * 1e3),
                Figure(f"{size} MiB: spawn to guest running (--incoming + snapshot-load)",
                       med["xl"]["fresh"] * 1e3, "ms", "QEMU, spawn to running", q["fresh"] * 1e3),
            ]
            raw.append(f"{size} MiB: " + "; ".join(
                f"{k} load " + "/".join(f"{r['load'] * 1e3:.1f}" for r in rs) + " ms"
                for k, rs in samples.items()))
            for p in (snapdir / name, q_path):
                if os.path.exists(p):
                    os.unlink(p)
    finally:
        shutil.rmtree(snapdir, ignore_errors=True)
    if not figures:
        raise Skip("no guest size fits: " + "; ".join(skipped))
    worst = max(f.value for f in figures if "to running (--incoming)" in f.name)
    notes = [f"{ctx.repeats} interleaved round(s) per size, median kept; a fresh process per round.",
             "Raw samples: " + " || ".join(raw),
             *(f"Skipped {s}" for s in skipped),
             f"Worst snapshot-load to running: {worst:.1f} ms against 10 ms "
             f"({'met' if worst <= 10 else 'NOT met'})."]
    return Section(TITLE, SUMMARY, figures, notes)
