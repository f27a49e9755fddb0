"""Kvm: the /dev/kvm system fd. Makes Vm objects and answers capability questions."""

from __future__ import annotations

import os

from xend_lite.kvm._ffi import ffi, lib
from xend_lite.kvm.errors import KvmError, check
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

KVM_DEVICE = "/dev/kvm"


class CpuidEntry(Frozen):
    __slots__ = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    def __init__(self, function: int, index: int, flags: int, eax: int, ebx: int, ecx: int,
                 edx: int):
        _set(self, "function", function)
        _set(self, "index", index)
        _set(self, "flags", flags)
        _set(self, "eax", eax)
        _set(self, "ebx", ebx)
        _set(self, "ecx", ecx)
        _set(self, "edx", edx)


class Kvm:
    """Owns one open /dev/kvm. Close it, or use it as a context manager."""

    def __init__(self, path: str = KVM_DEVICE):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"open {path}", exc.errno or 0) from exc
        version = self.api_version()
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(f"KVM_GET_API_VERSION returned {version}", 22)
        self._mmap_size: int | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def api_version(self) -> int:
        return check("KVM_GET_API_VERSION", lib.xl_ioctl_int(self.fd, lib.KVM_GET_API_VERSION, 0))

    def check_extension(self, cap: int) -> int:
        """The capability's value (0 when absent). Negative answers count as absent."""
        return max(0, lib.xl_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap))

    def vcpu_mmap_size(self) -> int:
        if self._mmap_size is None:
            self._mmap_size = check(
                "KVM_GET_VCPU_MMAP_SIZE", lib.xl_ioctl_int(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0))
        return self._mmap_size

    def supported_cpuid(self) -> list[CpuidEntry]:
        n = 256
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            ret = lib.xl_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
            if ret == -7 and n < 65536:  # E2BIG: the table grew
                n *= 2
                continue
            check("KVM_GET_SUPPORTED_CPUID", ret)
            return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in buf.entries[0:buf.nent]]

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST)."""
        n = 512
        while True:
            buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            ret = lib.xl_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, buf)
            if ret == -7 and n < 65536:
                n = max(n * 2, buf.nmsrs)
                continue
            check("KVM_GET_MSR_INDEX_LIST", ret)
            return list(buf.indices[0:buf.nmsrs])

    def create_vm(self):
        from xend_lite.kvm.vm import Vm

        fd = check("KVM_CREATE_VM", lib.xl_ioctl_int(self.fd, lib.KVM_CREATE_VM, 0))
        return Vm(self, fd)


# Capability numbers, by name, for reports and feature detection.
CAPABILITIES: dict[str, int] = {
    name[len("KVM_CAP_"):].lower(): getattr(lib, name)
    for name in dir(lib) if name.startswith("KVM_CAP_")
}
