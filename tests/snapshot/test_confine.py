"""Snapshot names confined to their directory: a name is checked as a string, then resolved
beneath the directory at the moment of use, so neither a name nor a symlink (one already
there, or one swapped in during a save) leads a save or a load outside. A save replaces only
a snapshot."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from xend_lite.errors import InvalidArgument, NotFound
from xend_lite.snapshot import (ConfinedPath, SnapshotError, TargetRefused, check_target,
                                describe, load_snapshot, remove_stale_temps, save_snapshot)
from xend_lite.snapshot import confine

from .helpers import CLASSES, close_regions, sample_states, small_memory

BAD_NAMES = ["/etc/passwd", "../x.snap", "a/../../x.snap", "./x.snap", "a/./x", "a//x", "a/",
             "", "x\0y", ".hidden", "sub/.x.snap.1.abcdef01.tmp", "x" * 256, "a/" * 600 + "x"]


@pytest.fixture
def layout(tmp_path):
    """root/ (the snapshot directory) and outside/ beside it, with a file we must not touch."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "precious").write_bytes(b"host file\n")
    return root, outside


def save(path) -> None:
    regions, _ = small_memory(1)
    try:
        save_snapshot(path, sample_states(1), regions)
    finally:
        close_regions(regions)


def outside_untouched(outside) -> None:
    assert sorted(os.listdir(outside)) == ["precious"]
    assert (outside / "precious").read_bytes() == b"host file\n"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_without_looking(name):
    # the root does not exist: a refusal that looked at the file system would say so
    with pytest.raises(InvalidArgument):
        ConfinedPath("/nonexistent-root", name)


def test_names_and_subdirectories_inside_work(layout):
    root, _ = layout
    (root / "nightly").mkdir()
    for name in ("vm.xls", "nightly/vm.xls"):
        p = ConfinedPath(str(root), name)
        assert p == os.path.join(root, name) and p.name == name
        save(p)
        save(p)                                   # replacing a snapshot is fine
        with load_snapshot(p, CLASSES) as snap:
            assert "tclock" in snap.states
        assert describe(p)["path"] == str(p)


def test_symlinked_directory_out_of_the_root_is_refused(layout):
    root, outside = layout
    os.symlink(outside, root / "link")
    os.symlink("..", root / "up")
    for name in ("link/x.snap", "link/precious", "up/outside/precious"):
        p = ConfinedPath(str(root), name)
        with pytest.raises(InvalidArgument, match="leads out"):
            save(p)
        with pytest.raises(InvalidArgument, match="leads out"):
            load_snapshot(p, CLASSES)
        with pytest.raises(InvalidArgument, match="leads out"):
            describe(p)
        with pytest.raises(InvalidArgument, match="leads out"):
            check_target(p)
    outside_untouched(outside)


def test_refusal_does_not_tell_what_exists_outside(layout):
    root, outside = layout
    os.symlink(outside, root / "link")
    messages = set()
    for name in ("link/precious", "link/missing"):
        with pytest.raises(InvalidArgument) as err:
            load_snapshot(ConfinedPath(str(root), name), CLASSES)
        messages.add(str(err.value).replace(name, "NAME"))
    assert len(messages) == 1, messages


def test_symlink_to_a_file_outside(layout):
    root, outside = layout
    os.symlink(outside / "precious", root / "evil.snap")
    p = ConfinedPath(str(root), "evil.snap")
    with pytest.raises(InvalidArgument, match="leads out"):
        describe(p)
    with pytest.raises(TargetRefused, match="symbolic link"):
        save(p)
    outside_untouched(outside)
    assert os.path.islink(root / "evil.snap")


def test_symlink_inside_the_root_is_followed_for_reading(layout):
    root, _ = layout
    save(ConfinedPath(str(root), "real.snap"))
    os.symlink("real.snap", root / "alias.snap")
    assert describe(ConfinedPath(str(root), "alias.snap"))["sections"]


