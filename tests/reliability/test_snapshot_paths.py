"""Snapshot paths from a hostile client: a snapshot is a name inside the snapshot directory.
Absolute paths, `..`, and symlinks out of the directory are refused before anything is
written or read, a save replaces nothing but a snapshot, and no reply tells whether a file
outside exists. The VM runs on through every refusal."""

from __future__ import annotations

import os
import subprocess

import pytest

from xend_lite.cli.ctl import RpcError

from .test_faults import booted, still_running

pytestmark = pytest.mark.kvm

VICTIM = b"a file of the host's that no client may touch\n"


@pytest.fixture
def outside(short_tmp):
    """A directory beside the snapshot directory, with a file in it."""
    path = os.path.join(short_tmp, "outside")
    os.mkdir(path)
    with open(os.path.join(path, "victim"), "wb") as f:
        f.write(VICTIM)
    return path


def untouched(outside: str) -> None:
    assert sorted(os.listdir(outside)) == ["victim"], "a save wrote outside the directory"
    with open(os.path.join(outside, "victim"), "rb") as f:
        assert f.read() == VICTIM, "a save replaced a file outside the directory"


async def refused(c, method: str, path: str, cls: str = "InvalidArgument") -> RpcError:
    with pytest.raises(RpcError) as err:
        await c.call(method, {"path": path})
    assert err.value.error_class == cls, (method, path, err.value.error_class, err.value.message)
    assert "Traceback" not in err.value.message
    return err.value


async def test_saves_cannot_write_outside_the_snapshot_directory(start_daemon, outside):
    d = await booted(start_daemon)
    snapdir = d.cfg.snapshot_dir
    os.symlink(outside, os.path.join(snapdir, "link"))
    rel = os.path.relpath(outside, snapdir)
    async with d.client() as c:
        for path in (os.path.join(outside, "victim"), os.path.join(outside, "new.snap"),
                     f"{rel}/victim", f"../{os.path.basename(snapdir)}/../outside/victim",
                     "link/victim", "link/new.snap"):
            for method in ("snapshot-save", "snapshot-load", "query-snapshot"):
                await refused(c, method, path)
            untouched(outside)
            assert (await c.call("query-status"))["status"] == "running", path
        # a symlink inside pointing out: not replaced, not followed
        os.symlink(os.path.join(outside, "victim"), os.path.join(snapdir, "evil.snap"))
        await refused(c, "snapshot-save", "evil.snap", "TargetRefused")
        await refused(c, "snapshot-load", "evil.snap")
        untouched(outside)
        assert os.path.islink(os.path.join(snapdir, "evil.snap"))
        await still_running(d, c)


async def test_a_save_replaces_only_a_snapshot(start_daemon):
    d = await booted(start_daemon)
    notes = os.path.join(d.cfg.snapshot_dir, "notes.txt")
    with open(notes, "wb") as f:
        f.write(VICTIM)
    async with d.client() as c:
        err = await refused(c, "snapshot-save", "notes.txt", "TargetRefused")
        assert "not a snapshot" in err.message
        with open(notes, "rb") as f:
            assert f.read() == VICTIM
        assert sorted(os.listdir(d.cfg.snapshot_dir)) == ["notes.txt"], "a temporary file left"
        await c.call("snapshot-save", {"path": "vm.snap"})
        await c.call("snapshot-save", {"path": "vm.snap"})     # a snapshot is replaced
        await still_running(d, c)


async def test_replies_do_not_tell_whether_a_file_outside_exists(start_daemon, outside):
    d = await booted(start_daemon)
    os.symlink(outside, os.path.join(d.cfg.snapshot_dir, "link"))
    rel = os.path.relpath(outside, d.cfg.snapshot_dir)
    async with d.client() as c:
        for there, missing in ((os.path.join(outside, "victim"), os.path.join(outside, "nope")),
                               (f"{rel}/victim", f"{rel}/nope"),
                               ("link/victim", "link/nope")):
            for method in ("query-snapshot", "snapshot-load", "snapshot-save"):
                a = await refused(c, method, there)
                b = await refused(c, method, missing)
                assert (a.code, a.message.replace(there, "P")) == \
                       (b.code, b.message.replace(missing, "P")), (method, a.message, b.message)
        await still_running(d, c)


async def test_the_directory_is_made_0700_at_the_first_save(start_daemon, short_tmp):
    snapdir = os.path.join(short_tmp, "state", "xend-lite")
    d = await booted(start_daemon, snapshot_dir=snapdir)
    os.rmdir(snapdir)                 # the fixture makes it; a plain install has none
    async with d.client() as c:
        await refused(c, "snapshot-load", "a.snap", "NotFound")
        await c.call("snapshot-save", {"path": "a.snap"})
        await c.call("snapshot-load", {"path": "a.snap"})
    assert os.stat(snapdir).st_mode & 0o777 == 0o700
    assert os.listdir(snapdir) == ["a.snap"]


async def test_unfinished_saves_are_removed_at_start(start_daemon, short_tmp):
    snapdir = os.path.join(short_tmp, "snap")
    os.makedirs(os.path.join(snapdir, "sub"))
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = [os.path.join(snapdir, f".a.snap.{gone.pid}.0123abcd.tmp"),
             os.path.join(snapdir, "sub", f".b.snap.{gone.pid}.89abcdef.tmp")]
    for p in stale:
        with open(p, "wb") as f:
            f.write(b"half a snapshot")
    await booted(start_daemon, snapshot_dir=snapdir, start_paused=True)
    assert os.listdir(snapdir) == ["sub"] and os.listdir(os.path.join(snapdir, "sub")) == []


async def test_the_writer_and_reader_get_the_confined_path(start_daemon, monkeypatch):
    """The confinement holds only if the Xen layer hands the daemon's ConfinedPath to the
    snapshot writer and reader as it is (os.fspath keeps it; str() would make it a plain
    path, opened without RESOLVE_BENEATH)."""
    from xend_lite.snapshot import ConfinedPath
    from xend_lite.vmm import persist

    seen = []
    for name in ("save_snapshot", "load_snapshot"):
        real = getattr(persist, name)
        monkeypatch.setattr(persist, name,
                            lambda path, *a, _real=real, **kw: seen.append(path) or _real(path, *a, **kw))
    d = await booted(start_daemon)
    async with d.client() as c:
        await c.call("snapshot-save", {"path": "a.snap"})
        await c.call("snapshot-load", {"path": "a.snap"})
        await still_running(d, c)
    assert len(seen) == 2 and all(type(p) is ConfinedPath and p.name == "a.snap" for p in seen)
