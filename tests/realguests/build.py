"""Builders of real guests from Debian's installed packages (nothing is downloaded): PVH GRUB
with an embedded config, the cloud kernel's bzImage and its vmlinux, and a busybox initramfs.

Each builder writes into a cache directory under a name made from its inputs, so a session
builds each distinct guest once. A package that is missing is a ``Missing`` naming it (the
pytest fixtures turn that into a skip); anything else that goes wrong is an error.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from . import cpio

GRUB_PLATFORM = "i386-xen_pvh"
GRUB_DIR = Path("/usr/lib/grub") / GRUB_PLATFORM
GRUB_PREFIX = "/boot/grub"
# What a scripted config needs: the normal-mode parser and the commands tests use.
GRUB_MODULES = ("normal", "echo", "halt", "reboot", "test", "sleep", "true")
KERNEL_GLOB = "/boot/vmlinuz-*-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
# Applets linked into /bin of the initramfs by default (busybox also runs any other by name).
APPLETS = ("sh", "mount", "umount", "echo", "cat", "ls", "mkdir", "sleep", "poweroff", "reboot",
           "halt", "dmesg", "uname", "sync", "grep", "true", "false", "test", "[", "printf")


class Missing(Exception):
    """A package the builder needs is not installed; the message says which."""


def _key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _publish(tmp: Path, out: Path) -> Path:
    os.replace(tmp, out)
    return out


def grub_modules_available() -> list[str]:
    return sorted(p.stem for p in GRUB_DIR.glob("*.mod"))


def grub_image(cache: Path, cfg_text: str, modules: tuple[str, ...] = GRUB_MODULES) -> Path:
    """PVH GRUB (a 32-bit ELF with the PVH entry note) whose embedded config is ``cfg_text``,
    built by grub-mkimage with ``modules`` (their dependencies come along)."""
    mkimage = shutil.which("grub-mkimage")
    if mkimage is None:
        raise Missing("grub-mkimage is not installed (apt-get install grub-common)")
    if not (GRUB_DIR / "kernel.img").exists():
        raise Missing(f"{GRUB_DIR} is missing (apt-get install grub-xen-bin)")
    absent = [m for m in modules if not (GRUB_DIR / f"{m}.mod").exists()]
    if absent:
        raise ValueError(f"GRUB modules not in {GRUB_DIR}: {', '.join(absent)}")
    out = cache / f"grub-{_key(cfg_text, modules, (GRUB_DIR / 'kernel.img').stat().st_mtime)}.pvh"
    if out.exists():
        return out
    cfg = out.with_suffix(".cfg")
    cfg.write_text(cfg_text)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run([mkimage, "-O", GRUB_PLATFORM, "-d", str(GRUB_DIR), "-p", GRUB_PREFIX,
                           "-c", str(cfg), "-o", str(tmp), *modules], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"grub-mkimage failed: {proc.stderr.strip()}")
    return _publish(tmp, out)


def _version_key(path: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def linux_kernel() -> Path:
    """The newest installed cloud kernel's bzImage, as Debian installed it."""
    found = sorted(glob.glob(KERNEL_GLOB), key=_version_key)
    if not found:
        raise Missing(f"no {KERNEL_GLOB} (apt-get install --no-install-recommends "
                      "linux-image-cloud-amd64)")
    return Path(found[-1])


def linux_vmlinux(cache: Path) -> Path:
    """The ELF vmlinux inside the cloud kernel's bzImage, through xend-lite's own reader."""
    from xend_lite.machine.kernel import unpack_kernel

    bz = linux_kernel()
    st = bz.stat()
    out = cache / f"vmlinux-{_key(str(bz), st.st_size, st.st_mtime)}"
    if out.exists():
        return out
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(unpack_kernel(bz.read_bytes()).elf)
    return _publish(tmp, out)


def busybox_path() -> Path:
    """The static busybox (busybox-static installs it as /bin/busybox)."""
    if not BUSYBOX.exists():
        raise Missing("/bin/busybox is missing (apt-get install busybox-static)")
    if _has_interp(BUSYBOX):
        raise Missing(f"{BUSYBOX} is not statically linked (apt-get install busybox-static)")
    return BUSYBOX


def _has_interp(path: Path) -> bool:
    """Whether an ELF asks for a dynamic loader (a PT_INTERP program header)."""
    import struct

    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return True
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def initramfs_entries(init_script: str, busybox: bytes, applets: tuple[str, ...] = APPLETS,
                      files: dict[str, bytes] | None = None) -> list[cpio.Entry]:
    """/init (the script), /bin/busybox with ``applets`` linked to it, /dev/console, and the
    directories an init mounts on; ``files`` adds more executables (path -> bytes, in those
    directories)."""
    entries = [cpio.directory(d) for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc")]
    entries.append(cpio.chardev("dev/console", 5, 1))
    entries.append(cpio.chardev("dev/null", 1, 3, 0o666))
    entries.append(cpio.file("bin/busybox", busybox, 0o755))
    entries += [cpio.symlink(f"bin/{a}", "busybox") for a in applets if a != "busybox"]
    script = init_script if init_script.startswith("#!") else "#!/bin/sh\n" + init_script
    entries.append(cpio.file("init", script.encode(), 0o755))
    for name, data in sorted((files or {}).items()):
        entries.append(cpio.file(name.lstrip("/"), data, 0o755))
    return entries


def busybox_initramfs(cache: Path, init_script: str, applets: tuple[str, ...] = APPLETS,
                      files: dict[str, bytes] | None = None) -> Path:
    """An uncompressed newc initramfs whose /init is ``init_script`` run by busybox's sh."""
    busybox = busybox_path().read_bytes()
    key = _key(init_script, applets, sorted((files or {}).items()), hashlib.sha256(busybox).digest())
    out = cache / f"initramfs-{key}.cpio"
    if out.exists():
        return out
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(cpio.newc(initramfs_entries(init_script, busybox, applets, files)))
    return _publish(tmp, out)
