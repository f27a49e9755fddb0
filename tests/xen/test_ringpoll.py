"""The rings' safety-net poll: short while the rings move, backing off while they do not,
and still serving a ring the guest filled without a signal."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from xend_lite.machine.owner import VmOwner
from xend_lite.vmm.domain import Domain
from xend_lite.vmm.spec import DomainSpec
from xend_lite.xen.ringpoll import POLL_EVERY, POLL_IDLE_MAX, RingPoll

OUT, OUT_PROD = 1024, 3084        # struct xencons_interface


def test_backs_off_while_nothing_moves_and_comes_back_when_something_does():
    moved = [False]
    p = RingPoll(lambda: True, [lambda: moved[0]])
    periods = [p() for _ in range(8)]
    assert periods[:5] == [2 * POLL_EVERY, 4 * POLL_EVERY, 8 * POLL_EVERY, 16 * POLL_EVERY,
                           POLL_IDLE_MAX]
    assert periods[-1] == POLL_IDLE_MAX
    moved[0] = True
    assert p() == POLL_EVERY
    moved[0] = False
    p()
    p.activity()                   # the guest signalled a port meanwhile
    assert p() == POLL_EVERY


def test_a_stopped_machine_is_not_served_and_is_polled_slowly():
    served = []
    p = RingPoll(lambda: False, [lambda: served.append(1) or True])
    for _ in range(6):
        p()
    assert served == [] and p.period == POLL_IDLE_MAX


def test_owner_timer_takes_the_period_its_work_returns():
    owner = VmOwner("test-owner")
    runs: list[float] = []
    done = threading.Event()

    def work() -> float:
        runs.append(time.monotonic())
        if len(runs) == 3:
            done.set()
        return 0.3                 # asked for; the registered period is 0.01
    try:
        owner.every(0.01, work)
        assert done.wait(5)
    finally:
        owner.close()
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert all(g >= 0.29 for g in gaps), gaps


@pytest.mark.kvm
def test_an_unsignalled_console_ring_is_still_served(guest_image, tmp_path):
    img = tmp_path / "hammer32.elf"
    img.write_bytes(guest_image("xen/guests/hammer32.S", bits=32))
    d = Domain(DomainSpec(image=str(img), memory_mib=64, vcpus=1))
    try:
        d.start()
        xen = d.xen
        deadline = time.monotonic() + 10
        while xen.ring_poll.period < POLL_IDLE_MAX and time.monotonic() < deadline:
            time.sleep(0.05)
        assert xen.ring_poll.period == POLL_IDLE_MAX
        # the guest's side of a write, with no event-channel signal
        text = b"written without a signal\n"
        d.machine.mem.write(xen.console_gpa + OUT, text)
        d.machine.mem.write(xen.console_gpa + OUT_PROD, struct.pack("<I", len(text)))
        t = time.monotonic()
        while text not in d.machine.console.tail() and time.monotonic() - t < 5:
            time.sleep(0.01)
        took = time.monotonic() - t
        assert text in d.machine.console.tail()
        assert took < POLL_IDLE_MAX + 0.5
        time.sleep(0.02)
        assert xen.ring_poll.period <= 2 * POLL_EVERY    # busy again: polled often
    finally:
        d.close()


@pytest.mark.kvm
def test_after_a_reset_the_poll_serves_the_new_store(guest_image, tmp_path):
    """A system reset gives the guest a fresh store: a request left in the ring without a
    signal is answered from that store, not from the one before the reset."""
    img = tmp_path / "hammer32.elf"
    img.write_bytes(guest_image("xen/guests/hammer32.S", bits=32))
    d = Domain(DomainSpec(image=str(img), memory_mib=64, vcpus=1))
    try:
        d.start()
        d.reset()
        d.xenstore("write", "data/after-reset", b"yes")    # only the new store has it
        path = b"/local/domain/1/data/after-reset\0"
        store = d.xen.store_gpa
        d.machine.mem.write(store, struct.pack("<IIII", 2, 7, 0, len(path)) + path)  # XS_READ
        d.machine.mem.write(store + 2052, struct.pack("<I", 16 + len(path)))         # req_prod
        deadline = time.monotonic() + POLL_IDLE_MAX + 2
        while time.monotonic() < deadline:
            (rsp_prod,) = struct.unpack("<I", d.machine.mem.read(store + 2060, 4))
            if rsp_prod >= 16 + 3:
                break
            time.sleep(0.01)
        reply = d.machine.mem.read(store + 1024, 16 + 3)
        kind, req_id, _tx, length = struct.unpack("<IIII", reply[:16])
        assert (kind, req_id, length, reply[16:]) == (2, 7, 3, b"yes")
    finally:
        d.close()
