"""Fixtures for the machine tests: guests built once per session, machines closed after use,
and a fake slot sink standing in for a VM where no KVM is needed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from xend_lite.guests.build import build_cached, toolchain_missing
from xend_lite.machine.backing import PAGE_SIZE

GUESTS = Path(__file__).resolve().parent / "guests"
MIB = 1 << 20


class GuestCache:
    """Builds guests from tests/machine/guests into one session directory, once each."""

    def __init__(self, cache: Path):
        self.cache = cache

    def path(self, name: str, *, bits: int = 64, defines: dict | None = None) -> Path:
        return build_cached(GUESTS / name, self.cache, bits=bits, defines=defines)

    def image(self, name: str, *, bits: int = 64, defines: dict | None = None) -> bytes:
        return self.path(name, bits=bits, defines=defines).read_bytes()

    def symbol(self, name: str, symbol: str, *, bits: int = 64, defines: dict | None = None) -> int:
        out = subprocess.run(["nm", str(self.path(name, bits=bits, defines=defines))],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == symbol:
                return int(parts[0], 16)
        raise KeyError(symbol)

    def flat(self, name: str, *, bits: int = 32, defines: dict | None = None) -> bytes:
        """The image's loadable bytes as a flat binary (objcopy -O binary)."""
        elf = self.path(name, bits=bits, defines=defines)
        out = elf.with_suffix(".bin")
        if not out.exists():
            subprocess.run(["objcopy", "-O", "binary", "-R", ".note.Xen", str(elf), str(out)],
                           check=True, capture_output=True)
        return out.read_bytes()


@pytest.fixture(scope="session")
def guests(tmp_path_factory) -> GuestCache:
    reason = toolchain_missing()
    if reason:
        pytest.skip(reason)
    return GuestCache(tmp_path_factory.mktemp("guests"))


@pytest.fixture(scope="session")
def kvm():
    from xend_lite.kvm import Kvm

    with Kvm() as k:
        yield k


@pytest.fixture
def make_machine(kvm):
    """make_machine(memory, vcpus, **kw) -> Machine, closed at teardown."""
    from xend_lite.machine.machine import Machine

    made = []

    def make(memory: int = 64 * MIB, vcpus: int = 1, **kw):
        m = Machine(kvm, memory, vcpus, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


class FakeSink:
    """Stands in for a Vm's KVM_SET_USER_MEMORY_REGION: keeps slot -> (gpa, size, host)
    and checks the calls KVM would refuse. ``fail_at`` makes the n-th call (0-based) raise."""

    def __init__(self, fail_at: int | None = None):
        self.slots: dict[int, tuple[int, int, int]] = {}
        self.calls = 0
        self.fail_at = fail_at

    def set_user_memory_region(self, slot, guest_phys_addr, memory_size, userspace_addr, flags=0):
        if self.fail_at is not None and self.calls == self.fail_at:
            self.calls += 1
            raise OSError(12, "fake sink refused")
        self.calls += 1
        if memory_size == 0:
            assert slot in self.slots, f"deleting empty slot {slot}"
            del self.slots[slot]
            return
        assert slot not in self.slots, f"slot {slot} reused while live"
        assert guest_phys_addr % PAGE_SIZE == 0 and memory_size % PAGE_SIZE == 0
        for s, (g, n, _h) in self.slots.items():
            assert guest_phys_addr + memory_size <= g or g + n <= guest_phys_addr, \
                f"new slot overlaps slot {s}"
        self.slots[slot] = (guest_phys_addr, memory_size, userspace_addr)

    def view(self) -> list[tuple[int, int, int]]:
        return sorted(self.slots.values())


@pytest.fixture
def fake_sink() -> FakeSink:
    return FakeSink()
