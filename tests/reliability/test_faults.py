"""Faults: corrupt and unreadable snapshots loaded over RPC, a full disk during a save, a
hypercall handler that raises, a vCPU thread that dies. Each gives a clear error or a
visible state, and what was running goes on (or says plainly that it cannot)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import time

import pytest

from xend_lite.cli.ctl import RpcError
from xend_lite.daemon.service import real_domain_factory
from xend_lite.xen.xenabi import X

from tests.tmpfs import small_tmpfs

from .conftest import EventLog, scaled, wait_for
from .hostile import HC

pytestmark = pytest.mark.kvm

MIB = 1 << 20
MARK = 0x1000000          # RAM the default guest never touches: the test's own pattern


async def booted(start_daemon, **kw):
    kw.setdefault("memory_mib", 32)
    d = await start_daemon(factory=real_domain_factory, **kw)
    if kw.get("start_paused"):
        return d
    await wait_for(lambda: d.domain.xen.hypercall_page is not None
                   and d.domain.overlay.gpa("shared_info") is not None, 15, "the default guest")
    return d


async def still_running(d, c) -> None:
    """The VM runs and its guest still makes hypercalls, none failing inside the daemon."""
    assert (await c.call("query-status"))["status"] == "running"
    before = (await c.call("query-hypercalls"))["total"]
    await wait_for(lambda: d.domain.xen.counters()["total"] > before, 5, "the guest's next hypercall")
    assert (await c.call("query-hypercalls"))["internal_errors"] == 0


def memory_offset(data: bytes) -> int:
    """Where guest memory starts in a snapshot file (header: magic, version, flags, time,
    metadata length, then this u64)."""
    return int.from_bytes(data[32:40], "little")


def corrupt(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Truncation anywhere, or flipped bits anywhere: half of them before guest memory
    (header, table, states, memory checksums, padding), half in guest memory (data or holes;
    a load checks memory against its chunk checksums)."""
    if rng.random() < 0.4:
        n = rng.randrange(0, len(data))
        return data[:n], f"truncated to {n}"
    out = bytearray(data)
    limit = memory_offset(data)
    flips = [rng.randrange(0, limit) if rng.random() < 0.5 else rng.randrange(limit, len(data))
             for _ in range(rng.choice((1, 1, 2, 8)))]
    for f in flips:
        out[f] ^= 1 << rng.randrange(8)
    return bytes(out), f"bits flipped at {flips}"


def in_dir(d, name: str) -> str:
    """Where the snapshot named ``name`` lies on the host."""
    return os.path.join(d.cfg.snapshot_dir, name)


async def saved(d, c) -> tuple[str, bytes, bytes]:
    """A snapshot of the running default guest (its name, its bytes), and a mark in RAM that
    differs from it."""
    good = "good.snap"
    d.domain.machine.mem.write(MARK, os.urandom(256 * 1024))
    await c.call("snapshot-save", {"path": good})
    mark = os.urandom(4096)
    d.domain.machine.mem.write(MARK, mark)
    return good, open(in_dir(d, good), "rb").read(), mark


async def test_corrupt_snapshots_are_refused_and_the_vm_goes_on(start_daemon, request):
    cases = scaled(40, 400, request)
    d = await booted(start_daemon)
    m = d.domain.machine
    rng = random.Random(11)
    async with d.client() as c:
        good, data, mark = await saved(d, c)
        classes: dict[str, int] = {}
        for i in range(cases):
            blob, how = corrupt(data, rng)
            bad = f"bad{i}.snap"                          # a new file each time
            with open(in_dir(d, bad), "wb") as f:
                f.write(blob)
            with pytest.raises(RpcError) as err:
                await c.call("snapshot-load", {"path": bad})
            exc = err.value
            assert exc.code in range(1000, 1100), (how, exc.code, exc.message)
            assert exc.message and "Traceback" not in exc.message, how
            classes[exc.error_class] = classes.get(exc.error_class, 0) + 1
            # nothing of the bad file was applied: our mark in RAM is still there
            assert m.mem.read(MARK, 4096) == mark, f"a refused load changed RAM ({how})"
            assert (await c.call("query-status"))["status"] == "running", how
            os.unlink(in_dir(d, bad))
        await still_running(d, c)
        await c.call("snapshot-load", {"path": good})    # the good one still loads
        assert m.mem.read(MARK, 4096) != mark
        await still_running(d, c)
    print(f"\n{cases} corrupt snapshots refused: {classes}")
    assert sum(classes.values()) == cases


