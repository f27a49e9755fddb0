"""system_powerdown through the daemon, seen by a real guest (guests/ringclient64.S, see
tests/xen/ringclient.py) that watches control/shutdown as a PV guest's shutdown driver does,
reads "poweroff" there and shuts down."""

from __future__ import annotations

import asyncio
import struct

import pytest

from tests.daemon.test_control import Events
from tests.xen.ringclient import CTL, HCALL, OP_SIZE, PROG, RingGuest
from xend_lite.cli.ctl import RpcError
from xend_lite.vmm.domain import Domain
from xend_lite.vmm.spec import DomainSpec
from xend_lite.xen.xenabi import X
from xend_lite.xen.xenstore.protocol import HEADER, XsType

pytestmark = pytest.mark.kvm


async def call(d, method, params=None):
    async with d.client() as c:
        return await c.call(method, params)


def watch_events(g: RingGuest) -> list[bytes]:
    return [p for t, _r, _x, p in g.replies() if t == XsType.WATCH_EVENT]


def shut_down(g: RingGuest, reason: int) -> None:
    """The guest's last op: SCHEDOP_shutdown(reason) (not waited for: it does not return)."""
    arg = g.data(struct.pack("<I", reason))
    g.mem.write(PROG + g._count * OP_SIZE, struct.pack(
        "<4Q", HCALL, getattr(X, "__HYPERVISOR_sched_op"), X.SCHEDOP_shutdown, arg))
    g._count += 1
    g.mem.write(CTL, struct.pack("<Q", g._count))


async def test_system_powerdown_ends_a_guest_that_watches_control_shutdown(start_daemon,
                                                                          guest_path):
    image = str(guest_path("xen/guests/ringclient64.S"))
    made: list[RingGuest] = []

    def factory(cfg, emit):
        g = RingGuest(image, memory_mib=64)
        g.domain._emit = emit          # the daemon hears the guest's shutdown
        made.append(g)
        return g.domain

    d = await start_daemon(factory=factory, image=image, memory_mib=64)
    g = made[0]
    await asyncio.to_thread(g.wait, lambda: g.ctl(8) > 0, 10, "the guest to read its params")
    t, _ = await asyncio.to_thread(g.ask, XsType.WATCH, b"control/shutdown", b"pd", req_id=1)
    assert t == XsType.WATCH
    event = b"control/shutdown\0pd\0"
    total = HEADER.size + len(b"OK\0") + HEADER.size + len(event)    # reply bytes in all
    await asyncio.to_thread(g.xs_wait, total)
    assert watch_events(g) == [event]              # the watch's first firing
    async with Events(d.client()) as ev:
        assert await call(d, "system_powerdown") == {}
        # the request fires the guest's watch, as a toolstack's write does
        total += HEADER.size + len(event)
        await asyncio.to_thread(g.xs_wait, total)
        assert watch_events(g) == [event, event]
        t, value = await asyncio.to_thread(g.ask, XsType.READ, b"control/shutdown", req_id=2)
        assert (t, value) == (XsType.READ, b"poweroff")
        assert d.controller.state.value == "running"   # it returned before the guest acted
        shut_down(g, X.SHUTDOWN_poweroff)
        status = await asyncio.wait_for(d.daemon.wait(), 20)
        await ev.until("SHUTDOWN")
    assert status == 0
    names = ev.names()
    assert names.index("POWERDOWN") < names.index("SHUTDOWN")
    assert ev.items[names.index("SHUTDOWN")]["data"]["reason"] == "poweroff"


async def test_guest_control_needs_a_xen_guest(start_daemon):
    """A plain KVM VM has no console ring and no xenstore: a clear NotSupported."""
    def factory(cfg, emit):
        return Domain(DomainSpec.from_config(cfg).replace(xen=False), emit)

    d = await start_daemon(factory=factory, memory_mib=64, start_paused=True)
    for method, params in (("console-write", {"data": "x"}), ("system_powerdown", None),
                           ("xenstore-read", {"path": "name"})):
        with pytest.raises(RpcError) as e:
            await call(d, method, params)
        assert (e.value.code, e.value.error_class) == (1004, "NotSupported"), method
