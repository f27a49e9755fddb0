"""run_fns() with a port hook: the Xen layer's C decoder reads a port-write call for the
caller's mode in the same C call as KVM_RUN, and run_result() gives the result back (64-bit
callers and callers outside the kernel: tests/xen's harness guests)."""

from __future__ import annotations

import pytest


pytestmark = pytest.mark.kvm


# 32-bit protected mode: a call on port 0xe4 with EAX = number and EBX..EDI = arguments; the
# guest reports the result it got (a caller at CPL 3 is covered by tests/xen's user guest)
CALL32 = """
    movl $0x11, %eax; movl $0xa1, %ebx; movl $0xa2, %ecx; movl $0xa3, %edx
    movl $0xa4, %esi; movl $0xa5, %edi
    outb %al, $0xe4
    movl %eax, %ebx             /* what the host answered */
    outb %al, $0x81             /* report it */
    hlt
"""


def test_run_fns_decode_a_32_bit_call_and_return_its_result(raw_vm, asm):
    from xend_lite.kvm import SYNC_REGS, SYNC_SREGS
    from xend_lite.kvm import PORT_SHIFT
    from xend_lite.xen.native import CALL_LONG, CALL_USER, DECODE_CALL

    v = raw_vm.vcpu
    raw_vm.load(asm(CALL32, bits=32))
    raw_vm.protected_mode()
    v.enable_sync_regs(SYNC_REGS | SYNC_SREGS)
    run, run_result = v.run_fns(DECODE_CALL, 0xE4)
    # high halves of the 64-bit registers are not part of a 32-bit call
    regs = v.get_regs()
    regs.rbx |= 0xDEAD_0000_0000_0000
    v.set_regs(regs)
    reason = run()
    assert reason >> PORT_SHIFT == 0xE4 + 1
    nr, flags, *args = v.hook_values(7)
    assert nr == 0x11 and flags & CALL_LONG == 0 and flags & CALL_USER == 0
    assert args == [0xA1, 0xA2, 0xA3, 0xA4, 0xA5]
    # the result goes back in RAX with the next KVM_RUN
    reason = run_result(0xFFFF_FFEA)
    assert reason >> PORT_SHIFT == 0x81 + 1
    assert v.synced_regs().rbx == 0xFFFF_FFEA

