"""The daemon with the real Domain on /dev/kvm: the embedded default guest (it prints to the
console and maps shared_info at 0x400000), every method, events, snapshots, and the
process as it ships (`xend-lite` with no guest options)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct

import pytest

from tests.daemon.conftest import wait_for
from tests.daemon.test_control import Events
from tests.daemon.test_process import REAL, answers, ctl, spawn, stop, wait_listening
from xend_lite.cli.ctl import RpcError
from xend_lite.daemon.service import real_domain_factory

pytestmark = pytest.mark.kvm

SHARED_INFO = 0x400000


async def call(d, method, params=None):
    async with d.client() as c:
        return await c.call(method, params)


async def booted(start_daemon, **kw):
    kw.setdefault("memory_mib", 64)
    d = await start_daemon(factory=real_domain_factory, **kw)
    if not kw.get("start_paused"):
        await wait_mapped(d)
    return d


async def wait_mapped(d):
    """Until the guest has mapped shared_info and its event has gone out (so a stream
    opened afterwards starts with what the test does next)."""
    async def mapped():
        pages = await call(d, "query-xen-overlay")
        return any(p["page"] == "shared_info" and p["gpa"] == SHARED_INFO for p in pages) and \
            any(e["event"] == "XEN_OVERLAY_MAPPED" for e in d.daemon.events.history)

    for _ in range(300):
        if await mapped():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the default guest did not map shared_info")


async def test_default_guest_through_every_query(start_daemon):
    d = await booted(start_daemon)
    assert (await call(d, "query-status")) == {"status": "running", "running": True, "singlestep": False,
                                                "qmp-status": "running"}
    assert (await call(d, "query-version"))["xen"] == "4.16"
    caps = await call(d, "query-capabilities")
    assert caps["backend"] in ("userspace", "kvm-xen") and caps["domid"] == 1
    vcpus = await call(d, "query-vcpus")
    assert len(vcpus) == 1 and vcpus[0]["cpu"] == 0
    regions = await call(d, "query-memory-map")
    assert {"gpa": SHARED_INFO, "size": 4096, "kind": "overlay", "name": "shared_info"} in regions
    await wait_for(lambda: b"hello through the Xen console" in d.domain.machine.console.tail(4096), 10)
    console = (await call(d, "query-console", {"max_bytes": 4096}))["data"]
    assert "hello through the Xen console" in console
    hc = await call(d, "query-hypercalls")
    assert hc["total"] >= 1
    with pytest.raises(RpcError) as e:
        await call(d, "query-snapshot", {"path": "none.snap"})
    assert e.value.error_class == "NotFound"


async def test_stop_cont_reset_with_the_real_guest(start_daemon):
    d = await booted(start_daemon)
    async with Events(d.client()) as ev:
        await call(d, "stop")
        assert d.domain.run_state() == "paused"
        await call(d, "cont")
        await call(d, "system_reset")
        await ev.until("RESET")
        await wait_for(lambda: "XEN_OVERLAY_MAPPED" in ev.names()[ev.names().index("RESET"):], 15,
                       "the guest to map shared_info again after the reset")
    names = ev.names()
    assert names[:3] == ["STOP", "RESUME", "RESET"]
    remap = ev.items[names.index("RESET") + 1:]
    assert {"event": "XEN_OVERLAY_MAPPED"}.items() <= remap[0].items()
    assert remap[0]["data"]["page"] == "shared_info" and remap[0]["data"]["gpa"] == SHARED_INFO
    assert (await call(d, "query-status"))["status"] == "running"


async def test_guest_boot_events_when_started_paused(start_daemon):
    d = await booted(start_daemon, start_paused=True)
    assert (await call(d, "query-status"))["status"] == "paused"
    async with Events(d.client()) as ev:
        await call(d, "cont")
        await ev.until("XEN_OVERLAY_MAPPED", timeout=15)
    assert ev.names()[0] == "RESUME"
    mapped = ev.items[ev.names().index("XEN_OVERLAY_MAPPED")]["data"]
    assert mapped["page"] == "shared_info" and mapped["gpa"] == SHARED_INFO


async def test_overlay_through_rpc(start_daemon):
    d = await booted(start_daemon)
    async with Events(d.client()) as ev:
        entry = await call(d, "xen-overlay-map", {"page": "grant:0", "gpa": 0x600000})
        assert entry["page"] == "grant:0" and entry["gpa"] == 0x600000
        await call(d, "xen-overlay-unmap", {"page": "grant:0"})
        await ev.until("XEN_OVERLAY_UNMAPPED")
    assert ev.names()[:2] == ["XEN_OVERLAY_MAPPED", "XEN_OVERLAY_UNMAPPED"]
    with pytest.raises(RpcError) as e:
        await call(d, "xen-overlay-map", {"page": "grant:0", "gpa": 0x600001})
    assert e.value.code == 1001
    with pytest.raises(RpcError) as e:
        await call(d, "xen-overlay-map", {"page": "no-such-page", "gpa": 0x600000})
    assert e.value.code in (1001, 1002)


async def test_snapshot_round_trip_with_the_real_guest(start_daemon):
    d = await booted(start_daemon)
    async with Events(d.client()) as ev:
        saved = await call(d, "snapshot-save", {"path": "real.snap"})
        await ev.until("SNAPSHOT_SAVED")
        assert saved["size"] > 0 and os.path.exists(saved["path"])
        assert (await call(d, "query-status"))["status"] == "running"
        info = await call(d, "query-snapshot", {"path": "real.snap"})
        assert any(s["name"] == "xen_overlay" for s in info["sections"])
        await call(d, "xen-overlay-map", {"page": "shared_info", "gpa": 0x800000, "force": True})
        await call(d, "snapshot-load", {"path": "real.snap"})
        await ev.until("SNAPSHOT_LOADED")
    names = [n for n in ev.names() if n != "SNAPSHOT_PROGRESS"]
    assert names[:3] == ["STOP", "RESUME", "SNAPSHOT_SAVED"], ev.items
    saving = [e["data"] for e in ev.items if e["event"] == "SNAPSHOT_PROGRESS"
              and e["data"]["kind"] == "save"]
    assert saving[-1]["percent"] == 100 and saving[-1]["bytes"] == saving[-1]["total"] > 0
    pages = {p["page"]: p["gpa"] for p in await call(d, "query-xen-overlay")}
    assert pages["shared_info"] == SHARED_INFO
    assert (await call(d, "query-status"))["status"] == "running"


async def test_guest_poweroff_with_a_code_ends_the_daemon(start_daemon, guest_image, tmp_path):
    """A guest that calls SCHEDOP_shutdown_code then SCHEDOP_shutdown(poweroff): the daemon
    sends SHUTDOWN with the code and exits with it."""
    from tests.xen.conftest import ALIAS, ENTRY, HCPAGE, SCRATCH, TABLE
    from xend_lite.xen.xenabi import X
    from xend_lite.vmm.domain import Domain

    sched_op = getattr(X, "__HYPERVISOR_sched_op")

    img = tmp_path / "hcall64.elf"
    img.write_bytes(guest_image("xen/guests/hcall.S", bits=64))

    def factory(cfg, emit):
        dom = Domain(cfg, emit)
        mem = dom.machine.mem
        mem.write(SCRATCH, struct.pack("<I", 9))
        mem.write(SCRATCH + 8, struct.pack("<I", X.SHUTDOWN_poweroff))
        calls = [(sched_op, X.SCHEDOP_shutdown_code, ALIAS + SCRATCH),
                 (sched_op, X.SCHEDOP_shutdown, ALIAS + SCRATCH + 8)]
        table = bytearray(struct.pack("<QQ", len(calls), HCPAGE).ljust(64, b"\0"))
        for nr, a1, a2 in calls:
            table += struct.pack("<6QQQ", nr, a1, a2, 0, 0, 0, 0, 0).ljust(ENTRY, b"\0")
        mem.write(TABLE, bytes(table))
        return dom

    d = await start_daemon(factory=factory, image=str(img), memory_mib=64, start_paused=True)
    async with Events(d.client()) as ev:
        await call(d, "cont")
        status = await asyncio.wait_for(d.daemon.wait(), 20)
        await ev.until("SHUTDOWN")
    assert status == 9
    shutdown = ev.items[ev.names().index("SHUTDOWN")]["data"]
    assert shutdown["reason"] == "poweroff" and shutdown["code"] == 9 and shutdown["guest"] is True


# -- the process as it ships ---------------------------------------------------------------

def test_xend_lite_runs_the_default_guest(short_tmp):
    sock = os.path.join(short_tmp, "x.sock")
    log = os.path.join(short_tmp, "console.log")
    proc = spawn(["--socket", sock, "--snapshot-dir", short_tmp, "--memory", "64", "--console-log", log],
                 cmd=REAL)
    wait_listening(proc, sock, timeout=30)
    for _ in range(200):
        overlay = json.loads(ctl(sock, "query-xen-overlay").stdout)
        if any(p["page"] == "shared_info" and p["gpa"] == SHARED_INFO for p in overlay):
            break
    else:
        raise AssertionError("shared_info was not mapped")
    # the inspection tools, loaded at their first use (a start leaves them out)
    (vcpu,) = json.loads(ctl(sock, "query-vcpus", "registers=true").stdout)
    rip = vcpu["general"]["rip"]
    read = json.loads(ctl(sock, "x-read-memory", f"gva={rip}", "size=8").stdout)  # page walk
    assert read["size"] == 8 and read["gva"] == rip
    r = ctl(sock, "snapshot-save", "path=boot.snap")
    assert r.returncode == 0, r.stderr
    rc, err = stop(proc, signal.SIGTERM, timeout=20)
    assert rc == 0, err
    assert not answers(sock) and not os.path.exists(sock)
    with open(log, "rb") as f:
        assert b"hello through the Xen console" in f.read()
    # and it comes back from the snapshot, paused
    proc = spawn(["--socket", sock, "--snapshot-dir", short_tmp, "--memory", "64", "-S",
                  "--restore", os.path.join(short_tmp, "boot.snap")], cmd=REAL)
    wait_listening(proc, sock, timeout=30)
    assert json.loads(ctl(sock, "query-status").stdout)["status"] == "paused"
    overlay = json.loads(ctl(sock, "query-xen-overlay").stdout)
    assert any(p["page"] == "shared_info" and p["gpa"] == SHARED_INFO for p in overlay)
    assert ctl(sock, "cont").returncode == 0
    rc, err = stop(proc, signal.SIGTERM, timeout=20)
    assert rc == 0, err