def test_a_directory_swapped_for_a_symlink_during_the_save_is_not_followed(layout):
    """The save resolved sub/ before it began: renaming sub away and putting a symlink to
    outside/ in its place mid-save does not move the snapshot there."""
    root, outside = layout
    (root / "sub").mkdir()
    regions, _ = small_memory(2)
    swapped = []

    def progress(done, total):
        if not swapped:
            os.rename(root / "sub", root / "sub.moved")
            os.symlink(outside, root / "sub")
            swapped.append(True)
    try:
        save_snapshot(ConfinedPath(str(root), "sub/x.snap"), sample_states(2), regions,
                      progress=progress)
    finally:
        close_regions(regions)
    assert swapped
    outside_untouched(outside)
    assert os.listdir(root / "sub.moved") == ["x.snap"]
    assert describe(str(root / "sub.moved" / "x.snap"))


@pytest.mark.parametrize("kind", ["text", "empty", "directory", "fifo"])
def test_a_save_replaces_nothing_but_a_snapshot(layout, kind):
    root, _ = layout
    target = root / "t.snap"
    if kind == "text":
        target.write_bytes(b"important data\n")
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "directory":
        target.mkdir()
    else:
        os.mkfifo(target)
    before = target.read_bytes() if target.is_file() else None
    for p in (ConfinedPath(str(root), "t.snap"), str(target)):
        with pytest.raises(TargetRefused):
            check_target(p)
        with pytest.raises(TargetRefused):
            save(p)
    if before is not None:
        assert target.read_bytes() == before
    assert sorted(os.listdir(root)) == ["t.snap"], "a temporary file was left"


def test_a_missing_directory_is_not_found(layout):
    root, _ = layout
    with pytest.raises(NotFound):
        check_target(ConfinedPath(str(root), "no/such/x.snap"))
    with pytest.raises(SnapshotError):
        save(ConfinedPath(str(root), "no/such/x.snap"))


def test_without_openat2_the_walk_refuses_every_symlink(layout, monkeypatch):
    root, outside = layout
    (root / "sub").mkdir()
    os.symlink(outside, root / "link")
    os.symlink("sub", root / "inner")
    monkeypatch.setattr(confine, "_have_openat2", False)
    save(ConfinedPath(str(root), "sub/x.snap"))
    assert describe(ConfinedPath(str(root), "sub/x.snap"))
    for name in ("link/x.snap", "inner/x.snap"):
        with pytest.raises(InvalidArgument, match="leads out"):
            save(ConfinedPath(str(root), name))
    outside_untouched(outside)


def test_stale_temps_of_any_snapshot_are_removed(layout):
    root, _ = layout
    child = subprocess.Popen(["true"])            # a pid that is surely gone
    child.wait()
    stale = [f".a.snap.{child.pid}.0123abcd.tmp", f".b.xls.{child.pid}.89abcdef.tmp"]
    live = f".c.snap.{os.getppid()}.00000000.tmp"
    other = ".not-a-temp"
    for name in stale + [live, other]:
        (root / name).write_bytes(b"x")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sorted(remove_stale_temps(fd)) == sorted(stale)
    finally:
        os.close(fd)
    assert sorted(os.listdir(root)) == sorted([live, other])


def test_constants_match_the_kernel_header(tmp_path):
    cc = shutil.which("cc")
    if cc is None or not os.path.exists("/usr/include/linux/openat2.h"):
        pytest.skip("no C compiler or no <linux/openat2.h> to compare with")
    src = tmp_path / "c.c"
    src.write_text('#include <stdio.h>\n#include <sys/syscall.h>\n#include <linux/openat2.h>\n'
                   'int main(void){printf("%d %d %zu %ld\\n", RESOLVE_BENEATH, '
                   'RESOLVE_NO_MAGICLINKS, sizeof(struct open_how), (long)SYS_openat2);}\n')
    subprocess.run([cc, "-o", str(tmp_path / "c"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "c")], capture_output=True, text=True, check=True)
    ours = (confine.RESOLVE_BENEATH, confine.RESOLVE_NO_MAGICLINKS,
            ctypes.sizeof(confine._binding()[1]), confine.SYS_OPENAT2)
    assert out.stdout.split() == [str(v) for v in ours]
