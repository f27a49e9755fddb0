"""Every exit kind a guest can cause, decoded by Vcpu.run() into its typed value.

Each test runs a few real-mode instructions of our own on a raw VM (64 KiB of RAM at 0,
no irqchip) and asserts on the exits in order.
"""

from __future__ import annotations

import threading
import time

import pytest

from xend_lite.kvm import MsrFilterRange, const, exits

pytestmark = pytest.mark.kvm

TEST_MSR = 0x4000_0F00  # an index no CPU defines; trapped to user space by the filter


def test_io_out_carries_port_size_and_data(raw_vm, asm):
    raw_vm.load(asm("movw $0x3f8, %dx; movb $0x41, %al; outb %al, %dx;"
                    "movl $0x11223344, %eax; outl %eax, $0x80; hlt"))
    assert raw_vm.vcpu.run() == exits.IoOut(port=0x3F8, size=1, count=1, data=b"A")
    assert raw_vm.vcpu.run() == exits.IoOut(port=0x80, size=4, count=1, data=bytes.fromhex("44332211"))


def test_string_io_out_has_count(raw_vm, asm):
    raw_vm.load(asm("cld; movw $msg, %si; movw $5, %cx; movw $0xe9, %dx; rep outsb; hlt;"
                    "msg: .ascii \"hello\""))
    ex = raw_vm.vcpu.run()
    assert isinstance(ex, exits.IoOut) and ex.port == 0xE9 and ex.size == 1
    # KVM may split a rep over several exits; together they carry the whole string.
    data = ex.data
    while len(data) < 5:
        ex = raw_vm.vcpu.run()
        assert isinstance(ex, exits.IoOut)
        data += ex.data
    assert data == b"hello"


def test_io_in_is_answered_by_the_host(raw_vm, asm):
    raw_vm.load(asm("inw $0x71, %ax; addw $1, %ax; outw %ax, $0x72; hlt"))
    ex = raw_vm.vcpu.run()
    assert ex == exits.IoIn(port=0x71, size=2, count=1)
    raw_vm.vcpu.complete_io_in(b"\x34\x12")
    assert raw_vm.vcpu.run() == exits.IoOut(port=0x72, size=2, count=1, data=b"\x35\x12")


def test_mmio_write_and_read_to_an_unbacked_address(raw_vm, asm):
    # ES:0 = 0x20000, beyond the 64 KiB of RAM: both accesses leave as MMIO.
    raw_vm.load(asm("movw $0x2000, %ax; movw %ax, %es; movl $0x12345678, %es:(0x10);"
                    "movw %es:(0x20), %bx; movw %bx, %ax; outw %ax, $0x81; hlt"))
    assert raw_vm.vcpu.run() == exits.MmioWrite(addr=0x20010, data=bytes.fromhex("78563412"))
    assert raw_vm.vcpu.run() == exits.MmioRead(addr=0x20020, length=2)
    raw_vm.vcpu.complete_mmio_read(b"\xcd\xab")
    assert raw_vm.vcpu.run() == exits.IoOut(port=0x81, size=2, count=1, data=b"\xcd\xab")


def test_short_mmio_answer_is_padded_with_ones(raw_vm, asm):
    raw_vm.load(asm("movw $0x2000, %ax; movw %ax, %es; movl %es:(0), %eax; outl %eax, $0x81; hlt"))
    assert raw_vm.vcpu.run() == exits.MmioRead(addr=0x20000, length=4)
    raw_vm.vcpu.complete_mmio_read(b"\x01")
    assert raw_vm.vcpu.run().data == b"\x01\xff\xff\xff"


def test_hlt_exits_without_an_irqchip(raw_vm, asm):
    raw_vm.load(asm("hlt; outb %al, $0x80"))
    assert raw_vm.vcpu.run() == exits.Hlt()
    assert isinstance(raw_vm.vcpu.run(), exits.IoOut)  # resumes after the hlt


def test_triple_fault_is_a_shutdown_exit(raw_vm, asm):
    # An empty IDT: the #UD cannot be delivered, nor the #DF after it. (Protected mode:
    # some backends take seconds to give up on the same fault in real mode.)
    raw_vm.load(asm("lidt idtr; ud2; idtr: .word 0; .long 0", bits=32))
    raw_vm.protected_mode()
    assert raw_vm.vcpu.run() == exits.Shutdown()


def test_user_space_msr_read_and_write(kvm, raw_vm, asm):
    if not (kvm.check_extension(const.KVM_CAP_X86_USER_SPACE_MSR)
            and kvm.check_extension(const.KVM_CAP_X86_MSR_FILTER)):
        pytest.skip("KVM cannot trap MSRs to user space on this host")
    vm = raw_vm.vm
    vm.enable_cap(const.KVM_CAP_X86_USER_SPACE_MSR, const.KVM_MSR_EXIT_REASON_FILTER)
    flags = const.KVM_MSR_FILTER_READ | const.KVM_MSR_FILTER_WRITE
    vm.set_msr_filter([MsrFilterRange(flags, TEST_MSR, b"\xfe")])
    raw_vm.load(asm(f"movl ${TEST_MSR}, %ecx; rdmsr; outl %eax, $0x81; movl %edx, %eax;"
                    "outl %eax, $0x82; movl $0x55667788, %eax; movl $0x11223344, %edx; wrmsr; hlt"))
    v = raw_vm.vcpu
    assert v.run() == exits.MsrRead(index=TEST_MSR, reason=const.KVM_MSR_EXIT_REASON_FILTER)
    v.complete_msr(0xAABBCCDD_01020304)
    assert v.run().data == bytes.fromhex("04030201")
    assert v.run().data == bytes.fromhex("ddccbbaa")
    assert v.run() == exits.MsrWrite(index=TEST_MSR, value=0x11223344_55667788,
                                     reason=const.KVM_MSR_EXIT_REASON_FILTER)
    v.complete_msr()
    assert v.run() == exits.Hlt()


def test_immediate_exit_returns_interrupted(raw_vm, asm):
    raw_vm.load(asm("1: jmp 1b"))
    raw_vm.vcpu.set_immediate_exit(True)
    assert raw_vm.vcpu.run() == exits.Interrupted()
    raw_vm.vcpu.set_immediate_exit(False)


def test_kick_interrupts_a_spinning_vcpu(raw_vm, asm):
    raw_vm.load(asm("1: jmp 1b"))
    got: list = []
    started = threading.Event()

    def spin():
        started.set()
        got.append(raw_vm.vcpu.run())

    t = threading.Thread(target=spin)
    t.start()
    started.wait()
    time.sleep(0.05)  # let it enter KVM_RUN (a kick before entry is caught by immediate_exit)
    t0 = time.monotonic()
    deadline = t0 + 5
    while t.is_alive() and time.monotonic() < deadline:
        raw_vm.vcpu.set_immediate_exit(True)
        raw_vm.vcpu.kick(t.ident)
        t.join(0.01)
    assert not t.is_alive(), "the kick did not get the vCPU out of KVM_RUN"
    assert got == [exits.Interrupted()]
    assert time.monotonic() - t0 < 1.0
