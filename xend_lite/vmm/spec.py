"""What a domain is made of, and reading its images."""

from __future__ import annotations

from typing import Any, NamedTuple

from xend_lite.errors import LoaderError

XEN_VERSION_DEFAULT = "4.16"


class DomainSpec(NamedTuple):
    """What a domain is made of (the daemon's config builds it)."""

    image: str | None = None          # None: the embedded default guest
    initrd: str | None = None         # the first PVH module (Linux's initramfs); None: none
    cmdline: str = ""
    memory_mib: int = 128
    vcpus: int = 1
    xen_version: str = XEN_VERSION_DEFAULT
    domid: int = 1
    backend: str = "auto"             # auto | userspace | kvm-xen
    grant_frames: int = 64
    console_log: str | None = None
    console_stdout: bool = False
    kvm_path: str = "/dev/kvm"
    xen: bool = True                  # False: a plain KVM VM, no Xen ABI, no overlay device
    name: str = "xend-lite"           # the domain's name in xenstore
    # Xen mode: rewrite Linux's direct vmcall/vmmcall hypercalls so they reach the daemon
    rewrite_hypercalls: bool = True
    # Xen mode: serve the hot hypercalls xen/dispatch.py names in NATIVE in C on the vCPU
    # thread; False sends every hypercall through the Python dispatcher
    native_hypercalls: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> DomainSpec:
        """Take the fields this class knows from any config object that has them."""
        kw = {f: getattr(cfg, f) for f in cls._fields if hasattr(cfg, f)}
        return cls(**kw)


class GuestImages(NamedTuple):
    """A spec's guest image and initrd, as read."""

    image: bytes
    initrd: bytes | None

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