async def test_flipped_bit_in_saved_ram_is_refused(start_daemon):
    d = await booted(start_daemon)
    async with d.client() as c:
        good, data, _mark = await saved(d, c)
        out = bytearray(data)
        out[memory_offset(data) + MARK + 100] ^= 0x10
        with open(in_dir(d, "bad.snap"), "wb") as f:
            f.write(out)
        with pytest.raises(RpcError):
            await c.call("snapshot-load", {"path": "bad.snap"})


async def test_rewriting_a_loaded_snapshot_in_place_leaves_the_guest_alone(start_daemon):
    """`cp b.snap a.snap` right after loading a.snap: the guest keeps a's memory. (Only the
    file changes here; a write to guest RAM by the host while RAM moves off the file is
    another matter, see RELIABILITY.md.)"""
    d = await booted(start_daemon)
    m = d.domain.machine
    async with d.client() as c:
        a, data_a, _ = await saved(d, c)    # saved() then changes RAM at MARK
        b = "b.snap"
        await c.call("snapshot-save", {"path": b})
        data_b = open(in_dir(d, b), "rb").read()
        await c.call("snapshot-load", {"path": a})
        mem_a = m.mem.read(MARK, 4096)
        assert data_b != data_a
        for _ in range(3):
            await c.call("snapshot-load", {"path": a})
            assert m.mem.read(MARK, 4096) == mem_a
            with open(in_dir(d, a), "r+b") as f:   # what `cp b.snap a.snap` does
                f.truncate(0)
                f.write(data_b)
            assert m.mem.read(MARK, 4096) == mem_a, "rewriting the snapshot changed guest RAM"
            await still_running(d, c)
            with open(in_dir(d, a), "wb") as f:
                f.write(data_a)


async def test_unreadable_snapshot_names(start_daemon):
    """Names in the snapshot directory that are no snapshot. (Names that lead out of the
    directory: test_snapshot_paths.py.)"""
    d = await booted(start_daemon)
    os.mkfifo(in_dir(d, "fifo.snap"))
    open(in_dir(d, "empty.snap"), "wb").close()
    os.mkdir(in_dir(d, "dir.snap"))
    os.symlink("nowhere", in_dir(d, "dangling.snap"))
    names = {
        "missing": ("missing.snap", "NotFound"),
        "a directory": ("dir.snap", None),
        "a FIFO": ("fifo.snap", None),
        "an empty file": ("empty.snap", None),
        "a dangling symlink": ("dangling.snap", "NotFound"),
        "in a missing directory": ("no/dir/x.snap", "NotFound"),
    }
    async with d.client(timeout=20) as c:
        for what, (name, cls) in names.items():
            with pytest.raises(RpcError) as err:
                await asyncio.wait_for(c.call("snapshot-load", {"path": name}), 15)
            assert err.value.code in range(1000, 1100), (what, err.value.message)
            if cls:
                assert err.value.error_class == cls, (what, err.value.error_class)
            with pytest.raises(RpcError):
                await asyncio.wait_for(c.call("query-snapshot", {"path": name}), 15)
            assert (await c.call("query-status"))["status"] == "running", what
        # names a save may not write: it fails clearly before pausing, the VM goes on
        for name in ("no/dir/x.snap", "dir.snap", "fifo.snap", "empty.snap"):
            with pytest.raises(RpcError) as err:
                await c.call("snapshot-save", {"path": name})
            assert err.value.code in range(1000, 1100), (name, err.value.message)
            assert (await c.call("query-status"))["status"] == "running"
        await still_running(d, c)


@pytest.fixture
def small_fs(short_tmp):
    path = os.path.join(short_tmp, "mnt")
    os.mkdir(path)
    with small_tmpfs(path, "4m"):
        yield path


