"""Guest images that ship with xend-lite, and the include files test guests share."""

from __future__ import annotations

from importlib import resources

DEFAULT_GUEST = "default.elf"
DEFAULT_SOURCE = "default.S"


def default_image() -> bytes:
    """The embedded default guest (built from default.S; a test keeps the two in sync)."""
    return resources.files(__name__).joinpath(DEFAULT_GUEST).read_bytes()
