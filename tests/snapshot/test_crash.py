"""Crash safety: a writer killed at any moment never damages the snapshot already at the
path; its temporary file is removed by the next save. A full disk fails cleanly."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xend_lite.snapshot import (MemoryRegion, SnapshotWriteError, load_snapshot, save_snapshot,
                                wait_reclaimed)

from tests.tmpfs import small_tmpfs

from .helpers import (
    CLASSES,
    CRASH_SIZE,
    MiB,
    PAGE,
    close_regions,
    crash_memory,
    memfd,
    fill_pages,
    read_all,
    sample_states,
    small_memory,
)

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import os, sys, time
from xend_lite.snapshot import MemoryRegion, save_snapshot
from tests.snapshot.helpers import CRASH_SIZE, crash_memory, sample_states
path, seed, pause = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "pause"
fd = crash_memory(seed)

def progress(done, total):
    if pause and done == 0:
        print("mid", flush=True)
        time.sleep(60)

print("go", flush=True)
t0 = time.monotonic()
save_snapshot(path, sample_states(seed), [MemoryRegion("ram", 0x100000, CRASH_SIZE, fd)],
              progress=progress)
print("done", time.monotonic() - t0, flush=True)
"""


def spawn(path: Path, seed: int, pause: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(seed),
                             "pause" if pause else "run"], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)


_digests: dict[int, str] = {}


def digest(seed: int) -> str:
    if seed not in _digests:
        fd = crash_memory(seed)
        try:
            _digests[seed] = hashlib.sha256(read_all(fd, CRASH_SIZE)).hexdigest()
        finally:
            os.close(fd)
    return _digests[seed]


def loaded_seed(path: Path, candidates: tuple[int, ...]) -> int:
    """Load and fully verify the snapshot at path; return which seed's content it holds."""
    with load_snapshot(path, CLASSES, verify_memory=True) as snap:
        m = snap.map_region("ram")
        try:
            got = hashlib.sha256(m).hexdigest()
        finally:
            m.close()
        for seed in candidates:
            if snap.states == sample_states(seed):
                assert got == digest(seed), f"states of seed {seed} with other memory"
                return seed
    raise AssertionError("snapshot holds states of neither the old nor the new save")


def temps(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".tmp"))


def save_in_process(path: Path, seed: int) -> None:
    fd = crash_memory(seed)
    try:
        save_snapshot(path, sample_states(seed), [MemoryRegion("ram", 0x100000, CRASH_SIZE,
                                                               fd)])
    finally:
        os.close(fd)
    # the file the save replaced is freed in the background: wait, as a stopping daemon does
    assert wait_reclaimed(30)


def kill_loop(tmp_path: Path, rounds: int) -> dict[str, int]:
    path = tmp_path / "guest.snap"
    save_in_process(path, 1)
    current = 1
    # one full run to learn how long a save takes here
    p = spawn(path, 2)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    duration = float(out.split("done")[1])
    current = loaded_seed(path, (2,))
    rng = random.Random(1234)
    outcome = {"old": 0, "new": 0, "temps_left": 0}
    for i in range(rounds):
        seed = 3 + i
        p = spawn(path, seed)
        assert p.stdout.readline() == "go\n"
        time.sleep(rng.uniform(0, duration * 1.3))
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        got = loaded_seed(path, (current, seed))
        outcome["old" if got == current else "new"] += 1
        current = got
        outcome["temps_left"] += bool(temps(tmp_path))
    assert outcome["old"] + outcome["new"] == rounds
    # the next save removes every temporary file the killed writers left
    save_in_process(path, 99)
    assert temps(tmp_path) == []
    assert loaded_seed(path, (99,)) == 99
    return outcome


def test_sigkill_during_save_keeps_the_earlier_snapshot(tmp_path):
    outcome = kill_loop(tmp_path, 20)
    print(outcome)
    # kills land before the rename (old kept) and mid-write (a temporary file left) alike
    assert outcome["old"] > 0 and outcome["temps_left"] > 0


@pytest.mark.slow
def test_sigkill_during_save_soak(tmp_path):
    outcome = kill_loop(tmp_path, 300)
    print(outcome)
    assert outcome["old"] > 0 and outcome["temps_left"] > 0


def test_writer_killed_mid_save_leaves_a_temp_that_the_next_save_removes(tmp_path):
    path = tmp_path / "guest.snap"
    save_in_process(path, 1)
    p = spawn(path, 2, pause=True)
    try:
        assert p.stdout.readline() == "go\n"
        assert p.stdout.readline() == "mid\n"
        left = temps(tmp_path)
        assert len(left) == 1 and left[0].startswith(".guest.snap.")
        # while the writer lives, another save must not remove its file
        save_in_process(tmp_path / "guest.snap", 5)
        assert temps(tmp_path) == left
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    assert temps(tmp_path) == left  # killed: the file stays behind...
    assert loaded_seed(path, (5,)) == 5
    save_in_process(path, 6)
    assert temps(tmp_path) == []  # ...until the next save
    assert loaded_seed(path, (6,)) == 6


def test_temp_file_of_another_target_is_left_alone(tmp_path):
    other = tmp_path / ".other.snap.1.abcd.tmp"
    other.write_bytes(b"x")
    save_in_process(tmp_path / "guest.snap", 1)
    assert other.exists()


# -- disk full ------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    d = tmp_path / "mnt"
    d.mkdir()
    with small_tmpfs(d, "2m"):
        yield d


def test_disk_full(small_fs):
    path = small_fs / "guest.snap"
    regions, contents = small_memory()  # a little under 1 MiB of data
    try:
        save_snapshot(path, sample_states(1), regions)
    finally:
        close_regions(regions)
    before = path.read_bytes()
    fd = memfd(4 * MiB)
    try:
        fill_pages(fd, list(range(0, 4 * MiB // PAGE)), 3)  # 4 MiB of data cannot fit
        with pytest.raises(SnapshotWriteError) as ei:
            save_snapshot(path, sample_states(2), [MemoryRegion("ram", 0, 4 * MiB, fd)])
    finally:
        os.close(fd)
    assert ei.value.errno == errno.ENOSPC
    assert "guest.snap" in str(ei.value)
    assert sorted(os.listdir(small_fs)) == ["guest.snap"]  # no temporary file left
    assert path.read_bytes() == before
    with load_snapshot(path, CLASSES, verify_memory=True) as snap:
        assert snap.states == sample_states(1)
        # read, not mapped: on a full tmpfs a fault on a hole of a mapping cannot get a
        # page and raises SIGBUS, while read() of a hole returns zeros
        for name in ("lo", "hi"):
            r = snap.region(name)
            assert read_all(snap.fd, r.size, r.file_offset) == contents[name]
