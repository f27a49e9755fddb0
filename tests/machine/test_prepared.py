"""A Machine built on a VM made ahead (machine/prepared.py): it takes that VM's vCPUs, adds
the ones it lacks, runs them on the threads parked for it, and releases what it did not use;
a prepared VM that cannot serve the machine's shape is refused before anything is taken."""

from __future__ import annotations

import threading
import time

import pytest

from xend_lite.errors import InvalidArgument
from xend_lite.kvm import Regs
from xend_lite.machine.loader import BootCpu, flat32_sregs
from xend_lite.machine.machine import Machine
from xend_lite.machine.owner import VmOwner
from xend_lite.machine.prepared import ParkedThread, PreparedVm

pytestmark = pytest.mark.kvm
MiB = 1 << 20


def spin_on_every_vcpu(m: Machine) -> None:
    """vCPU n: L: incl 0x300000+4n; jmp L"""
    for n in range(len(m.runners)):
        m.mem.write(0x100000 + 0x100 * n, bytes([0xFF, 0x05]) + (0x300000 + 4 * n).to_bytes(4, "little")
                    + bytes([0xEB, 0xF8]))
        m.set_boot_cpu(n, BootCpu(Regs(rip=0x100000 + 0x100 * n, rflags=2),
                                  flat32_sregs(m.runners[n].vcpu.get_sregs())))


def test_a_machine_takes_the_prepared_vm_adds_vcpus_and_runs_them_on_parked_threads(kvm):
    p = PreparedVm.make(kvm, vcpus=1, park_threads=2)
    parked = list(p.threads)
    assert all(t.is_alive() for t in parked) and len(p.vcpus) == 1
    m = Machine(kvm, 32 * MiB, 3, prepared=p)
    try:
        assert p.adopted and m.vm is p.vm and m.owner is p.owner
        assert [r.vcpu.id for r in m.runners] == [0, 1, 2] and m.runners[0].vcpu is p.vcpus[0]
        assert len(m._power_on) == 3
        spin_on_every_vcpu(m)
        m.start()
        time.sleep(0.2)
        counts = [m.mem.read_u32(0x300000 + 4 * n) for n in range(3)]
        assert all(c > 0 for c in counts), counts
        threads = [r.thread for r in m.runners]
        assert sum(t in parked for t in threads) == 2           # the parked ones, then a new one
        assert {t.name for t in threads} == {"vcpu0", "vcpu1", "vcpu2"}
        assert all(t.is_alive() for t in threads)
        with pytest.raises(InvalidArgument, match="in use already"):
            Machine(kvm, 32 * MiB, 3, prepared=p)               # one machine per prepared VM
    finally:
        m.close()
    assert not any(t.is_alive() for t in threads)


def test_unused_parked_threads_end_with_the_machine_or_the_prepared_vm(kvm):
    p = PreparedVm.make(kvm, vcpus=1, park_threads=3)
    m = Machine(kvm, 32 * MiB, 1, prepared=p)
    spare = [t for t in p.threads]
    m.close()
    for t in spare:
        t.join(5)
        assert not t.is_alive()
    q = PreparedVm.make(kvm, vcpus=2, park_threads=2)
    q.close()
    for t in q.threads:
        t.join(5)
        assert not t.is_alive()
    assert q.vm.fd < 0 and all(v.fd < 0 for v in q.vcpus) and not q.owner.alive


def test_a_prepared_vm_with_more_vcpus_than_asked_is_refused_untouched(kvm):
    p = PreparedVm.make(kvm, vcpus=2)
    try:
        with pytest.raises(InvalidArgument, match="2 vCPUs made, more than 1"):
            Machine(kvm, 32 * MiB, 1, prepared=p)
        assert not p.adopted and p.vm.fd >= 0 and p.owner.alive
        m = Machine(kvm, 32 * MiB, 2, prepared=p)                # the right shape takes it
        m.close()
    finally:
        p.close()


def test_the_msr_filter_set_ahead_is_not_set_again(kvm, monkeypatch):
    from xend_lite.kvm import vm as kvm_vm

    p = PreparedVm.make(kvm, vcpus=1)
    p.trap_msrs([0x40000000])
    calls = []
    real = kvm_vm.check

    def counting(name, ret):
        if name == "KVM_X86_SET_MSR_FILTER":
            calls.append(name)
        return real(name, ret)
    monkeypatch.setattr(kvm_vm, "check", counting)
    m = Machine(kvm, 32 * MiB, 1, prepared=p)
    try:
        m.register_msr(0x40000000, write=lambda r, v: True)      # the filter KVM holds
        assert calls == []
        m.register_msr(0x40000001, write=lambda r, v: True)      # a new filter
        assert len(calls) == 1
    finally:
        m.close()


def test_parked_thread_runs_its_work_once_named_as_asked():
    done = threading.Event()
    t = ParkedThread()
    assert t.is_alive() and not done.is_set()
    t.launch(done.set, "worker")
    assert done.wait(5) and t.name == "worker"
    t.join(5)
    assert not t.is_alive()


def test_owner_after_runs_once():
    owner = VmOwner()
    runs = []
    try:
        owner.after(0.01, lambda: runs.append(time.monotonic()))
        time.sleep(0.2)
        assert len(runs) == 1
    finally:
        owner.close()
