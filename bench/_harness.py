"""What every benchmark shares: figures, sections, the run context, discovery, the host
description and the BENCHMARKS.md writer."""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import pkgutil
import platform
import shutil
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class Skip(Exception):
    """A benchmark cannot run on this host (the message says why)."""


@dataclass(frozen=True)
class Figure:
    """One measured value beside the baseline it is judged against (same run, same unit)."""

    name: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline_value in (None, 0):
            return None
        return self.value / self.baseline_value


@dataclass
class Section:
    title: str
    summary: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Context:
    """Run-wide settings: ``smoke`` asks for tiny counts; ``workdir`` holds built artefacts."""

    smoke: bool
    workdir: Path
    repeats: int

    def count(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full

    def cc(self, source: Path, name: str, *flags: str) -> Path:
        """Compile a C program of the benchmark suite with the system compiler."""
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise Skip("no C compiler (apt-get install gcc)")
        out = self.workdir / name
        if not out.exists() or out.stat().st_mtime < source.stat().st_mtime:
            proc = subprocess.run([compiler, "-O2", "-o", str(out), str(source), *flags],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {source.name} failed: {proc.stderr.strip()}")
        return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved(configs: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Run every config ``repeats`` times, one of each per round, so drift on a shared
    machine hits every figure alike; returns the samples and their medians."""
    samples: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(repeats):
        for key, fn in configs.items():
            samples[key].append(fn())
    return samples, {k: median(s) for k, s in samples.items()}


def samples_note(samples: dict[str, list[float]], unit: str) -> str:
    return f"Raw samples ({unit}): " + "; ".join(
        f"{k} " + "/".join(f"{x:.0f}" for x in s) for k, s in samples.items())


def bench_guest(ctx: Context, name: str, flat: bool = False, variant: str = "",
                defines: dict[str, object] | None = None) -> Path:
    """bench/guests/NAME.S built as a 32-bit ELF in the work directory, or with ``flat`` as
    a flat binary of it (for hosts that load raw images); Skip without a toolchain. A
    ``variant`` (its file name's suffix) is built with ``defines``."""
    from xend_lite.guests.build import build, toolchain_missing

    missing = toolchain_missing()
    if missing:
        raise Skip(missing)
    stem = f"{name}-{variant}" if variant else name
    elf = build(HERE / "guests" / f"{name}.S", ctx.workdir / f"{stem}.elf", bits=32,
                defines=defines)
    if not flat:
        return elf
    out = ctx.workdir / f"{stem}.bin"
    subprocess.run(["objcopy", "-O", "binary", str(elf), str(out)], check=True, capture_output=True)
    return out


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM a VMM under test, then SIGKILL it if it has not exited within ``grace``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def file_tail(f, limit: int = 800) -> str:
    """The last ``limit`` characters written to the binary file ``f`` (a child's stderr)."""
    f.flush()
    f.seek(0)
    return f.read().decode(errors="replace").strip()[-limit:]


def discover() -> list[ModuleType]:
    """Every benchmark module in this package, in name order."""
    mods = []
    for info in sorted(pkgutil.iter_modules([str(HERE)]), key=lambda i: i.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        mod = importlib.import_module(f"bench.{info.name}")
        if callable(getattr(mod, "run", None)):
            mods.append(mod)
    return mods


def host_description() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = {
        "CPU": f"{cpu}, {os.cpu_count()} logical cores",
        "Kernel": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
    }
    modules = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm")) \
        if os.path.isdir("/sys/module") else []
    desc["KVM modules"] = ", ".join(modules) or "none loaded"
    try:
        from xend_lite.machine.hostcheck import check_host

        report = check_host()
        caps = report.capabilities
        desc["KVM"] = "usable" if report.ok else "; ".join(report.problems) or "not usable"
        desc["KVM capabilities"] = ", ".join(f"{k}={v}" for k, v in sorted(caps.items()))
    except Exception as exc:  # noqa: BLE001 - a description, never a reason to fail
        desc["KVM"] = f"unknown ({type(exc).__name__})"
    return desc


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "ns" and v >= 1000:
        return f"{v / 1000:.2f} us"
    if unit == "ns":
        return f"{v:.0f} ns"
    return f"{v:.3g} {unit}".strip()


def render_text(section: Section) -> str:
    lines = [f"== {section.title}"]
    if section.error:
        lines.append(f"   {section.error}")
    for f in section.figures:
        ratio = f"{f.ratio:.2f}x {f.baseline}" if f.ratio is not None else ""
        lines.append(f"   {f.name:<58} {_fmt(f.value, f.unit):>10}   {ratio}")
    return "\n".join(lines)


def render_markdown(sections: list[Section], host: dict[str, str], smoke: bool) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench`); do not edit by hand. Every figure is a",
        "ratio to a baseline measured in the same run, because absolute times drift on shared",
        "machines; the absolute values stand beside it for context.",
        "",
        f"Run: {now}{' (smoke run: tiny counts, figures are not meaningful)' if smoke else ''}.",
        "",
        "## Machine",
        "",
    ]
    out += [f"- {k}: {v}" for k, v in host.items()]
    out += [
        "",
        "## How to rerun",
        "",
        "```",
        "make bench                                  # every benchmark, rewrites this file",
        "make bench ARGS='--only exitloop'           # one benchmark",
        "make bench ARGS='--smoke --no-write'        # seconds-long check that they still run",
        "```",
        "",
    ]
    for s in sections:
        out += [f"## {s.title}", "", s.summary, ""]
        if s.error:
            out += [f"Not measured: {s.error}", ""]
            continue
        out += ["| Figure | Value | Baseline | Baseline value | Ratio |",
                "|---|---:|---|---:|---:|"]
        for f in s.figures:
            ratio = f"{f.ratio:.2f}x" if f.ratio is not None else "-"
            out.append(f"| {f.name} | {_fmt(f.value, f.unit)} | {f.baseline or '-'} | "
                       f"{_fmt(f.baseline_value, f.unit)} | {ratio} |")
        out.append("")
        out += [f"- {n}" for n in s.notes]
        if s.notes:
            out.append("")
    return "\n".join(out).rstrip() + "\n"
