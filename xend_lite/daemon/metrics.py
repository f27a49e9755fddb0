"""Metrics in Prometheus's text exposition format (version 0.0.4), served at GET /metrics.

What the daemon itself sees is counted here: control requests and their latency by method
(a histogram), events by name (overlay changes among them) and snapshot saves and loads
(count, seconds, bytes saved). What the VM counts (exits by reason per vCPU, hypercalls by
name and by Xen errno, event-channel sends) is read from the Domain's plain counters when a
scrape comes (``query_counters``, safe from any thread), so a scrape is answered even while a
save holds the VM owner.
"""

from __future__ import annotations

import math
import time
from typing import Any

from xend_lite.daemon.runstate import RunState
from xend_lite.record import Record

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0, 10.0)
OVERLAY_EVENTS = {"XEN_OVERLAY_MAPPED": "mapped", "XEN_OVERLAY_UNMAPPED": "unmapped"}


class Histogram(Record):
    __slots__ = ("counts", "total")

    def __init__(self, counts: list[int] | None = None, total: float = 0.0):
        self.counts = [0] * (len(BUCKETS) + 1) if counts is None else counts
        self.total = total

    def observe(self, seconds: float) -> None:
        i = 0
        while i < len(BUCKETS) and seconds > BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.total += seconds


class SnapshotStats(Record):
    __slots__ = ("count", "seconds", "bytes")

    def __init__(self, count: int = 0, seconds: float = 0.0, bytes: int = 0):  # noqa: A002
        self.count = count
        self.seconds = seconds
        self.bytes = bytes


class Metrics:
    """The daemon's own counters; everything is updated on the event loop."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests: dict[tuple[str, str], int] = {}     # (method, ok|error) -> count
        self.latency: dict[str, Histogram] = {}
        self.events: dict[str, int] = {}
        self.saves = SnapshotStats()
        self.loads = SnapshotStats()

    def rpc_done(self, method: str, seconds: float, ok: bool) -> None:
        key = (method, "ok" if ok else "error")
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.latency.get(method)
        if h is None:
            h = self.latency[method] = Histogram()
        h.observe(seconds)

    def event(self, event: dict) -> None:
        """An EventBus observer: every published event."""
        name = event.get("event", "")
        self.events[name] = self.events.get(name, 0) + 1
        data = event.get("data") or {}
        stats = self.saves if name == "SNAPSHOT_SAVED" else self.loads if name == "SNAPSHOT_LOADED" else None
        if stats is not None:
            stats.count += 1
            stats.seconds += _number(data.get("seconds"))
            stats.bytes += int(_number(data.get("size")))

    def render(self, state: RunState, counters: dict | None) -> str:
        out = _Writer()
        out.family("xend_lite_uptime_seconds", "gauge", "Seconds since the daemon started.")
        out.sample("xend_lite_uptime_seconds", {}, time.monotonic() - self.started)
        out.family("xend_lite_run_state", "gauge", "1 for the VM's current run state, 0 for the others.")
        for s in RunState:
            out.sample("xend_lite_run_state", {"state": s.value}, 1 if s == state else 0)
        self._render_rpc(out)
        out.family("xend_lite_events_total", "counter", "Events published, by name.")
        for name, n in sorted(self.events.items()):
            out.sample("xend_lite_events_total", {"event": name}, n)
        out.family("xend_lite_overlay_changes_total", "counter",
                   "Overlay pages mapped or unmapped (by the guest or the operator).")
        for ev, what in OVERLAY_EVENTS.items():
            out.sample("xend_lite_overlay_changes_total", {"change": what}, self.events.get(ev, 0))
        for kind, st in (("save", self.saves), ("load", self.loads)):
            out.family(f"xend_lite_snapshot_{kind}s_total", "counter", f"Snapshot {kind}s done.")
            out.sample(f"xend_lite_snapshot_{kind}s_total", {}, st.count)
            out.family(f"xend_lite_snapshot_{kind}_seconds_total", "counter",
                       f"Seconds spent in snapshot {kind}s.")
            out.sample(f"xend_lite_snapshot_{kind}_seconds_total", {}, st.seconds)
        out.family("xend_lite_snapshot_save_bytes_total", "counter", "Bytes of snapshots saved.")
        out.sample("xend_lite_snapshot_save_bytes_total", {}, self.saves.bytes)
        if counters is not None:
            _render_vm(out, counters)
        return out.text()

    def _render_rpc(self, out: _Writer) -> None:
        out.family("xend_lite_rpc_requests_total", "counter", "Control requests, by method and result.")
        for (m, result), n in sorted(self.requests.items()):
            out.sample("xend_lite_rpc_requests_total", {"method": m, "result": result}, n)
        name = "xend_lite_rpc_request_duration_seconds"
        out.family(name, "histogram", "Time to answer a control request, by method.")
        for m, h in sorted(self.latency.items()):
            running = 0
            for le, n in zip([*BUCKETS, math.inf], h.counts):
                running += n
                out.sample(name + "_bucket", {"method": m, "le": le}, running)
            out.sample(name + "_sum", {"method": m}, h.total)
            out.sample(name + "_count", {"method": m}, running)


def _render_vm(out: _Writer, c: dict) -> None:
    out.family("xend_lite_vcpu_exits_total", "counter", "KVM exits, by vCPU and reason.")
    for i, exits in enumerate(c.get("exits", [])):
        for reason, n in sorted(exits.items()):
            out.sample("xend_lite_vcpu_exits_total", {"vcpu": i, "reason": reason}, n)
    hc = c.get("hypercalls")
    if hc is None:
        return
    out.family("xend_lite_hypercalls_total", "counter", "Hypercalls, by name.")
    for name, st in sorted(hc.get("hypercalls", {}).items()):
        out.sample("xend_lite_hypercalls_total", {"name": name}, st.get("calls", 0))
    out.family("xend_lite_hypercall_errors_total", "counter",
               "Hypercalls that returned an error, by name and Xen errno.")
    for name, st in sorted(hc.get("hypercalls", {}).items()):
        for errno, n in sorted(st.get("errnos", {}).items(), key=lambda kv: int(kv[0])):
            out.sample("xend_lite_hypercall_errors_total", {"name": name, "errno": errno}, n)
    out.family("xend_lite_hypercall_internal_errors_total", "counter",
               "Hypercall handlers that failed inside the daemon.")
    out.sample("xend_lite_hypercall_internal_errors_total", {}, hc.get("internal_errors", 0))
    out.family("xend_lite_event_channel_sends_total", "counter", "EVTCHNOP_send calls.")
    out.sample("xend_lite_event_channel_sends_total", {}, hc.get("event_sends", 0))


def _number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        if math.isnan(v):
            return "NaN"
        return repr(v)
    return str(int(v))


class _Writer:
    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self._lines.append(f"# HELP {name} {help_}")
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict[str, Any], value: float) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape(_value(v) if isinstance(v, float) else str(v))}"'
                             for k, v in labels.items())
            self._lines.append(f"{name}{{{inner}}} {_value(value)}")
        else:
            self._lines.append(f"{name} {_value(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"

