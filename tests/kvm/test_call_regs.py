"""run_fns() and exit_call() decode a port-write call for the caller's mode and give its
result back (64-bit callers and callers outside the kernel: tests/xen's harness guests)."""

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
    from xend_lite.kvm.vcpu import CALL_LONG, CALL_USER, PORT_SHIFT

    v = raw_vm.vcpu
    raw_vm.load(asm(CALL32, bits=32))
    raw_vm.protected_mode()
    v.enable_sync_regs(SYNC_REGS | SYNC_SREGS)
    run, run_result = v.run_fns()
    # high halves of the 64-bit registers are not part of a 32-bit call
    v.sync_regs.rbx = 0xDEAD_0000_0000_0000
    v.mark_regs_dirty()
    reason = run()
    assert reason >> PORT_SHIFT == 0xE4 + 1
    nr, flags, *args = v.exit_call()
    assert nr == 0x11 and flags & CALL_LONG == 0 and flags & CALL_USER == 0
    assert args == [0xA1, 0xA2, 0xA3, 0xA4, 0xA5]
    # a negative result is truncated to the caller's 32 bits
    reason = run_result((-22) & 0xFFFF_FFFF_FFFF_FFFF)
    assert reason >> PORT_SHIFT == 0x81 + 1
    assert v.sync_regs.rbx == 0xFFFF_FFEA

