"""--initrd / guest.initrd: read from the file and the command line, checked before start,
and carried by DomainSpec to the loader so the guest finds the module."""

from __future__ import annotations

import random
import threading

import pytest

from xend_lite.daemon import config as C
from xend_lite.daemon.main import ExitCode, StartError, build_parser, options_from, preflight
from xend_lite.errors import LoaderError


def test_initrd_from_file_and_option(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[guest]\ninitrd = "/boot/initrd.img"\n')
    assert C.load_config(str(path)).initrd == "/boot/initrd.img"
    ns = build_parser().parse_args(["--config", str(path), "--initrd", "/tmp/other.cpio"])
    assert C.load_config(ns.config, options_from(ns)).initrd == "/tmp/other.cpio"
    assert C.build_config().initrd is None
    path.write_text('[guest]\ninitrd = ""\n')
    assert C.load_config(str(path)).initrd is None


def test_initrd_of_the_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[guest]\ninitrd = 3\n")
    with pytest.raises(C.ConfigError, match="guest.initrd"):
        C.load_config(str(path))


def test_preflight_checks_the_initrd(tmp_path):
    cfg = C.build_config(initrd=str(tmp_path / "missing.cpio"))
    with pytest.raises(StartError, match="initrd .*missing.cpio does not exist: check --initrd") as e:
        preflight(cfg, check_kvm=False)
    assert e.value.code == ExitCode.IMAGE
    with pytest.raises(StartError, match="is not a readable file"):
        preflight(C.build_config(initrd=str(tmp_path)), check_kvm=False)
    real = tmp_path / "initrd"
    real.write_bytes(b"x")
    preflight(C.build_config(initrd=str(real)), check_kvm=False)


@pytest.mark.kvm
def test_domain_hands_the_initrd_to_the_guest(tmp_path, guest_image):
    from xend_lite.vmm.domain import Domain
    from xend_lite.vmm.spec import DomainSpec

    image = tmp_path / "modlist32.elf"
    image.write_bytes(guest_image("machine/guests/modlist32.S", bits=32))
    data = random.Random(11).randbytes(3000)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(data)
    d = Domain(DomainSpec(image=str(image), initrd=str(initrd), memory_mib=32))
    try:
        seen: dict[int, int] = {}
        done = threading.Event()

        def note(port):
            def cb(_r, ex):
                seen[port] = int.from_bytes(ex.data, "little")
                if port == 0x5F4:
                    done.set()
            return cb

        for port in range(0x5F0, 0x5F6):
            d.machine.exits.register_io_out(port, note(port))
        d.start()
        assert done.wait(30)
        h = 0
        for b in data:
            h = (h * 31 + b) & 0xFFFFFFFF
        assert seen[0x5F0] == 1 and seen[0x5F3] == len(data) and seen[0x5F4] == h
        assert seen[0x5F2] == d.boot.initrd.gpa
    finally:
        d.close()


def test_domain_reports_a_missing_initrd(tmp_path):
    from xend_lite.vmm.spec import read_image

    with pytest.raises(LoaderError, match="initrd .* does not exist"):
        read_image(str(tmp_path / "none"), "initrd")
