"""Looking inside a real guest through the daemon: event channels listed and injected into a
guest that blocks for them (guests/evtwait64.S), guest memory read beneath, through and above
the shared_info overlay, dumps to the snapshot directory, and registers."""

from __future__ import annotations

import asyncio
import base64
import os
import struct

import pytest

from tests.daemon.test_kvm import call
from xend_lite.cli.ctl import RpcError
from xend_lite.vmm.domain import Domain

pytestmark = pytest.mark.kvm

SHINFO = 0x800000
COUNT, PORT, STATE, SEEN = 0x300000, 0x300008, 0x300010, 0x300040
MARKS = SHINFO + 2560 + 60 * 8
EXPECTED_MARKS = struct.pack("<4Q", *(0x5A17C0DE00000000 + i for i in range(4)))
BENEATH = bytes(range(256)) * 16            # RAM under the overlay page, planted before boot
ABOVE = b"\xc3\x3c" * 2048                  # the page after it


async def read(d, size: int, **where) -> bytes:
    r = await call(d, "x-read-memory", dict(where, size=size))
    assert r["size"] == size
    return base64.b64decode(r["data"])


async def word(d, gpa: int) -> int:
    return struct.unpack("<Q", await read(d, 8, gpa=gpa))[0]


async def until(pred, what: str, timeout: float = 20.0):
    for _ in range(int(timeout / 0.02)):
        if await pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def error_of(d, method, params) -> RpcError:
    with pytest.raises(RpcError) as info:
        await call(d, method, params)
    return info.value


@pytest.fixture
async def waiting(start_daemon, guest_image, tmp_path):
    """The daemon running evtwait64 until the guest blocks waiting for its port."""
    img = tmp_path / "evtwait64.elf"
    img.write_bytes(guest_image("daemon/guests/evtwait64.S", bits=64))

    def factory(cfg, emit):
        dom = Domain(cfg, emit)
        dom.machine.mem.write(SHINFO, BENEATH)
        dom.machine.mem.write(SHINFO + 4096, ABOVE)
        return dom

    d = await start_daemon(factory=factory, image=str(img), memory_mib=64)

    async def blocked():
        return await word(d, STATE) == 1
    await until(blocked, "the guest to block")
    return d


async def test_an_injected_event_reaches_a_guest_that_blocks_for_it(waiting):
    d = waiting
    port = await word(d, PORT)
    assert port > 0
    listed = {p["port"]: p for p in await call(d, "xen-event-list")}
    assert listed[port] == {"port": port, "vcpu": 0, "type": "unbound", "remote-domain": "0",
                            "target": 0, "pending": False, "masked": False}
    await asyncio.sleep(0.3)
    assert await word(d, COUNT) == 0, "nothing was injected yet, the guest must still wait"

    assert await call(d, "xen-event-inject", {"port": port}) == {}

    async def arrived():
        return await word(d, STATE) == 2
    await until(arrived, "the upcall")
    assert await word(d, COUNT) == 1
    console = (await call(d, "query-console"))["data"]
    assert f"upcall port {chr(ord('0') + port)} arrived" in console
    after = {p["port"]: p for p in await call(d, "xen-event-list")}
    assert after[port]["pending"] is True       # the guest's handler does not clear it


async def test_event_inject_errors(waiting):
    d = waiting
    port = await word(d, PORT)
    for bad in (0, 4096, 1 << 31):
        err = await error_of(d, "xen-event-inject", {"port": bad})
        assert err.error_class == "InvalidArgument" and "out of range" in err.message
    closed = await error_of(d, "xen-event-inject", {"port": port + 1})
    assert closed.error_class == "NotFound" and "closed" in closed.message
    for bad in (-1, "1", 1 << 32, None):
        assert (await error_of(d, "xen-event-inject", {"port": bad})).code == -32602
    assert await word(d, COUNT) == 0          # no refused injection reached the guest


async def test_memory_beneath_through_and_above_the_overlay(waiting):
    d = waiting
    seen = await read(d, 32, gpa=SEEN)
    assert seen == EXPECTED_MARKS              # what the guest read from its shared_info
    assert await read(d, 32, gpa=MARKS) == seen
    assert await read(d, 32, gva=MARKS) == seen          # through its identity page tables
    assert await read(d, 64, gpa=SHINFO + 4096) == ABOVE[:64]
    assert await read(d, 64, gva=SHINFO + 4096 - 32) == (await read(d, 32, gpa=SHINFO + 4096 - 32)) + ABOVE[:32]
    # with the overlay gone the RAM beneath shows, as it was planted
    await call(d, "xen-overlay-unmap", {"page": "shared_info", "force": True})
    off = MARKS - SHINFO
    assert await read(d, 32, gpa=MARKS) == BENEATH[off:off + 32]


