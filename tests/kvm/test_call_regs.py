"""Vcpu.call_regs reads the synced registers a call convention needs in one C call."""

from __future__ import annotations

import pytest

from xend_lite.kvm import Kvm

pytestmark = pytest.mark.kvm


def test_call_regs_matches_the_synced_fields():
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            v = vm.create_vcpu(0)
            r, s = v.sync_regs, v.sync_sregs
            names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r10", "rflags"]
            for i, n in enumerate(names):
                setattr(r, n, (i + 1) * 0x1111_0000_0001)
            s.cs.l, s.cs.selector, s.efer, s.cr0 = 1, 0x23, 0x500, 0x80000011
            got = v.call_regs()
            assert got == [getattr(r, n) for n in names] + [1, 0x23, 0x500, 0x80000011]
            v.close()
        finally:
            vm.close()
