"""The control plane side by side with QEMU's QMP in the same run: query-status throughput and
latency over one and over four connections, the stop+cont round trip, RPC while the guest
hammers hypercalls, and how both costs grow with vCPUs and guest RAM."""

from __future__ import annotations

import threading
import time

from bench._harness import Context, Figure, Section, bench_guest, median
from bench._qemu import Qemu, qemu_binary
from bench._xl import Daemon, percentile, proc_status, require_kvm, spin_image

TITLE = "qmp: control-plane requests, xend-lite JSON-RPC against QEMU QMP"
SUMMARY = (
    "Both VMs run a guest that spins without exiting (xend-lite: bench/guests/spin.S as a plain "
    "ELF; QEMU: a boot sector doing `jmp $`, `-accel kvm`), one process at a time, alternating. "
    "The client is the same for both: raw Unix sockets in one Python process, a connection kept "
    "open (HTTP/1.1 keep-alive for xend-lite, one QMP session after qmp_capabilities for QEMU), "
    "one request in flight per connection. `query-status` is sent back to back on one "
    "connection and on four connections from four threads; p50/p99 are per-request latencies. "
    "`stop`+`cont` is the pair's round trip (median and p99 of the pairs). The hypercall figures run bench/guests/hcloop.S "
    "(xen_version in a loop) in the daemon and read the rate from query-hypercalls. Memory under "
    "load: each process's VmRSS minus RssShmem (its guest RAM: a memfd for xend-lite, and QEMU is "
    "given `memory-backend-memfd` here) right after its requests. For req/s a ratio above 1 "
    "favours xend-lite; for times and memory, below 1.")


def _client_seq(conn, request: bytes, n: int) -> list[float]:
    """Latencies (us) of n back-to-back requests on one connection."""
    send, read, clock = conn.send_raw, conn.read_reply, time.perf_counter_ns
    out = []
    for _ in range(n):
        t = clock()
        send(request)
        read()
        out.append((clock() - t) / 1000)
    return out