async def test_dumps_go_to_new_files_in_the_snapshot_directory(waiting):
    d = waiting
    snap = d.cfg.snapshot_dir
    r = await call(d, "pmemsave", {"val": SHINFO, "size": 8192, "filename": "phys.bin"})
    assert r == {"filename": "phys.bin", "size": 8192}
    phys = open(os.path.join(snap, "phys.bin"), "rb").read()
    off = MARKS - SHINFO
    assert phys[off:off + 32] == EXPECTED_MARKS and phys[4096:] == ABOVE
    await call(d, "memsave", {"val": SHINFO, "size": 8192, "filename": "virt.bin", "cpu-index": 0})
    assert open(os.path.join(snap, "virt.bin"), "rb").read()[4096:] == ABOVE

    again = await error_of(d, "pmemsave", {"val": 0, "size": 16, "filename": "phys.bin"})
    assert again.error_class == "InvalidArgument" and "exists" in again.message
    assert open(os.path.join(snap, "phys.bin"), "rb").read() == phys
    for name in ("../out.bin", "/tmp/out.bin"):
        err = await error_of(d, "pmemsave", {"val": 0, "size": 16, "filename": name})
        assert err.error_class == "InvalidArgument"
    os.symlink("/tmp", os.path.join(snap, "out"))
    err = await error_of(d, "pmemsave", {"val": 0, "size": 16, "filename": "out/x.bin"})
    assert err.error_class == "InvalidArgument" and not os.path.exists("/tmp/x.bin")
    unbacked = await error_of(d, "pmemsave", {"val": 1 << 40, "size": 16, "filename": "hole.bin"})
    assert unbacked.error_class == "GuestMemoryError"
    assert not os.path.exists(os.path.join(snap, "hole.bin"))   # a failed dump leaves nothing


async def test_virtual_reads_refuse_bad_addresses(waiting):
    d = waiting
    err = await error_of(d, "x-read-memory", {"gva": 0x0000_8000_0000_0000, "size": 8})
    assert err.error_class == "InvalidArgument" and "canonical" in err.message
    err = await error_of(d, "x-read-memory", {"gva": 0x1_0000_0000, "size": 8})  # past the map
    assert err.error_class == "GuestMemoryError" and "not mapped" in err.message
    err = await error_of(d, "x-read-memory", {"gva": 0, "size": 8, "cpu-index": 3})
    assert err.error_class == "NotFound"
    for params in ({"size": 8}, {"gpa": 0, "gva": 0, "size": 8}, {"gpa": 0, "size": 4097},
                   {"gpa": 0, "size": 0}):
        assert (await error_of(d, "x-read-memory", params)).code == -32602


async def test_query_vcpus_with_registers(waiting):
    d = waiting
    plain = await call(d, "query-vcpus")
    assert "general" not in plain[0]
    (v,) = await call(d, "query-vcpus", {"registers": True})
    ctrl = v["control"]
    assert ctrl["cr0"] & 1 << 31 and ctrl["efer"] & 1 << 10      # paging on, long mode
    assert v["segments"]["cs"]["l"] == 1 and v["segments"]["cs"]["selector"] == 0x08
    assert v["general"]["rip"] > 0x100000
    # CR3 is the guest's page table: its first entry leads to the PDPT
    pml4e = await word(d, ctrl["cr3"] & ~0xFFF)
    assert pml4e & 1
    assert (await call(d, "query-status"))["status"] == "running"    # reading left it running


async def test_writes_only_while_paused_and_the_guest_sees_them(waiting):
    d = waiting
    one = base64.b64encode(struct.pack("<Q", 1)).decode()
    err = await error_of(d, "x-write-memory", {"gpa": COUNT, "data": one})
    assert err.error_class == "StateError" and err.data["allowed"] == ["paused"]
    await call(d, "stop")
    for bad in ("not base64!", "", base64.b64encode(bytes(4097)).decode(), 7):
        assert (await error_of(d, "x-write-memory", {"gpa": COUNT, "data": bad})).code == -32602
    err = await error_of(d, "x-write-memory", {"gpa": 1 << 40, "data": one})
    assert err.error_class == "GuestMemoryError"
    assert await word(d, STATE) == 1
    assert await call(d, "x-write-memory", {"gpa": COUNT, "data": one}) == {"gpa": COUNT, "size": 8}
    assert await word(d, COUNT) == 1
    await call(d, "cont")

    async def woke():
        return await word(d, STATE) == 2
    await until(woke, "the guest to see its counter set")     # it looks again after a block
