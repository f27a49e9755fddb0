"""xen-overlay-map over every kind of address, through RPC, with the default guest running:
RAM, the reserved xenstore and console pages (the last pages of RAM), the hypercall page,
address 0, the holes beyond RAM and above 4 GiB, the last page the guest's physical bits
reach: each maps, and the RAM beneath is intact once the page moves away or goes. Unaligned
addresses, addresses beyond the physical bits, a frame another page holds, bad page names
and values that are not u64 get a clear error and change nothing."""

from __future__ import annotations

import asyncio

import pytest

from xend_lite.cli.ctl import RpcError
from xend_lite.daemon.service import real_domain_factory
from xend_lite.xen.hypercall import HYPERCALL_PAGE

from .conftest import scaled, wait_for
from .test_faults import still_running

pytestmark = pytest.mark.kvm

PAGE = 4096
MIB = 1 << 20
INVALID = (1 << 64) - 1


async def booted(start_daemon, memory_mib=64):
    d = await start_daemon(factory=real_domain_factory, memory_mib=memory_mib)
    await wait_for(lambda: d.domain.xen.hypercall_page is not None
                   and d.domain.overlay.gpa("shared_info") is not None, 15,
                   "the default guest to install its hypercall page and map shared_info")
    return d


async def map_page(c, page, gpa):
    return await c.call("xen-overlay-map", {"page": page, "gpa": gpa})


def address_kinds(d) -> dict[str, int]:
    m = d.domain.machine
    ram = m.memory_bytes
    xen = d.domain.xen
    return {
        "ram": 8 * MIB,
        "address 0": 0,
        "hypercall page": xen.hypercall_page,
        "just beyond RAM": ram,
        "hole below 4 GiB": 0xFEE00000,
        "KVM's TSS pages": 0xFFFBD000,
        "above 4 GiB": 1 << 32,
        "last page of the physical address space": (1 << m.phys_bits) - PAGE,
    }


async def test_the_ring_pages_cannot_be_overlaid(start_daemon):
    """The xenstore and console rings are pages the guest was told of: an operator overlay
    over them would cut the guest off from its store and console. Refused, nothing changes."""
    d = await booted(start_daemon)
    xen = d.domain.xen
    async with d.client() as c:
        for gpa in (xen.store_gpa, xen.console_gpa):
            with pytest.raises(RpcError) as err:
                await c.call("xen-overlay-map", {"page": "grant:3", "gpa": gpa})
            assert err.value.error_class == "InvalidArgument" and "ring page" in err.value.message
            with pytest.raises(RpcError):
                await c.call("xen-overlay-map", {"page": "grant:3", "gpa": gpa, "force": True})
        assert d.domain.overlay.gpa("grant:3") is None
        await still_running(d, c)


async def test_overlay_over_every_kind_of_address(start_daemon):
    d = await booted(start_daemon)
    m = d.domain.machine
    async with d.client() as c:
        calls_before = (await c.call("query-hypercalls"))["total"]
        for what, gpa in address_kinds(d).items():
            backed = m.mem.is_backed(gpa, PAGE)
            # the operator works with the VM paused for pages the guest itself runs on
            pause = what == "hypercall page"
            if pause:
                await c.call("stop")
            before = m.mem.read(gpa, PAGE) if backed else None
            entry = await map_page(c, "grant:3", gpa)
            assert entry == {"page": "grant:3", "gpa": gpa, "size": PAGE, "by": "operator",
                             "backend": entry["backend"]}, what
            d.domain.overlay.pages["grant:3"].view[:8] = b"OVERLAY!"
            assert m.mem.read(gpa, 8) == b"OVERLAY!", f"{what}: the guest does not see the page"
            # moving it (mapping again elsewhere) leaves the old frame as it was
            await map_page(c, "grant:3", 6 * MIB)
            if backed:
                assert m.mem.read(gpa, PAGE) == before, f"{what}: RAM beneath changed"
            else:
                assert not m.mem.is_backed(gpa, PAGE), f"{what}: a hole stayed backed"
            await map_page(c, "grant:3", gpa)
            unmapped = await map_page(c, "grant:3", INVALID)
            assert unmapped["gpa"] is None
            if backed:
                assert m.mem.read(gpa, PAGE) == before, f"{what}: RAM beneath changed"
            if what == "hypercall page":
                assert before == HYPERCALL_PAGE
                await c.call("cont")
            assert (await c.call("query-status"))["status"] == "running", what
        # the guest went on making hypercalls the whole time, and none failed inside the daemon
        await asyncio.sleep(1.2)
        hc = await c.call("query-hypercalls")
        assert hc["internal_errors"] == 0 and hc["total"] > calls_before
        assert d.domain.machine.status is None


