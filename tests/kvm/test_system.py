"""Kvm (the /dev/kvm system fd): API version, capabilities, CPUID and MSR lists."""

from __future__ import annotations

import pytest

from xend_lite.kvm import CAPABILITIES, Kvm, KvmError, const

pytestmark = pytest.mark.kvm

MSR_EFER = 0xC0000080
MSR_LSTAR = 0xC0000082


def test_api_version_is_the_stable_one(kvm):
    assert kvm.api_version() == 12 == const.KVM_API_VERSION


def test_check_extension_reports_present_and_absent(kvm):
    assert kvm.check_extension(const.KVM_CAP_USER_MEMORY) > 0
    assert kvm.check_extension(const.KVM_CAP_NR_MEMSLOTS) >= 32
    # A capability number no kernel has answers 0, never an exception.
    assert kvm.check_extension(0x7FFF_FFF0) == 0


def test_vm_check_extension_agrees_with_system(kvm):
    with kvm.create_vm() as vm:
        assert vm.check_extension(const.KVM_CAP_USER_MEMORY) > 0
        assert vm.check_extension(0x7FFF_FFF0) == 0


def test_capabilities_table_comes_from_the_header():
    assert CAPABILITIES["sync_regs"] == const.KVM_CAP_SYNC_REGS
    assert CAPABILITIES["xen_hvm"] == const.KVM_CAP_XEN_HVM
    assert len(set(CAPABILITIES.values())) == len(CAPABILITIES)


def test_vcpu_mmap_size_holds_kvm_run(kvm):
    size = kvm.vcpu_mmap_size()
    assert size >= 4096 and size % 4096 == 0


def test_supported_cpuid_has_basic_and_extended_leaves(kvm):
    entries = kvm.supported_cpuid()
    functions = {e.function for e in entries}
    assert 0 in functions and 1 in functions and 0x80000000 in functions
    leaf0 = next(e for e in entries if e.function == 0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    assert vendor in (b"GenuineIntel", b"AuthenticAMD", b"HygonGenuine", b"CentaurHauls")
    assert leaf0.eax >= 1  # highest basic leaf
    leaf1 = next(e for e in entries if e.function == 1)
    assert leaf1.edx & 1  # FPU on every x86


def test_msr_index_list_names_long_mode_msrs(kvm):
    indices = kvm.msr_index_list()
    assert MSR_EFER in indices or MSR_LSTAR in indices
    assert len(indices) == len(set(indices))


def test_open_missing_device_names_the_path():
    with pytest.raises(KvmError) as info:
        Kvm("/dev/xend-lite-no-such-kvm")
    assert info.value.errno == 2
    assert "open /dev/xend-lite-no-such-kvm" in str(info.value)


def test_kvm_context_manager_closes_fd():
    with Kvm() as k:
        assert k.fd >= 0
    assert k.fd == -1
    k.close()  # idempotent