async def test_disk_full_during_save_keeps_the_earlier_snapshot(start_daemon, small_fs):
    d = await booted(start_daemon, snapshot_dir=small_fs)
    m = d.domain.machine
    snap = os.path.join(small_fs, "guest.snap")
    async with d.client() as c:
        first = await c.call("snapshot-save", {"path": "guest.snap"})
        before = hashlib.sha256(open(snap, "rb").read()).hexdigest()
        assert first["size"] > 0
        m.mem.write(MARK, os.urandom(8 * MIB))           # 8 MiB of data cannot fit in 4 MiB
        with pytest.raises(RpcError) as err:
            await c.call("snapshot-save", {"path": "guest.snap"})
        assert err.value.error_class and err.value.code in range(1000, 1100)
        assert "space" in err.value.message.lower() or "ENOSPC" in err.value.message, err.value.message
        assert os.listdir(small_fs) == ["guest.snap"], "a temporary file was left on the full disk"
        assert hashlib.sha256(open(snap, "rb").read()).hexdigest() == before
        described = await c.call("query-snapshot", {"path": "guest.snap"})
        assert described
        await still_running(d, c)
        # another name on the full disk fails the same way and leaves nothing behind
        with pytest.raises(RpcError):
            await c.call("snapshot-save", {"path": "other.snap"})
        assert os.listdir(small_fs) == ["guest.snap"]
        await still_running(d, c)


def handler_of(xen, nr):
    entry = xen.hypercalls._table[nr]
    return entry[0] if isinstance(entry, tuple) else entry


def swap_handler(xen, nr, fn) -> None:
    """Put ``fn`` in the dispatch table (entries are a handler, or (handler, arity))."""
    entry = xen.hypercalls._table[nr]
    xen.hypercalls._table[nr] = (fn, entry[1]) if isinstance(entry, tuple) else fn


async def test_handler_bug_becomes_an_errno_and_is_counted(start_daemon):
    d = await booted(start_daemon)
    xen = d.domain.xen
    nr = HC["xen_version"]
    real = handler_of(xen, nr)

    def broken(call, *args):
        raise KeyError("a bug in the handler")

    async with d.client() as c, d.client(timeout=0) as ev:
        events = EventLog(ev)
        await wait_for(lambda: d.daemon.events.subscribers == 1, 5)
        try:
            xen.native.set_enabled(False)      # the Python handler is the one under test
            swap_handler(xen, nr, broken)
            # the default guest asks xen_version at boot: reboot it into the broken handler
            await c.call("system_reset")
            await wait_for(lambda: xen.internal_errors > 0, 10, "the guest's xen_version call")
            hc = await c.call("query-hypercalls")
            assert hc["internal_errors"] >= 1
            assert hc["hypercalls"]["xen_version"]["errors"] >= 1
            assert (await c.call("query-status"))["status"] == "running"
            assert not events.named("GUEST_PANICKED")
        finally:
            swap_handler(xen, nr, real)
            xen.native.set_enabled(True)
            await events.close()


def test_handler_bug_returns_einval_to_the_guest(fuzz_guest, bits):
    g = fuzz_guest(bits)
    nr = HC["hvm_op"]
    calls = {"n": 0}

    def broken(call, *args):
        calls["n"] += 1
        return {}["no such key"]

    real = handler_of(g.xen, nr)
    swap_handler(g.xen, nr, broken)
    try:
        res = g.run([(nr, 10, 0), (HC["xen_version"], 0, 0), (nr, 0, 0)])
    finally:
        swap_handler(g.xen, nr, real)
    assert [r for r, _ in res][0] == -X.XEN_EINVAL and res[2][0] == -X.XEN_EINVAL
    assert res[1][0] > 0 and not any(clob for _, clob in res)
    assert g.xen.internal_errors == calls["n"] == 2
    g.check_alive()
    g.xen.internal_errors = 0      # the audit in fuzz_guest checks only memory


class ThreadDeath(BaseException):
    """Not an Exception: nothing on the vCPU thread's way catches it but its last resort."""


