"""A real domain running the hypercall harness guest (guests/hcall.S), 64- or 32-bit."""

from __future__ import annotations

import struct
import threading

import pytest

from tests.xen.ringclient import RingGuest
from xend_lite.xen.xenabi import X
from xend_lite.vmm.domain import Domain
from xend_lite.vmm.spec import DomainSpec

TABLE = 0x300000
HCPAGE = 0x200000
SCRATCH = 0x400000          # where tests put structs and buffers
ALIAS = 0x80_0000_0000      # 64-bit guest: second PML4 slot mapping physical 0
DONE_PORT = 0xF0
ENTRY = 256
U64 = (1 << 64) - 1
PATTERN64 = [0x1111111111111111, 0x2222222222222222, 0x3333333333333333, 0x4444444444444444,
             0x5555555555555555, 0x6666666666666666, 0x7777777777777777, 0x8888888888888888,
             0x9999999999999999]


def errno(name: str) -> int:
    return -getattr(X, "XEN_" + name)


class Harness:
    """A domain running a table-driven hypercall guest; the guest signals DONE_PORT when
    its table is done."""

    DONE_PORT = DONE_PORT

    def __init__(self, image_path: str, bits: int, **spec):
        self.bits = bits
        self.events: list[tuple[str, dict]] = []
        spec.setdefault("memory_mib", 64)
        self.domain = Domain(DomainSpec(image=image_path, **spec),
                             emit=lambda e, d: self.events.append((e, d)))
        self.machine = self.domain.machine
        self.mem = self.machine.mem
        self.xen = self.domain.xen
        self._done = threading.Event()
        self.machine.exits.register_io_out(self.DONE_PORT, lambda _r, _ex: self._done.set())

    # guest pointers: through the alias in 64-bit mode so translation is exercised
    def ptr(self, gpa: int) -> int:
        return ALIAS + gpa if self.bits == 64 else gpa

    def put(self, gpa: int, data: bytes) -> int:
        self.mem.write(gpa, data)
        return self.ptr(gpa)

    def run(self, calls, msr: int | None = HCPAGE, timeout: float = 20.0) -> list[tuple[int, int]]:
        """Run [(nr, a1, ..., a5)] in the guest; returns [(result, flags)] with result as a
        signed integer in the guest's register width."""
        self.plant(calls, msr)
        self._done.clear()
        self.domain.start()
        import time

        deadline = time.monotonic() + timeout
        while not self._done.wait(0.02):
            assert self.machine.status is None and time.monotonic() < deadline, \
                f"guest did not finish: {self.machine.status} {self.machine.console.tail(2000)!r}"
        return self.results(len(calls))

    def plant(self, calls, msr: int | None = HCPAGE) -> None:
        table = bytearray(64)
        struct.pack_into("<QQ", table, 0, len(calls), msr or 0)
        self.calls = [list(c) + [0] * (6 - len(c)) for c in calls]
        for args in self.calls:
            table += struct.pack("<6QQQ", *[a & U64 for a in args], 0, 0).ljust(ENTRY, b"\0")
        self.mem.write(TABLE, bytes(table))

    def results(self, n: int) -> list[tuple[int, int]]:
        """(result, clobbered) per call: clobbered is 1 when any register but RAX changed."""
        out = []
        for i in range(n):
            base = TABLE + 64 + i * ENTRY
            res = struct.unpack("<Q", self.mem.read(base + 56, 8))[0]
            args = [a & U64 for a in self.calls[i][1:6]]
            if self.bits == 64:
                regs = struct.unpack("<14Q", self.mem.read(base + 64, 112))
                want = PATTERN64 + args
            else:
                regs = struct.unpack("<6Q", self.mem.read(base + 64, 48))
                want = [a & 0xFFFFFFFF for a in args] + [0x33333333]
            flags = int(list(regs) != want)
            if self.bits == 32:
                res &= 0xFFFFFFFF
                res = res - (1 << 32) if res >> 31 else res
            else:
                res = res - (1 << 64) if res >> 63 else res
            out.append((res, flags))
        return out

    def header(self) -> tuple[int, ...]:
        return struct.unpack("<6Q", self.mem.read(TABLE, 48))

    def close(self) -> None:
        self.domain.close()


@pytest.fixture(params=[64, 32], ids=["64bit", "32bit"])
def bits(request):
    return request.param


@pytest.fixture
def harness_factory(guest_image, tmp_path):
    made = []

    def make(bits: int = 64, **spec) -> Harness:
        img = tmp_path / f"hcall{bits}.elf"
        img.write_bytes(guest_image("xen/guests/hcall.S", bits=bits))
        h = Harness(str(img), bits, **spec)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture
def harness(harness_factory, bits):
    return harness_factory(bits)


@pytest.fixture
def run_to_done(guest_image, tmp_path):
    """run_to_done("xen/guests/x.S") -> Domain: boot a 64-bit test guest and wait until it
    writes port 0xf0 (its "done" signal); the domain is closed at teardown."""
    made = []

    def run(src: str, timeout: float = 20.0, **spec) -> Domain:
        import threading

        img = tmp_path / (src.rsplit("/", 1)[-1] + ".elf")
        img.write_bytes(guest_image(src))
        spec.setdefault("memory_mib", 64)
        d = Domain(DomainSpec(image=str(img), **spec))
        made.append(d)
        done = threading.Event()
        d.machine.exits.register_io_out(DONE_PORT, lambda _r, _e: done.set())
        d.start()
        assert done.wait(timeout), (d.machine.status, d.machine.console.tail(500))
        return d

    yield run
    for d in made:
        d.close()


@pytest.fixture
def ring_guest(guest_path):
    """ring_guest(**spec) -> RingGuest: guests/ringclient64.S started and ready for ops
    (see ringclient.py); closed at teardown."""
    made = []

    def make(**spec) -> RingGuest:
        g = RingGuest(str(guest_path("xen/guests/ringclient64.S")), **spec)
        made.append(g)
        g.start()
        return g

    yield make
    for g in made:
        g.close()