def measure(connect, make_request, n_seq: int, n_conc: int, n_pairs: int, warm: int) -> dict[str, float]:
    """req/s, p50 and p99 sequential and over four connections, and stop+cont (us).
    ``connect(i)`` opens connection i (0..3)."""
    res: dict[str, float] = {}
    c = connect(0)
    try:
        req = make_request(c, "query-status")
        _client_seq(c, req, warm)
        t = time.perf_counter()
        lat = sorted(_client_seq(c, req, n_seq))
        res["seq_rps"] = n_seq / (time.perf_counter() - t)
        res["seq_p50"], res["seq_p99"] = percentile(lat, 50), percentile(lat, 99)
        pairs = []
        for _ in range(n_pairs):
            t0 = time.perf_counter_ns()
            c.call("stop")
            c.call("cont")
            pairs.append((time.perf_counter_ns() - t0) / 1000)
        res["stopcont"] = median(pairs)
        res["stopcont_p99"] = percentile(sorted(pairs), 99)
    finally:
        c.close()

    conns = [connect(i) for i in range(4)]
    try:
        reqs = [make_request(x, "query-status") for x in conns]
        for x, r in zip(conns, reqs):
            _client_seq(x, r, max(1, warm // 4))
        results: list[list[float]] = [[] for _ in conns]
        barrier = threading.Barrier(len(conns) + 1)

        def worker(i: int) -> None:
            barrier.wait()
            results[i] = _client_seq(conns[i], reqs[i], n_conc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(conns))]
        for th in threads:
            th.start()
        barrier.wait()
        t = time.perf_counter()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t
        lat = sorted(x for r in results for x in r)
        res["conc_rps"] = len(lat) / dt
        res["conc_p50"], res["conc_p99"] = percentile(lat, 50), percentile(lat, 99)
    finally:
        for x in conns:
            x.close()
    return res


def rss_without_guest(pid: int) -> float:
    """MiB of a VMM's resident memory that is not its guest RAM (VmRSS - RssShmem)."""
    st = proc_status(pid)
    return (st["VmRSS"] - st.get("RssShmem", 0)) / 1024


def _xl_request(conn, method: str) -> bytes:
    return conn.request_bytes(method)


def _qmp_request(conn, method: str) -> bytes:
    return conn.request_bytes(method)


def run_xend_lite(image, counts, extra: tuple[str, ...] = ()) -> dict[str, float]:
    with Daemon("--image", str(image), *extra) as d:
        d.wait_ready()
        res = measure(lambda _i: d.rpc(), _xl_request, *counts)
        res["rss"] = rss_without_guest(d.pid)
        return res


def run_qemu(ctx: Context, counts, memory_mib: int = 128, vcpus: int = 1) -> dict[str, float]:
    with Qemu(ctx.workdir, memory_mib, vcpus=vcpus, monitors=4, memfd=True) as q:
        res = measure(lambda i: q.wait_qmp(monitor=i), _qmp_request, *counts)
        res["rss"] = rss_without_guest(q.pid)
        return res


def hypercall_rate(d: Daemon, seconds: float, n_rpc: int | None = None) -> tuple[float, list[float]]:
    """Hypercalls/s over ``seconds`` with the control plane idle, or over ``n_rpc``
    back-to-back query-status requests (and their latencies) when given."""
    with d.rpc() as c:
        c.call("query-hypercalls")
        time.sleep(0.2)  # past the boot
        a = c.call("query-hypercalls")["total"]
        t = time.perf_counter()
        lat: list[float] = []
        if n_rpc is None:
            time.sleep(seconds)
        else:
            lat = sorted(_client_seq(c, c.request_bytes("query-status"), n_rpc))
        dt = time.perf_counter() - t
        b = c.call("query-hypercalls")["total"]
    return (b - a) / dt, lat


def run_hammer(hcloop, n_rpc: int, idle_s: float, memory_mib: int = 128, vcpus: int = 1) -> dict[str, float]:
    with Daemon("--image", str(hcloop), "--memory", str(memory_mib), "--vcpus", str(vcpus)) as d:
        d.wait_ready()
        idle_rate, _ = hypercall_rate(d, idle_s)
        busy_rate, lat = hypercall_rate(d, 0.0, n_rpc)
        rps = len(lat) / (sum(lat) / 1e6)
        rss = rss_without_guest(d.pid)
    return {"hc_idle": idle_rate, "hc_busy": busy_rate, "rps": rps,
            "p50": percentile(lat, 50), "p99": percentile(lat, 99), "rss": rss}


def hcloop_image(ctx: Context):
    return bench_guest(ctx, "hcloop")


def run(ctx: Context) -> Section:
    require_kvm()
    qemu_binary()
    spin = spin_image(ctx)
    hcloop = hcloop_image(ctx)
    counts = (ctx.count(5000, 200), ctx.count(1500, 50), ctx.count(200, 10), ctx.count(300, 20))
    n_hammer = ctx.count(3000, 100)
    idle_s = ctx.count(2, 0) or 0.3

    xs: list[dict] = []
    qs: list[dict] = []
    hs: list[dict] = []
    for _ in range(ctx.repeats):  # interleaved, so drift hits both alike
        xs.append(run_xend_lite(spin, counts))
        qs.append(run_qemu(ctx, counts))
        hs.append(run_hammer(hcloop, n_hammer, idle_s))

    def med(rows: list[dict], key: str) -> float:
        return median([r[key] for r in rows])

    X, Q, H = ({k: med(rows, k) for k in rows[0]} for rows in (xs, qs, hs))
    qmp = "QEMU QMP"
    figures = [
        Figure("query-status, 1 connection: req/s", X["seq_rps"] / 1e3, "kreq/s", qmp, Q["seq_rps"] / 1e3),
        Figure("query-status, 1 connection: p50", X["seq_p50"], "us", qmp, Q["seq_p50"]),
        Figure("query-status, 1 connection: p99", X["seq_p99"], "us", qmp, Q["seq_p99"]),
        Figure("query-status, 4 connections: req/s (total)", X["conc_rps"] / 1e3, "kreq/s", qmp, Q["conc_rps"] / 1e3),
        Figure("query-status, 4 connections: p50", X["conc_p50"], "us", qmp, Q["conc_p50"]),
        Figure("query-status, 4 connections: p99", X["conc_p99"], "us", qmp, Q["conc_p99"]),
        Figure("stop + cont round trip", X["stopcont"], "us", qmp, Q["stopcont"]),
        Figure("stop + cont round trip: p99", X["stopcont_p99"], "us", qmp, Q["stopcont_p99"]),
        Figure("query-status req/s, guest hammering hypercalls", H["rps"] / 1e3, "kreq/s", qmp, Q["seq_rps"] / 1e3),
        Figure("query-status p99, guest hammering hypercalls", H["p99"], "us", qmp, Q["seq_p99"]),
        Figure("query-status req/s, hypercall guest vs spinning guest", H["rps"] / 1e3, "kreq/s",
               "xend-lite, spinning guest", X["seq_rps"] / 1e3),
        Figure("guest hypercalls/s during back-to-back RPC", H["hc_busy"] / 1e3, "khc/s",
               "same guest, control plane idle", H["hc_idle"] / 1e3),
        Figure("RSS without guest RAM, after the requests above", X["rss"], "MiB",
               "QEMU, memfd guest RAM, after the same requests", Q["rss"]),
        Figure("RSS without guest RAM, after RPC with the guest hammering hypercalls", H["rss"],
               "MiB", "QEMU, memfd guest RAM, after its requests", Q["rss"]),
    ]
    notes = [
        (f"Counts per run: {counts[0]} sequential requests, 4 x {counts[1]} concurrent, {counts[2]} "
        f"stop+cont pairs, {counts[3]} warm-up; {n_hammer} requests against the hypercall guest; "
        f"{ctx.repeats} interleaved run(s), median kept."),
        "Targets: req/s at least QEMU's (ratio >= 1), p99 no worse (ratio <= 1); memory no more "
        "than QEMU's.",
        "Per-run values: " + "; ".join(
            f"{name} " + ", ".join(f"{k}={v:.1f}" if k == "rss" else f"{k}={v:.0f}" for k, v in r.items())
            for name, rows in (("xend-lite", xs), ("qemu", qs), ("hammer", hs)) for r in rows),
    ]
    figures += scaling(ctx, hcloop, notes)
    return Section(TITLE, SUMMARY, figures, notes)


def scaling(ctx: Context, hcloop, notes: list[str]) -> list[Figure]:
    """RPC latency and hypercall rate against vCPUs and guest RAM (xend-lite beside QEMU at
    the same size for the RPC latency). Only vCPU 0 runs the loop; the others are parked
    in wait-for-SIPI, as QEMU's application processors are under its BIOS."""
    n = ctx.count(2000, 60)
    idle_s = ctx.count(1, 0) or 0.2
    qcounts = (n, 1, 1, ctx.count(100, 10))
    configs = [(1, 128), (2, 128), (4, 128), (1, 1024), (1, 4096)] if not ctx.smoke else [(1, 128), (2, 256)]
    xs: dict[tuple, list[dict]] = {c: [] for c in configs}
    qs: dict[tuple, list[float]] = {c: [] for c in configs}
    for _ in range(ctx.repeats):
        for vcpus, mib in configs:
            xs[(vcpus, mib)].append(run_hammer(hcloop, n, idle_s, mib, vcpus))
            qs[(vcpus, mib)].append(run_qemu(ctx, qcounts, mib, vcpus)["seq_p50"])
    base = configs[0]
    b_idle = median([r["hc_idle"] for r in xs[base]])
    figs = []
    for cfg in configs:
        vcpus, mib = cfg
        label = f"{vcpus} vCPU{'s' if vcpus > 1 else ''}, {mib} MiB"
        p50 = median([r["p50"] for r in xs[cfg]])
        figs.append(Figure(f"scaling {label}: query-status p50, hypercall guest", p50, "us",
                           f"QEMU QMP, {label}", median(qs[cfg])))
        if cfg != base:
            figs.append(Figure(f"scaling {label}: guest hypercalls/s (RPC idle)",
                               median([r["hc_idle"] for r in xs[cfg]]) / 1e3, "khc/s",
                               "1 vCPU, 128 MiB", b_idle / 1e3))
    notes.append("Scaling: only vCPU 0 runs the hypercall loop (neither guest starts its other "
                 "vCPUs); the figures show what the extra vCPU threads and the larger RAM cost the "
                 "hypercall path and the control plane. Raw: " + "; ".join(
                     f"{v}x{m}MiB p50 " + "/".join(f"{r['p50']:.0f}" for r in xs[(v, m)])
                     + " hc/s " + "/".join(f"{r['hc_idle']:.0f}" for r in xs[(v, m)])
                     + " qemu p50 " + "/".join(f"{x:.0f}" for x in qs[(v, m)]) for v, m in configs))
    return figs
