"""The KVM bindings against the real /dev/kvm: capabilities, errors, exits, registers."""

from __future__ import annotations

import errno
import mmap

import pytest

from xend_lite.kvm import CAPABILITIES, SYNC_REGS, Kvm, KvmError, Regs, exits
from xend_lite.machine.native import buffer_address
from xend_lite.kvm import const as K

pytestmark = pytest.mark.kvm


@pytest.fixture
def kvm():
    with Kvm() as k:
        yield k


def real_mode_vm(kvm, code: bytes, at: int = 0x1000, size: int = 0x10000):
    """A VM with one vCPU in real mode running ``code`` at ``at`` (CS base 0)."""
    vm = kvm.create_vm()
    mem = mmap.mmap(-1, size)
    mem[at:at + len(code)] = code
    vm.set_user_memory_region(0, 0, size, buffer_address(mem))
    vcpu = vm.create_vcpu(0)
    s = vcpu.get_sregs()
    s.cs.base, s.cs.selector = 0, 0
    vcpu.set_sregs(s)
    vcpu.set_regs(Regs(rip=at, rflags=2))
    return vm, vcpu, mem


def test_system_queries(kvm):
    assert kvm.api_version() == 12
    assert kvm.vcpu_mmap_size() >= 4096
    cpuid = kvm.supported_cpuid()
    assert any(e.function == 0 for e in cpuid)
    assert any(e.function == 0x80000001 for e in cpuid)
    assert 0x10 in kvm.msr_index_list()  # IA32_TSC is always saved
    assert kvm.check_extension(CAPABILITIES["user_memory"]) == 1
    assert kvm.check_extension(123456) == 0  # unknown capability is absent, not an error


def test_vm_check_extension_and_caps_are_detected(kvm):
    with kvm.create_vm() as vm:
        assert vm.check_extension(K.KVM_CAP_NR_MEMSLOTS) > 32
        assert vm.check_extension(K.KVM_CAP_XEN_HVM) == kvm.check_extension(K.KVM_CAP_XEN_HVM)


def test_error_names_ioctl_and_errno(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError) as ei:
            vm.set_user_memory_region(0, 0x1000, 0x1000, 0x1234)  # unaligned host address
        assert ei.value.call == "KVM_SET_USER_MEMORY_REGION"
        assert ei.value.errno == errno.EINVAL
        assert "KVM_SET_USER_MEMORY_REGION" in str(ei.value)
        assert isinstance(ei.value, OSError)


def test_io_out_and_in(kvm):
    # mov dx,0x3f8; mov al,'A'; out dx,al; in al,dx; out dx,al; hlt
    code = bytes([0xBA, 0xF8, 0x03, 0xB0, 0x41, 0xEE, 0xEC, 0xEE, 0xF4])
    vm, vcpu, mem = real_mode_vm(kvm, code)
    ex = vcpu.run()
    assert ex == exits.IoOut(port=0x3F8, size=1, count=1, data=b"A")
    ex = vcpu.run()
    assert ex == exits.IoIn(port=0x3F8, size=1, count=1)
    vcpu.complete_io_in(b"Z")
    assert vcpu.run() == exits.IoOut(0x3F8, 1, 1, b"Z")
    assert vcpu.run() == exits.HLT  # no in-kernel irqchip: HLT reaches user space
    vcpu.close(); vm.close()


def test_mmio_exits_for_unbacked_memory(kvm):
    # mov byte [0x8000], 0x5a (unbacked with a 0x8000 slot); mov al, [0x8001]; out 0x10, al; hlt
    code = bytes([0xC6, 0x06, 0x00, 0x80, 0x5A, 0xA0, 0x01, 0x80, 0xE6, 0x10, 0xF4])
    vm, vcpu, mem = real_mode_vm(kvm, code, size=0x8000)
    assert vcpu.run() == exits.MmioWrite(0x8000, b"\x5a")
    assert vcpu.run() == exits.MmioRead(0x8001, 1)
    vcpu.complete_mmio_read(b"\x77")
    assert vcpu.run() == exits.IoOut(0x10, 1, 1, b"\x77")
    vcpu.close(); vm.close()


def test_sync_regs_round_trip(kvm):
    # L: out 0x10, al; jmp L  -- the host bumps RBX through kvm_run each exit
    code = bytes([0xE6, 0x10, 0xEB, 0xFC])
    vm, vcpu, mem = real_mode_vm(kvm, code)
    vcpu.enable_sync_regs(SYNC_REGS)
    for i in range(5):
        assert type(vcpu.run()) is exits.IoOut
        regs = vcpu.synced_regs()
        assert regs.rbx == i
        regs.rbx = i + 1
        vcpu.set_synced_regs(regs)
    vcpu.flush_dirty_regs()
    assert vcpu.get_regs().rbx == 5
    vcpu.close(); vm.close()


def test_immediate_exit_returns_interrupted(kvm):
    vm, vcpu, mem = real_mode_vm(kvm, bytes([0xEB, 0xFE]))  # jmp $
    vcpu.set_immediate_exit(True)
    assert vcpu.run() is exits.INTERRUPTED
    vcpu.close(); vm.close()


def test_unknown_exit_is_data():
    assert exits.Unknown(999, 0) == exits.Unknown(999, 0)
    with pytest.raises(Exception):
        exits.IoOut(1, 1, 1, b"x").port = 2  # frozen


def test_state_blobs_round_trip(kvm):
    vm, vcpu, mem = real_mode_vm(kvm, bytes([0xF4]))
    for get, put in ((vcpu.get_fpu, vcpu.set_fpu), (vcpu.get_xsave, vcpu.set_xsave),
                     (vcpu.get_xcrs, vcpu.set_xcrs), (vcpu.get_vcpu_events, vcpu.set_vcpu_events),
                     (vcpu.get_debugregs, vcpu.set_debugregs)):
        blob = get()
        put(blob)
        assert get() == blob
    with pytest.raises(ValueError):
        vcpu.set_fpu(b"short")
    vcpu.close(); vm.close()
