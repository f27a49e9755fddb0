"""Booting Debian's cloud kernel on xend-lite: the command line this kind of host needs.
Shared by the Linux boot tests and bench/linux.py."""

from __future__ import annotations


from xend_lite.vmm.domain import Domain
from xend_lite.vmm.spec import DomainSpec

# CPU features this nested host advertises but whose instructions its KVM cannot run for a
# guest (each one stopped a boot with an emulation failure); Linux leaves them alone when
# told so. noxsave: the host's XSAVE state handling fails the same way.
CLEARED = ("smap", "popcnt", "fsgsbase", "bmi1", "bmi2", "movbe", "avx", "avx2", "avx512f",
           "rdrand", "rdseed", "abm", "cx16", "ssse3")
HOST_ARGS = f"noxsave clearcpuid={','.join(CLEARED)}"
CMDLINE = f"console=hvc0 earlyprintk=xen {HOST_ARGS} loglevel=8"
INIT = "echo INIT-RAN\npoweroff -f\n"
MEMORY_MIB = 256


def boot(kernel, initrd, vcpus: int = 1, cmdline: str = CMDLINE) -> Domain:
    d = Domain(DomainSpec(image=str(kernel), initrd=str(initrd), cmdline=cmdline,
                          memory_mib=MEMORY_MIB, vcpus=vcpus))
    d.start()
    return d
