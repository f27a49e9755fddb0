"""A small tmpfs for disk-full tests (root only; the test is skipped where it cannot be
mounted)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def small_tmpfs(path: str | os.PathLike[str], size: str) -> Iterator[str]:
    """Mount a tmpfs of ``size`` (e.g. "4m") on the existing directory ``path`` while in use."""
    path = os.fspath(path)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "none", path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
