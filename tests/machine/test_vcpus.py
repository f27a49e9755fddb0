"""vCPU threads: stop-the-world pause of spinning vCPUs, shutdown statuses, reset."""

from __future__ import annotations

import time

import pytest

from xend_lite.kvm import Regs
from xend_lite.machine.loader import BootCpu, boot_cpu, flat32_sregs, load_image
from xend_lite.machine.backing import PAGE_SIZE, Backing
from xend_lite.machine.vcpu import VcpuState

PAUSED, RUNNING = VcpuState.PAUSED, VcpuState.RUNNING

pytestmark = pytest.mark.kvm

C0, C1 = 0x300000, 0x300040
SPIN = {"C0": hex(C0), "C1": hex(C1)}
PAUSE_LIMIT = 0.2  # seconds; a pause normally takes well under a millisecond


def _counters(m) -> tuple[int, int]:
    return m.mem.read_u32(C0), m.mem.read_u32(C1)


def _wait_moving(m, before, timeout=5.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _counters(m)
        if now[0] != before[0] and now[1] != before[1]:
            return now
        time.sleep(0.005)
    raise AssertionError(f"counters stuck at {before}")


@pytest.fixture
def spinning(make_machine, guests):
    m = make_machine(vcpus=2)
    load_image(m, guests.image("spin32.S", bits=32, defines=SPIN))
    ap = guests.symbol("spin32.S", "ap_start", bits=32, defines=SPIN)
    v1 = m.runners[1].vcpu
    m.set_boot_cpu(1, BootCpu(Regs(rip=ap, rflags=2), flat32_sregs(v1.get_sregs())))
    m.start()
    _wait_moving(m, (0, 0))
    return m


def test_pause_stops_both_spinning_vcpus_quickly(spinning):
    m = spinning
    latencies = []
    for _ in range(20):
        t = time.perf_counter()
        m.pause()
        latencies.append(time.perf_counter() - t)
        assert m.state == "paused"
        assert all(r.state == PAUSED for r in m.runners)
        frozen = _counters(m)
        time.sleep(0.02)
        assert _counters(m) == frozen, "a counter moved while paused"
        m.resume()
        _wait_moving(m, frozen)
    assert max(latencies) < PAUSE_LIMIT, f"slowest pause {max(latencies) * 1e3:.1f} ms"
    assert all(r.state == RUNNING for r in m.runners)


def test_pauses_nest(spinning):
    m = spinning
    m.pause()
    m.pause()
    assert m.pause_depth == 2
    m.resume()
    frozen = _counters(m)
    time.sleep(0.02)
    assert m.state == "paused" and _counters(m) == frozen
    m.resume()
    assert m.state == "running"
    _wait_moving(m, frozen)


def _watch_slots(m):
    """Record, for every KVM slot change, whether each vCPU was out of the guest."""
    calls = []
    real = m.vm.set_user_memory_region

    def spy(*args, **kw):
        calls.append([r.out_of_guest for r in m.runners])
        return real(*args, **kw)
    m.vm.set_user_memory_region = spy
    return calls


def test_a_slot_change_happens_with_every_vcpu_out_of_the_guest(spinning):
    m = spinning
    calls = _watch_slots(m)
    page = Backing.anonymous("t", PAGE_SIZE)
    try:
        # above the end of RAM: no RAM to lay the page over, so KVM's slots must change;
        # back to back, so a vCPU released by one change is still waking when the next comes
        for i in range(100):
            m.change_memory(lambda mm: mm.map_overlay("t", page, m.memory_bytes + (i % 8) * 0x1000))
            m.change_memory(lambda mm: mm.unmap_overlay("t"))
        assert len(calls) >= 200 and all(all(out) for out in calls), \
            [c for c in calls if not all(c)][:5]
        assert m.status is None, m.status
        assert m.state == "running"
        _wait_moving(m, _counters(m))     # the vCPUs were let go again
    finally:
        m.stop()
        page.close()


def test_an_overlay_over_ram_changes_no_slot_and_stops_no_vcpu(spinning):
    m = spinning
    calls = _watch_slots(m)
    page = Backing.anonymous("t", PAGE_SIZE)
    states = []
    try:
        def change(mm):
            mm.map_overlay("t", page, 0x600000)
            states.append([r.state for r in m.runners])
        m.change_memory(change)
        assert calls == [] and states == [[RUNNING, RUNNING]]
        assert m.memmap.overlays() == {"t": 0x600000}
        _wait_moving(m, _counters(m))
    finally:
        m.stop()
        page.close()


def test_registers_can_be_read_while_paused(spinning, guests):
    m = spinning
    ap_start = guests.symbol("spin32.S", "ap_start", bits=32, defines=SPIN)
    with m.paused():
        regs = m.runners[1].vcpu.get_regs()
        assert ap_start <= regs.rip < ap_start + 16 and regs.rbx == C1  # inside its own loop
        assert m.runners[1].vcpu.get_sregs().cr0 & 1  # protected mode, as it was started
        assert m.runners[0].vcpu.get_regs().rip < ap_start


def _run_to_end(make_machine, image, irqchip=True, timeout=10.0):
    m = make_machine(irqchip=irqchip)
    load_image(m, image)
    t = time.monotonic()
    m.start()
    status = m.wait(timeout)
    return m, status, time.monotonic() - t


def test_triple_fault_ends_the_run(make_machine, guests):
    m, status, took = _run_to_end(make_machine, guests.image("fault32.S", bits=32, defines={"TRIPLE": 1}))
    assert status is not None and status.reason == "triple-fault"
    assert "vcpu0" in status.detail
    assert m.console.text() == "z" and m.state == "stopped"
    assert took < 5


@pytest.mark.parametrize("irqchip", [True, False])
def test_hlt_with_interrupts_off_ends_the_run(make_machine, guests, irqchip):
    # With the in-kernel irqchip the HLT never exits: the machine must notice on its own.
    m, status, took = _run_to_end(make_machine, guests.image("fault32.S", bits=32), irqchip=irqchip)
    assert status is not None and status.reason == "halted", status
    assert m.console.text() == "z"
    assert took < 5
    for r in m.runners:
        r.join(2)
        assert not r.thread.is_alive()


def test_reset_hardware_brings_back_power_on_state(make_machine, guests):
    m = make_machine()
    v = m.runners[0].vcpu
    power_regs, power_sregs = v.get_regs(), v.get_sregs()
    assert power_regs.rip == 0xFFF0 and power_sregs.cs.base == 0xFFFF0000  # x86 reset vector

    info = load_image(m, guests.image("boot.S", bits=32))
    page = Backing.anonymous("t", PAGE_SIZE)
    try:
        m.change_memory(lambda mm: mm.map_overlay("t", page, 0x600000))
        m.change_memory(lambda mm: mm.remove_ram_page(0x700))
        assert v.get_regs().rip == info.entry and m.mem.read_u32(0x1000) != 0
        slots = m.memmap.slot_count()

        m.reset_hardware()
        assert v.get_regs() == power_regs
        assert v.get_sregs() == power_sregs
        assert m.memmap.overlays() == {} and m.memmap.ballooned() == []
        assert m.memmap.slot_count() < slots
        assert m.mem.read(0x1000, PAGE_SIZE) == bytes(PAGE_SIZE)   # start_info gone
        assert m.mem.read(info.entry, 64) == bytes(64)             # image gone
    finally:
        page.close()


def test_rearm_after_shutdown_runs_the_guest_again(make_machine, guests):
    image = guests.image("fault32.S", bits=32, defines={"TRIPLE": 1})
    m, status, _ = _run_to_end(make_machine, image)
    assert status.reason == "triple-fault"
    m.rearm()
    assert m.state == "created" and m.status is None
    v = m.runners[0].vcpu
    assert v.get_regs().rip == 0xFFF0
    load_image(m, image)
    m.start()
    assert m.wait(10).reason == "triple-fault"
    assert m.console.text() == "zz"


def test_set_boot_cpu_gives_a_secondary_vcpu_its_own_entry(make_machine, guests):
    m = make_machine(vcpus=2)
    info = load_image(m, guests.image("spin32.S", bits=32, defines=SPIN))
    cpu = boot_cpu(m, info, index=1)
    cpu.regs.rip = guests.symbol("spin32.S", "ap_start", bits=32, defines=SPIN)
    m.set_boot_cpu(1, cpu)
    m.start()
    _wait_moving(m, (0, 0))
    with m.paused():
        assert m.runners[1].vcpu.get_regs().rbx == C1
        assert m.runners[0].vcpu.get_regs().rbx == C0
