"""The real-guest builders: PVH GRUB, Debian's cloud kernel and a busybox initramfs are built
from installed packages, parse, and load (PVH entry found, initrd described)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from xend_lite.machine import kernel, loader
from xend_lite.machine.loader import load_elf, load_image, parse_elf
from tests.machine.test_loader import FakeMachine

from . import build

MIB = 1 << 20
CFG = "echo xend-lite grub probe\nhalt\n"


def _pvh_entry(elf: bytes) -> int:
    _bits, _entry, phdrs = parse_elf(elf)
    entry = loader.find_pvh_entry(elf, phdrs)
    assert entry is not None, "no PVH entry note"
    return entry


def _exec_segment_holds(elf: bytes, paddr: int) -> bool:
    """Whether an executable PT_LOAD segment's file bytes cover ``paddr``."""
    is64 = elf[4] == 2
    phoff, = struct.unpack_from("<Q" if is64 else "<I", elf, 32 if is64 else 28)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54 if is64 else 42)
    for i in range(phnum):
        off = phoff + i * phentsize
        if is64:
            p_type, flags, _o, _v, p_paddr, filesz = struct.unpack_from("<IIQQQQ", elf, off)
        else:
            p_type, _o, _v, p_paddr, filesz, _m, flags = struct.unpack_from("<IIIIIII", elf, off)
        if p_type == loader.PT_LOAD and flags & 1 and p_paddr <= paddr < p_paddr + filesz:
            return True
    return False


# -- PVH GRUB -------------------------------------------------------------------------------

def test_grub_image_is_a_32bit_pvh_elf_holding_its_config(grub_image):
    path = grub_image(CFG)
    elf = path.read_bytes()
    bits, _e_entry, _ph = parse_elf(elf)
    assert bits == 32
    assert _exec_segment_holds(elf, _pvh_entry(elf))
    assert CFG.encode() in elf          # grub-mkimage embeds the config as it is


def test_grub_images_are_cached_by_their_inputs(grub_image):
    first = grub_image(CFG)
    stamp = first.stat().st_mtime_ns
    assert grub_image(CFG) == first and first.stat().st_mtime_ns == stamp
    assert grub_image(CFG + "echo more\n") != first
    assert grub_image(CFG, ("normal", "echo", "halt")) != first


def test_grub_default_modules_exist(grub_image):
    grub_image(CFG)   # skips where GRUB is missing
    assert set(build.GRUB_MODULES) <= set(build.grub_modules_available())


def test_grub_unknown_module_is_named(grub_image, realguests_cache):
    grub_image(CFG)
    with pytest.raises(ValueError, match="nosuchmodule"):
        build.grub_image(realguests_cache, CFG, ("normal", "nosuchmodule"))


def test_grub_loads_at_its_pvh_entry(grub_image):
    elf = grub_image(CFG).read_bytes()
    m = FakeMachine(64 * MIB)
    try:
        info = load_elf(m, elf, "")
        assert info.pvh and info.elf_class == 32 and info.entry == _pvh_entry(elf)
        assert info.start_info == loader.START_INFO_GPA
    finally:
        m.close()


# -- Debian's cloud kernel --------------------------------------------------------------------

def test_cloud_kernel_is_a_bzimage_with_an_elf_vmlinux(linux_kernel):
    raw = linux_kernel().read_bytes()
    assert kernel.is_bzimage(raw)
    k = kernel.unpack_kernel(raw)
    assert k.container == "bzimage" and k.compression in kernel.SUPPORTED
    assert k.header.version >= (2, 8) and k.header.kernel_version.startswith("6.")
    bits, _e_entry, _ph = parse_elf(k.elf)
    assert bits == 64
    assert _exec_segment_holds(k.elf, _pvh_entry(k.elf))


def test_cloud_kernel_payload_matches_the_lz4_tool(linux_kernel, tmp_path):
    raw = linux_kernel().read_bytes()
    h = kernel.parse_setup_header(raw)
    payload = raw[h.payload_offset:h.payload_offset + h.payload_length]
    if kernel.payload_format(payload) != "lz4":
        pytest.skip(f"this kernel's payload is {kernel.payload_format(payload)}, not LZ4")
    if shutil.which("lz4") is None:
        pytest.skip("the lz4 tool is not installed (apt-get install lz4)")
    src = tmp_path / "payload.lz4"
    src.write_bytes(payload)
    # the tool decodes the frames and then complains about Linux's size trailer
    theirs = subprocess.run(["lz4", "-dc", str(src)], capture_output=True).stdout
    assert len(theirs) > 10 * MIB
    assert kernel.unpack_kernel(raw).elf == theirs
    assert struct.unpack("<I", payload[-4:])[0] == len(theirs)


