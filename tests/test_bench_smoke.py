"""The benchmarks still run: `python -m bench --smoke --no-write` with tiny counts. A failed
benchmark fails this test; one that cannot run here (no QEMU and no way to install it)
reports itself skipped, which is not a failure. Figures are not judged: that is bench/'s job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.kvm


def test_every_benchmark_runs_in_smoke_mode():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--no-write"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for name in ("exitloop", "hypercall", "overlay", "scaling", "qmp", "startup", "snapshot",
                 "idle", "incoming", "linux", "evtchn"):
        assert f"({name}:" in out, f"benchmark {name} did not run:\n{out[-2000:]}"
    assert "failed:" not in out, out[-4000:]
