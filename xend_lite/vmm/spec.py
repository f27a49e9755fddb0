"""What a domain is made of, and reading its images."""

from __future__ import annotations

from typing import Any

from xend_lite.errors import LoaderError
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

XEN_VERSION_DEFAULT = "4.16"


class DomainSpec(Frozen):
    """What a domain is made of (the daemon's config builds it). A frozen record
    (record.py), as the other values a start makes."""

    __slots__ = ("image", "initrd", "cmdline", "memory_mib", "vcpus", "xen_version", "domid",
                 "backend", "grant_frames", "console_log", "console_stdout", "kvm_path", "xen",
                 "name", "rewrite_hypercalls", "native_hypercalls")
    image: str | None                 # None: the embedded default guest
    initrd: str | None                # the first PVH module (Linux's initramfs); None: none
    cmdline: str
    memory_mib: int
    vcpus: int
    xen_version: str
    domid: int
    backend: str                      # auto | userspace | kvm-xen
    grant_frames: int
    console_log: str | None
    console_stdout: bool
    kvm_path: str
    xen: bool                         # False: a plain KVM VM, no Xen ABI, no overlay device
    name: str                         # the domain's name in xenstore
    # Xen mode: rewrite Linux's direct vmcall/vmmcall hypercalls so they reach the daemon
    rewrite_hypercalls: bool
    # Xen mode: serve the hot hypercalls xen/dispatch.py names in NATIVE in C on the vCPU
    # thread; False sends every hypercall through the Python dispatcher
    native_hypercalls: bool

    def __init__(self, image: str | None = None, initrd: str | None = None, cmdline: str = "",
                 memory_mib: int = 128, vcpus: int = 1, xen_version: str = XEN_VERSION_DEFAULT,
                 domid: int = 1, backend: str = "auto", grant_frames: int = 64,
                 console_log: str | None = None, console_stdout: bool = False,
                 kvm_path: str = "/dev/kvm", xen: bool = True, name: str = "xend-lite",
                 rewrite_hypercalls: bool = True, native_hypercalls: bool = True):
        _set(self, "image", image)
        _set(self, "initrd", initrd)
        _set(self, "cmdline", cmdline)
        _set(self, "memory_mib", memory_mib)
        _set(self, "vcpus", vcpus)
        _set(self, "xen_version", xen_version)
        _set(self, "domid", domid)
        _set(self, "backend", backend)
        _set(self, "grant_frames", grant_frames)
        _set(self, "console_log", console_log)
        _set(self, "console_stdout", console_stdout)
        _set(self, "kvm_path", kvm_path)
        _set(self, "xen", xen)
        _set(self, "name", name)
        _set(self, "rewrite_hypercalls", rewrite_hypercalls)
        _set(self, "native_hypercalls", native_hypercalls)

    @classmethod
    def from_config(cls, cfg: Any) -> DomainSpec:
        """Take the fields this class knows from any config object that has them."""
        kw = {f: getattr(cfg, f) for f in cls.__slots__ if hasattr(cfg, f)}
        return cls(**kw)


class GuestImages(Frozen):
    """A spec's guest image and initrd, as read."""

    __slots__ = ("image", "initrd")
    image: bytes
    initrd: bytes | None

    def __init__(self, image: bytes, initrd: bytes | None):
        _set(self, "image", image)
        _set(self, "initrd", initrd)

    @classmethod
    def read(cls, spec: DomainSpec) -> GuestImages:
        return cls(read_image(spec.image),
                   read_image(spec.initrd, "initrd") if spec.initrd is not None else None)


def read_image(path: str | None, what: str = "guest image") -> bytes:
    if path is None:
        from xend_lite.guests import default_image

        return default_image()
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise LoaderError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise LoaderError(f"{what} {path} cannot be read: {exc.strerror}") from exc
