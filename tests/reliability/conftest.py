"""Fixtures for the reliability suite: the fuzz guest, and an audit that every access the
daemon makes to guest memory stays inside memory that backs the guest."""

from __future__ import annotations

import mmap
import os

import pytest

from xend_lite.errors import GuestMemoryError
from xend_lite.machine import guestmem as memory_mod
from xend_lite.xen.shinfo import SharedInfo

from .fuzzguest import FuzzGuest

CANARY = bytes(range(256)) * 256          # 64 KiB


def scaled(default: int, slow: int, request) -> int:
    """The case count for this run: ``slow`` when the test carries the slow marker."""
    return slow if request.node.get_closest_marker("slow") else default


class MemoryAudit:
    """Wraps GuestMemory.read/write and the raw host-address helpers of the Xen layer.

    For every access it checks, independently of the code under test, that the guest range
    is wholly backed by the current memory map (else the access must have raised
    GuestMemoryError), and that every segment's backing holds the bytes the segment claims.
    Host addresses handed to the raw event-channel helpers must lie inside a live backing.
    """

    def __init__(self, monkeypatch):
        self.accesses = 0
        self.refused = 0
        self.raw = 0
        self.violations: list[str] = []
        self.canaries = [self._canary() for _ in range(4)]
        orig_read, orig_write = memory_mod.GuestMemory.read, memory_mod.GuestMemory.write
        audit = self

        def audited(what, mem, gpa, length, access):
            covered = audit.covered(mem.map, gpa, length)
            try:
                out = access()
            except GuestMemoryError:
                audit.refused += 1
                raise
            audit.accesses += 1
            if not covered:
                audit.violations.append(f"{what} {gpa:#x}+{length:#x} succeeded outside backed memory")
            return out

        def read(mem, gpa, length):
            out = audited("read", mem, gpa, length, lambda: orig_read(mem, gpa, length))
            if len(out) != length:
                audit.violations.append(f"read {gpa:#x}+{length:#x} returned {len(out)} bytes")
            return out

        def write(mem, gpa, data):
            audited("write", mem, gpa, len(data), lambda: orig_write(mem, gpa, data))

        monkeypatch.setattr(memory_mod.GuestMemory, "read", read)
        monkeypatch.setattr(memory_mod.GuestMemory, "write", write)

        orig_vi = SharedInfo.vcpu_info_addr
        orig_si = SharedInfo.addr.fget

        def vcpu_info_addr(shinfo, vcpu):
            addr = orig_vi(shinfo, vcpu)
            audit.check_host(shinfo, addr, 64, f"vcpu_info of vcpu{vcpu}")
            return addr

        def shinfo_addr(shinfo):
            addr = orig_si(shinfo)
            audit.check_host(shinfo, addr, 4096, "shared_info")
            return addr

        monkeypatch.setattr(SharedInfo, "vcpu_info_addr", vcpu_info_addr)
        monkeypatch.setattr(SharedInfo, "addr", property(shinfo_addr))

    @staticmethod
    def _canary() -> mmap.mmap:
        m = mmap.mmap(-1, len(CANARY))
        m[:] = CANARY
        return m

    def covered(self, memmap, gpa, length) -> bool:
        if not isinstance(gpa, int) or not isinstance(length, int) or gpa < 0 or length < 0:
            return False
        segs = memmap.segments
        for s in segs:
            if s.offset < 0 or s.offset + s.size > s.backing.size:
                self.violations.append(f"segment {s.name}@{s.gpa:#x} exceeds its backing")
        pos, end = gpa, gpa + length
        while pos < end:
            s = next((s for s in segs if s.gpa <= pos < s.end), None)
            if s is None:
                return False
            pos = s.end
        return end <= 1 << 64

    def check_host(self, shinfo, addr: int, length: int, what: str) -> None:
        self.raw += 1
        if not addr:
            return
        backings = [shinfo.machine.ram] + list(shinfo.overlay.pages.values())
        for b in backings:
            if b.view is not None and b.addr <= addr and addr + length <= b.addr + b.size:
                return
        self.violations.append(f"{what} at host address {addr:#x} is outside every backing")

    def check(self) -> None:
        for m in self.canaries:
            if m[:] != CANARY:
                self.violations.append("a host canary page changed")
        assert not self.violations, self.violations[:10]


@pytest.fixture
def memory_audit(monkeypatch):
    """Install the audit first, then allocate more canaries around what the test builds."""
    audit = MemoryAudit(monkeypatch)
    yield audit
    for m in audit.canaries:
        m.close()


@pytest.fixture
def fuzz_guest(guest_image, tmp_path, memory_audit):
    """fuzz_guest(bits) -> a booted FuzzGuest; closed (and audited) at the end."""
    made = []

    def make(bits: int = 64, **kw) -> FuzzGuest:
        img = tmp_path / f"fuzz{bits}.elf"
        img.write_bytes(guest_image("reliability/guests/fuzz.S", bits=bits))
        memory_audit.canaries.append(memory_audit._canary())
        g = FuzzGuest(str(img), bits, **kw)
        memory_audit.canaries.append(memory_audit._canary())
        made.append(g)
        g.boot()
        return g

    yield make
    for g in made:
        g.close()
    memory_audit.check()


@pytest.fixture(params=[64, 32], ids=["64bit", "32bit"])
def bits(request):
    return request.param


def rss_kib(pid: int | None = None) -> int:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- a real daemon ---------------------------------------------------------------------------
# tests/daemon's fixtures start a Daemon in this process on a temporary socket; reused here
# with the real Domain factory.
from tests.daemon.conftest import short_tmp, start_daemon, wait_for  # noqa: E402,F401


class EventLog:
    """Follows a daemon's event stream over its WebSocket, like a real client."""

    def __init__(self, client):
        import asyncio

        self.client = client
        self.events: list[dict] = []
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self):
        async for ev in self.client.events():
            self.events.append(ev)

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e["event"] == name]

    async def wait(self, name: str, count: int = 1, timeout: float = 10.0) -> list[dict]:
        await wait_for(lambda: len(self.named(name)) >= count, timeout, f"{count} {name} event(s)")
        return self.named(name)

    async def close(self):
        self._task.cancel()
        try:
            await self._task
        except BaseException:  # noqa: BLE001
            pass