@pytest.mark.parametrize("gpa,code,cls", [
    (1, 1001, "InvalidArgument"),                       # unaligned
    (0x400800, 1001, "InvalidArgument"),
    (INVALID - PAGE + 1, 1001, "InvalidArgument"),       # the last page of 2^64: beyond phys bits
    ("phys", 1001, "InvalidArgument"),                   # exactly 2^phys_bits
    (1 << 63, 1001, "InvalidArgument"),
    (1 << 64, -32602, "InvalidParams"),                  # not a u64
    (-4096, -32602, "InvalidParams"),
    (4096.0, -32602, "InvalidParams"),
    ("0x1000", -32602, "InvalidParams"),
    (True, -32602, "InvalidParams"),
    (None, -32602, "InvalidParams"),
])
async def test_bad_overlay_addresses_are_refused_and_change_nothing(start_daemon, gpa, code, cls):
    d = await booted(start_daemon, memory_mib=32)
    if gpa == "phys":
        gpa = 1 << d.domain.machine.phys_bits
    async with d.client() as c:
        before = await c.call("query-xen-overlay")
        with pytest.raises(RpcError) as err:
            await map_page(c, "grant:0", gpa)
        assert err.value.code == code and err.value.error_class == cls, err.value.message
        assert "Traceback" not in err.value.message
        assert await c.call("query-xen-overlay") == before
        assert (await c.call("query-status"))["status"] == "running"


async def test_frame_held_by_another_page_and_bad_names(start_daemon):
    d = await booted(start_daemon, memory_mib=32)
    async with d.client() as c:
        si = d.domain.overlay.gpa("shared_info")
        with pytest.raises(RpcError) as err:
            await map_page(c, "grant:0", si)
        assert err.value.error_class == "InvalidArgument"
        for page, cls in (("grant:64", "NotFound"), ("grant:-1", "InvalidArgument"),
                          ("grant:01", "InvalidArgument"), ("shared_info ", "InvalidArgument"),
                          ("x" * 10000, "InvalidArgument"), ("grant:99999999", "InvalidArgument")):
            with pytest.raises(RpcError) as err:
                await map_page(c, page, 8 * MIB)
            assert err.value.error_class == cls, (page, err.value.message)
        for page in ("", 5, None, ["shared_info"], "a\0b"):
            with pytest.raises(RpcError) as err:
                await map_page(c, page, 8 * MIB)
            assert err.value.code == -32602
        assert d.domain.overlay.gpa("shared_info") == si
        assert (await c.call("query-status"))["status"] == "running"


async def test_overlay_map_storm_over_random_addresses(start_daemon, request):
    """Maps, moves and unmaps of several pages over random frames of every kind while the
    guest runs; at the end every RAM page touched reads as before."""
    import random

    rpcs = scaled(300, 3000, request)

    d = await booted(start_daemon, memory_mib=32)
    m = d.domain.machine
    rng = random.Random(7)
    kinds = list(address_kinds(d).values())
    pages = ["grant:0", "grant:1", "grant:2"]
    ram_end = m.memory_bytes
    snapshot = {}
    async with d.client() as c:
        sent = 0
        while sent < rpcs:
            gpa = rng.choice(kinds + [rng.randrange(0, ram_end, PAGE) for _ in range(3)])
            if gpa in (d.domain.xen.hypercall_page, d.domain.overlay.gpa("shared_info")):
                continue
            if gpa < 0x500000:
                continue            # the guest's image, stack and page tables: it would crash
            if m.mem.is_backed(gpa, PAGE) and gpa not in snapshot and \
                    gpa not in m.memmap.overlays().values():
                snapshot[gpa] = m.mem.read(gpa, PAGE)
            try:
                await map_page(c, rng.choice(pages), rng.choice([gpa, gpa, INVALID]))
            except RpcError as exc:
                assert exc.error_class == "InvalidArgument", exc.message
            sent += 1
        print(f"\n{sent} overlay map/move/unmap calls, {len(snapshot)} RAM pages checked")
        assert sent == rpcs
        for p in pages:
            await map_page(c, p, INVALID)
        rings = (d.domain.xen.store_gpa, d.domain.xen.console_gpa)   # the daemon writes those
        for gpa, data in snapshot.items():
            if gpa not in rings:
                assert m.mem.read(gpa, PAGE) == data, hex(gpa)
        assert (await c.call("query-status"))["status"] == "running"
        assert (await c.call("query-hypercalls"))["internal_errors"] == 0


@pytest.mark.slow
async def test_overlay_map_storm_over_random_addresses_long(start_daemon, request):
    await test_overlay_map_storm_over_random_addresses(start_daemon, request)