@pytest.mark.parametrize("where", ["decode_exit", "doorbell"])
async def test_vcpu_thread_dying_is_visible(start_daemon, where):
    """A vCPU thread that dies (an exception in its own loop, outside any handler, or one no
    handler guard catches) must show as internal-error with GUEST_PANICKED, not as a silent
    hang; a reset recovers."""
    d = await booted(start_daemon, start_paused=True)
    m = d.domain.machine
    async with d.client() as c, d.client(timeout=0) as ev:
        events = EventLog(ev)
        await wait_for(lambda: d.daemon.events.subscribers == 1, 5)
        vcpu = m.runners[0].vcpu
        port = next(iter(m.exits.doorbells))
        doorbell = m.exits.doorbells[port]

        def dies(*a, **kw):
            if where == "doorbell":
                raise ThreadDeath()
            raise RuntimeError("the vCPU thread breaks")

        if where == "doorbell":
            m.exits.doorbells[port] = dies
        else:
            vcpu.decode_exit = dies
        try:
            await c.call("cont")
            await wait_for(lambda: d.controller.state.value == "internal-error", 10,
                           "the internal-error state")
            status = await c.call("query-status")
            assert status["status"] == "internal-error" and not status["running"]
            panics = await events.wait("GUEST_PANICKED")
            assert panics[0]["data"]["reason"] == "internal-error"
            assert ("RuntimeError" if where == "decode_exit" else "ThreadDeath") \
                in panics[0]["data"].get("detail", "")
            shut = await events.wait("SHUTDOWN")
            assert shut[0]["data"]["reason"] == "internal-error"
            vcpus = await c.call("query-vcpus")
            assert vcpus[0]["state"] == "stopped"
        finally:
            m.exits.doorbells[port] = doorbell
            if "decode_exit" in vars(vcpu):
                del vcpu.decode_exit
        await c.call("system_reset")
        await wait_for(lambda: d.controller.state.value == "running", 10)
        await wait_for(lambda: d.domain.xen.hypercall_page is not None, 10)
        await still_running(d, c)
        await events.close()


@pytest.mark.slow
async def test_corrupt_snapshots_are_refused_long(start_daemon, request):
    await test_corrupt_snapshots_are_refused_and_the_vm_goes_on(start_daemon, request)


def test_truncating_a_loaded_snapshot_does_not_kill_the_daemon():
    import shutil
    import tempfile

    from .daemonproc import DaemonProc, wait_until

    tmp = tempfile.mkdtemp(prefix="xl-")
    d = DaemonProc(tmp, tcp=False, extra=["--on-poweroff", "pause"])
    try:
        wait_until(lambda: d.result("query-hypercalls")["hypercall_page"] is not None, 15, "guest")
        snap = os.path.join(tmp, "a.snap")
        d.result("snapshot-save", {"path": "a.snap"})
        d.result("snapshot-load", {"path": "a.snap"})
        d.result("stop")
        os.truncate(snap, 0)
        try:
            d.call("snapshot-save", {"path": "b.snap"})
        except (OSError, AssertionError, ValueError):
            pass
        try:
            d.proc.wait(2)          # a daemon that is dying has not always been reaped yet
        except subprocess.TimeoutExpired:
            pass
        assert d.alive(), f"the daemon died (exit status {d.proc.poll()})"
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_host_writes_during_the_move_off_the_snapshot_are_kept(tmp_path, request):
    """Threads other than the vCPUs write guest RAM too (the timer thread's time records in a
    registered vcpu_info, a reset loading the image): a write made at any moment of the move
    must survive it."""
    writes = scaled(20, 300, request)
    from xend_lite.vmm.domain import Domain
    from xend_lite.vmm.spec import DomainSpec

    d = Domain(DomainSpec(memory_mib=32))
    try:
        d.start()
        m = d.machine
        m.mem.write(MARK, os.urandom(8 * MIB))
        path = str(tmp_path / "r.snap")
        d.pause()
        d.snapshot_save(path)
        d.resume()
        rng = random.Random(5)
        lost = 0
        done = 0
        for _ in range(writes):
            d.pause()
            d.snapshot_load(path)
            d.resume()
            t0 = time.monotonic()
            assert d.detached.wait(10)
            took = time.monotonic() - t0
            d.pause()
            d.snapshot_load(path)
            d.resume()
            time.sleep(rng.uniform(0, took * 1.2))
            mark = os.urandom(4096)
            m.mem.write(MARK, mark)
            assert d.detached.wait(10)
            lost += m.mem.read(MARK, 4096) != mark
            done += 1
        print(f"\n{done} host writes during the move, {lost} lost")
        assert done == writes
        assert lost == 0, f"{lost} of {writes} host writes made during the move were lost"
    finally:
        d.close()


@pytest.mark.slow
def test_host_writes_during_the_move_off_the_snapshot_are_kept_long(tmp_path, request):
    test_host_writes_during_the_move_off_the_snapshot_are_kept(tmp_path, request)
