"""KVM_CAP_SYNC_REGS: registers travel in kvm_run both ways, with no extra ioctls."""

from __future__ import annotations

import pytest

from xend_lite.kvm import SYNC_REGS, SYNC_SREGS, Regs, const, exits

pytestmark = pytest.mark.kvm

GUEST = ("movl $0x11223344, %eax; movl $0x55667788, %ebx; outl %eax, $0x81;"
         "outl %eax, $0x82; movl %ebx, %eax; outl %eax, $0x83; hlt")


@pytest.fixture
def synced(kvm, raw_vm, asm):
    if not kvm.check_extension(const.KVM_CAP_SYNC_REGS):
        pytest.skip("no KVM_CAP_SYNC_REGS on this host")
    raw_vm.load(asm(GUEST))
    raw_vm.vcpu.enable_sync_regs(SYNC_REGS | SYNC_SREGS)
    return raw_vm


def test_exit_delivers_registers_in_kvm_run(synced):
    v = synced.vcpu
    assert v.run() == exits.IoOut(0x81, 4, 1, bytes.fromhex("44332211"))
    got = v.get_regs()
    assert v.synced_regs() == got
    assert got.rax == 0x11223344 and got.rbx == 0x55667788
    assert v.synced_rip() == got.rip
    assert v.synced_sregs() == v.get_sregs()
    assert v.synced_cr0() == v.get_sregs().cr0


def test_set_rax_reaches_the_guest(synced):
    v = synced.vcpu
    v.run()
    v.set_rax(0xAABBCCDD)
    assert v.run() == exits.IoOut(0x82, 4, 1, bytes.fromhex("ddccbbaa"))


def test_dirty_registers_are_loaded_and_flushable(synced):
    v = synced.vcpu
    v.run()
    regs = v.synced_regs()
    regs.rbx = 0xCAFEF00D
    v.set_synced_regs(regs)
    v.flush_dirty_regs()  # applied now, so KVM_GET_REGS sees it before any run
    assert v.get_regs().rbx == 0xCAFEF00D
    v.run()
    assert v.run() == exits.IoOut(0x83, 4, 1, bytes.fromhex("0df0feca"))


def test_a_copy_of_the_registers_changes_nothing(synced):
    v = synced.vcpu
    v.run()
    v.synced_regs().rax = 0x99999999  # a copy: not set_synced_regs, so KVM keeps its own
    assert v.run().data == bytes.fromhex("44332211")


def test_regs_round_trip_through_ioctls(raw_vm):
    v = raw_vm.vcpu
    want = Regs(rax=1, rbx=2, rcx=3, rdx=4, rsi=5, rdi=6, rsp=7, rbp=8, r8=9, r9=10, r10=11,
                r11=12, r12=13, r13=14, r14=15, r15=16, rip=0x1234, rflags=0x202)
    v.set_regs(want)
    assert v.get_regs() == want
    s = v.get_sregs()
    s.cr2 = 0xDEAD000
    v.set_sregs(s)
    assert v.get_sregs().cr2 == 0xDEAD000
