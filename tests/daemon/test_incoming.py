"""--incoming: a daemon that builds no VM until snapshot-load, which creates the VM the file
describes (its RAM size and vCPUs, not the daemon's settings) and runs it. A bad file, or a
second load while the first runs, gets a clear error and the daemon keeps waiting."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from tests.daemon.conftest import wait_for
from xend_lite.cli.ctl import RpcError
from xend_lite.daemon.service import real_domain_factory

pytestmark = pytest.mark.kvm

COUNTER = 0x300000        # tests/xen/guests/counter64.S


async def call(d, method, params=None):
    async with d.client() as c:
        return await c.call(method, params)


def counter(d) -> int:
    return struct.unpack("<Q", d.domain.machine.mem.read(COUNTER, 8))[0]


@pytest.fixture
async def saved(start_daemon, guest_image, short_tmp):
    """A 48 MiB, 2-vCPU counting guest saved to counter.snap; the saving daemon is gone."""
    img = os.path.join(short_tmp, "counter64.elf")
    with open(img, "wb") as f:
        f.write(guest_image("xen/guests/counter64.S"))
    src = await start_daemon(factory=real_domain_factory, image=img, memory_mib=48, vcpus=2,
                             socket=os.path.join(short_tmp, "src.sock"))
    await wait_for(lambda: counter(src) > 1000, 10, "the guest to count")
    await call(src, "snapshot-save", {"path": "counter.snap", "paused": True})
    at_save = counter(src)
    await src.stop()
    return at_save


async def test_incoming_waits_then_restores_a_guest_that_goes_on(start_daemon, saved, short_tmp):
    d = await start_daemon(factory=real_domain_factory, incoming=True,
                           socket=os.path.join(short_tmp, "in.sock"))
    assert d.domain is None
    assert (await call(d, "query-status"))["status"] == "incoming"
    with pytest.raises(RpcError) as e:
        await call(d, "query-vcpus")
    assert e.value.error_class == "StateError"

    with open(os.path.join(d.cfg.snapshot_dir, "bad.snap"), "wb") as f:
        f.write(b"not a snapshot" * 100)
    with pytest.raises(RpcError) as e:
        await call(d, "snapshot-load", {"path": "bad.snap"})
    assert e.value.error_class == "BadMagic"     # not a snapshot at all
    with pytest.raises(RpcError) as e:
        await call(d, "snapshot-load", {"path": "missing.snap"})
    assert e.value.error_class == "NotFound"
    assert (await call(d, "query-status"))["status"] == "incoming" and d.domain is None

    reader = d.controller.console.attach(write=False)
    res = await call(d, "snapshot-load", {"path": "counter.snap"})
    assert res["memory_mib"] == 48 and res["vcpus"] == 2     # the file's shape, not the default
    d.domain.machine.console.write(b"from the restored guest")   # as its console port does
    assert await asyncio.wait_for(reader.get(), 5) == b"from the restored guest"
    assert (await call(d, "query-status"))["status"] == "running"
    m = d.domain.machine
    assert m.memory_bytes == 48 << 20 and len(m.runners) == 2
    assert counter(d) >= saved
    first = counter(d)
    await wait_for(lambda: counter(d) > first + 1000, 10, "the restored guest to go on counting")

    # the VM exists now: a second load is the ordinary in-place one, and a file that does
    # not fit is refused with the guest left running
    with pytest.raises(RpcError) as e:
        await call(d, "snapshot-load", {"path": "bad.snap"})
    assert e.value.error_class == "BadMagic"     # not a snapshot at all
    assert (await call(d, "query-status"))["status"] == "running"
    later = counter(d)
    await wait_for(lambda: counter(d) > later + 1000, 10, "the guest to go on after the refusal")


async def test_a_second_load_during_the_first_is_refused(start_daemon, saved, short_tmp):
    d = await start_daemon(factory=real_domain_factory, incoming=True,
                           socket=os.path.join(short_tmp, "in.sock"))
    results = await asyncio.gather(call(d, "snapshot-load", {"path": "counter.snap"}),
                                   call(d, "snapshot-load", {"path": "counter.snap"}),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], RpcError), results
    assert errors[0].error_class == "StateError"
    assert "restoring" in str(errors[0])
    assert (await call(d, "query-status"))["status"] == "running"


async def test_a_load_refused_once_the_vm_is_built_leaves_a_new_standby(start_daemon, saved, short_tmp):
    """The standby VM is spent by a load that reached it: the daemon makes another, keeps
    waiting, and the next load runs on it."""
    from tests.vmm.test_incoming import _with_bad_xen_state

    d = await start_daemon(factory=real_domain_factory, incoming=True,
                           socket=os.path.join(short_tmp, "in.sock"))
    snapdir = d.cfg.snapshot_dir
    first = d.controller._incoming.standby
    assert first is not None
    _with_bad_xen_state(os.path.join(snapdir, "counter.snap"), os.path.join(snapdir, "bad.snap"))
    with pytest.raises(RpcError) as e:
        await call(d, "snapshot-load", {"path": "bad.snap"})
    assert "names vcpu 9" in str(e.value)
    assert (await call(d, "query-status"))["status"] == "incoming" and d.domain is None
    second = d.controller._incoming.standby
    assert second is not None and second is not first and first.vm.fd < 0
    res = await call(d, "snapshot-load", {"path": "counter.snap"})
    assert d.domain.machine.vm is second.vm
    assert set(res["phases"]) == {"queue", "open", "build", "load", "start", "reply"}
    first_count = counter(d)
    await wait_for(lambda: counter(d) > first_count + 1000, 10, "the restored guest to count")


async def test_a_standby_that_cannot_serve_the_file_gives_way_to_a_new_vm(start_daemon, saved,
                                                                          short_tmp):
    d = await start_daemon(factory=real_domain_factory, incoming=True, vcpus=4,
                           socket=os.path.join(short_tmp, "in.sock"))
    standby = d.controller._incoming.standby
    assert len(standby.vcpus) == 4                       # the daemon's settings
    res = await call(d, "snapshot-load", {"path": "counter.snap"})
    assert res["vcpus"] == 2 and len(d.domain.machine.runners) == 2
    assert d.domain.machine.vm is not standby.vm and standby.vm.fd < 0
    assert (await call(d, "query-status"))["status"] == "running"
    first = counter(d)
    await wait_for(lambda: counter(d) > first + 1000, 10, "the restored guest to count")


async def test_incoming_and_restore_exclude_each_other(short_tmp):
    from xend_lite.daemon.main import main

    assert main(["--incoming", "--restore", os.path.join(short_tmp, "x.snap"),
                 "--socket", os.path.join(short_tmp, "s.sock")]) == 78


WARM_THEN_LOAD = r"""
import sys
from xend_lite.daemon.config import DaemonConfig
from xend_lite.daemon.controller import _incoming, _warm_up
from xend_lite.snapshot.confine import ConfinedPath

root, name = sys.argv[1], sys.argv[2]
incoming = _warm_up(DaemonConfig(incoming=True, snapshot_dir=root), _incoming)
before = set(sys.modules)
domain, _ = incoming.restore(None, ConfinedPath(root, name), True)
domain.start()
domain.close()
print(" ".join(sorted(set(sys.modules) - before)))
"""


def test_the_first_load_after_the_warm_up_imports_nothing(saved, short_tmp):
    """What the waiting daemon loads ahead covers the whole load path (ctypes for the
    confined open among it, about 2 ms to import): the load imports no module of its own."""
    import subprocess
    import sys

    snapdir = os.path.join(short_tmp, "snap")      # the saving daemon's (conftest)
    assert os.path.exists(os.path.join(snapdir, "counter.snap"))
    out = subprocess.run([sys.executable, "-c", WARM_THEN_LOAD, snapdir, "counter.snap"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []
