"""Builds the test guests once per session (into pytest's cache dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from xend_lite.guests.build import build_cached, toolchain_missing

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def guest_path(tmp_path_factory):
    """guest_path("machine/guests/hello64.S", bits=64, **defines) -> Path of the ELF."""
    missing = toolchain_missing()
    if missing:
        pytest.skip(missing)
    cache = tmp_path_factory.mktemp("guests")

    def get(rel: str, bits: int = 64, **defines) -> Path:
        return build_cached(TESTS / rel, cache, bits=bits, defines=defines)

    return get


@pytest.fixture(scope="session")
def guest_image(guest_path):
    """guest_image("machine/guests/hello64.S", bits=64, **defines) -> bytes of the ELF."""

    def get(rel: str, bits: int = 64, **defines) -> bytes:
        return guest_path(rel, bits, **defines).read_bytes()

    return get