def test_vmlinux_file_is_the_unpacked_kernel(linux_kernel, linux_vmlinux):
    assert linux_vmlinux().read_bytes() == kernel.unpack_kernel(linux_kernel().read_bytes()).elf


def test_cloud_kernel_loads_with_a_busybox_initramfs(linux_kernel, busybox_initramfs):
    raw = linux_kernel().read_bytes()
    initrd = busybox_initramfs("echo hello from init\npoweroff -f\n").read_bytes()
    elf = kernel.unpack_kernel(raw).elf
    m = FakeMachine(256 * MIB)
    try:
        info = load_elf(m, elf, "console=hvc0 rdinit=/init", initrd)
        assert info.pvh and info.elf_class == 64 and info.entry == _pvh_entry(elf)
        assert info.initrd.gpa >= info.image_end and info.initrd.gpa % 4096 == 0
        assert m.mem.read(info.initrd.gpa, len(initrd)) == initrd
        si = loader.START_INFO.unpack(m.mem.read(info.start_info, loader.START_INFO.size))
        assert si[3] == 1
        assert loader.MODLIST_ENTRY.unpack(m.mem.read(si[4], 32))[:2] == (info.initrd.gpa, len(initrd))
        _bits, _e, phdrs = parse_elf(elf)
        first = next(p for p in phdrs if p.type == loader.PT_LOAD)
        assert m.mem.read(first.paddr, 4096) == elf[first.offset:first.offset + 4096]
    finally:
        m.close()


# -- the busybox initramfs --------------------------------------------------------------------

def _listing(archive: bytes) -> list[str]:
    return subprocess.run(["/bin/busybox", "cpio", "-tv"], input=archive, capture_output=True,
                          check=True).stdout.decode().splitlines()


def test_initramfs_holds_init_busybox_and_console(busybox_initramfs, tmp_path):
    script = "mount -t proc proc /proc\necho xend-lite initramfs\npoweroff -f\n"
    path = busybox_initramfs(script, applets=("sh", "mount", "echo", "poweroff"),
                             files={"bin/extra": b"#!/bin/sh\necho extra\n"})
    archive = path.read_bytes()
    lines = _listing(archive)
    by_name = {ln.split()[5]: ln for ln in lines}
    assert by_name["init"].startswith("-rwxr-xr-x")
    assert by_name["bin/busybox"].startswith("-rwxr-xr-x")
    assert by_name["dev/console"].startswith("crw-------")
    assert by_name["bin/sh"].startswith("lrwxrwxrwx") and by_name["bin/sh"].endswith("-> busybox")
    assert {"bin/mount", "bin/echo", "bin/poweroff", "bin/extra", "proc", "sys"} <= set(by_name)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["/bin/busybox", "cpio", "-i", "-d", "init", "bin/busybox", "bin/extra"],
                   input=archive, cwd=out, check=True, capture_output=True)
    assert (out / "init").read_text() == "#!/bin/sh\n" + script
    assert (out / "bin/busybox").read_bytes() == build.busybox_path().read_bytes()
    assert os.access(out / "init", os.X_OK)
    assert (out / "bin/extra").read_bytes() == b"#!/bin/sh\necho extra\n"
    if shutil.which("cpio"):   # GNU cpio also shows the device numbers
        gnu = subprocess.run(["cpio", "-tv", "--quiet"], input=archive, capture_output=True,
                             check=True).stdout.decode()
        assert any(ln.startswith("crw-------") and "5,   1" in ln and ln.endswith("dev/console")
                   for ln in gnu.splitlines()), gnu


def test_initramfs_is_deterministic_and_cached(busybox_initramfs):
    a = busybox_initramfs("echo a\n")
    assert busybox_initramfs("echo a\n") == a
    b = busybox_initramfs("echo b\n")
    assert a != b and a.read_bytes() != b.read_bytes()


def test_cpio_rejects_repeated_names():
    from .cpio import directory, newc

    with pytest.raises(ValueError, match="repeated"):
        newc([directory("bin"), directory("/bin")])


@pytest.mark.kvm
def test_load_image_takes_the_bzimage_into_a_real_machine(linux_kernel, busybox_initramfs):
    from xend_lite.kvm import Kvm
    from xend_lite.machine.machine import Machine

    raw = linux_kernel().read_bytes()
    initrd = busybox_initramfs("poweroff -f\n").read_bytes()
    with Kvm() as k:
        m = Machine(k, 256 * MIB, 1)
        try:
            info = load_image(m, raw, "console=hvc0", initrd=initrd)
            assert info.pvh and info.entry == _pvh_entry(kernel.unpack_kernel(raw).elf)
            regs = m.runners[0].vcpu.get_regs()
            assert regs.rip == info.entry and regs.rbx == loader.START_INFO_GPA
        finally:
            m.close()
