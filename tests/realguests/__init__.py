"""Real guests for the tests, built at test time from Debian's packages: a pytest plugin
(registered in tests/conftest.py) with session-cached builders.

Fixtures (session scope; each skips, naming the package, only where it is missing):
- ``grub_image(cfg_text, modules=GRUB_MODULES) -> Path``: PVH GRUB with ``cfg_text`` as its
  embedded config script.
- ``linux_kernel() -> Path``: the cloud kernel's bzImage in /boot, as installed.
- ``linux_vmlinux() -> Path``: the ELF vmlinux inside it (through xend_lite.machine.kernel).
- ``busybox_initramfs(init_script, applets=APPLETS, files=None) -> Path``: a newc initramfs
  whose /init is the script, run by a static busybox.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import build
from .build import APPLETS, GRUB_MODULES, Missing

__all__ = ["APPLETS", "GRUB_MODULES", "Missing", "build"]


def _or_skip(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except Missing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def realguests_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("realguests")


@pytest.fixture(scope="session")
def grub_image(realguests_cache):
    def make(cfg_text: str, modules: tuple[str, ...] = GRUB_MODULES) -> Path:
        return _or_skip(build.grub_image, realguests_cache, cfg_text, modules)
    return make


@pytest.fixture(scope="session")
def linux_kernel():
    def find() -> Path:
        return _or_skip(build.linux_kernel)
    return find


@pytest.fixture(scope="session")
def linux_vmlinux(realguests_cache):
    def extract() -> Path:
        return _or_skip(build.linux_vmlinux, realguests_cache)
    return extract


@pytest.fixture(scope="session")
def busybox_initramfs(realguests_cache):
    def make(init_script: str, applets: tuple[str, ...] = APPLETS,
             files: dict[str, bytes] | None = None) -> Path:
        return _or_skip(build.busybox_initramfs, realguests_cache, init_script, applets, files)
    return make
