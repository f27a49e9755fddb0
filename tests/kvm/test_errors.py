"""KvmError: one exception type that names the failing ioctl and keeps the raw errno."""

from __future__ import annotations

import errno

import pytest

from xend_lite.kvm import KvmError

pytestmark = pytest.mark.kvm


def test_bad_memory_slot_names_ioctl_and_errno(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(0x7FFF, 0, 4096, 0x10000)
    err = info.value
    assert isinstance(err, OSError)
    assert err.errno == errno.EINVAL
    assert err.call == "KVM_SET_USER_MEMORY_REGION"
    assert "KVM_SET_USER_MEMORY_REGION" in str(err) and "EINVAL" in str(err)


def test_unaligned_region_is_refused(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(0, 0x123, 4096, 0x10000)
    assert info.value.errno == errno.EINVAL


def test_duplicate_vcpu_id(kvm):
    with kvm.create_vm() as vm:
        v = vm.create_vcpu(0)
        try:
            with pytest.raises(KvmError) as info:
                vm.create_vcpu(0)
            assert info.value.errno == errno.EEXIST
            assert info.value.call == "KVM_CREATE_VCPU"
        finally:
            v.close()


def test_state_blob_of_wrong_size_is_refused_before_the_ioctl(kvm):
    with kvm.create_vm() as vm:
        v = vm.create_vcpu(0)
        try:
            good = v.get_fpu()
            with pytest.raises(ValueError, match="KVM_SET_FPU"):
                v.set_fpu(good[:-1])
            v.set_fpu(good)  # the right size goes through
        finally:
            v.close()


def test_closed_vcpu_close_is_idempotent(kvm):
    with kvm.create_vm() as vm:
        v = vm.create_vcpu(0)
        v.close()
        v.close()
        assert v.fd == -1
