"""The packaged default guest: its image matches its source, and it boots."""

from __future__ import annotations

from pathlib import Path

import pytest

import xend_lite.guests as guests
from xend_lite.guests.build import build, toolchain_missing


def test_default_image_is_built_from_its_source(tmp_path):
    missing = toolchain_missing()
    if missing:
        pytest.skip(missing)
    src = Path(guests.__file__).parent / guests.DEFAULT_SOURCE
    out = build(src, tmp_path / "default.elf", bits=64)
    assert out.read_bytes() == guests.default_image(), \
        "default.elf is stale: run python -m xend_lite.guests.build_default"


@pytest.mark.kvm
def test_default_guest_boots_and_looks_for_xen():
    from xend_lite.kvm import Kvm
    from xend_lite.machine.loader import load_image
    from xend_lite.machine.machine import Machine

    with Kvm() as kvm:
        m = Machine(kvm, 32 << 20, 1)
        try:
            info = load_image(m, guests.default_image())
            assert info.pvh and info.elf_class == 64
            m.start()
            deadline_text = "xend-lite default guest: booting"
            for _ in range(100):
                if "idling" in m.console.text() or "Xen " in m.console.text():
                    break
                m.wait(0.05)
            assert deadline_text in m.console.text()
        finally:
            m.close()
