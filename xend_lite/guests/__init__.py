"""Guest images that ship with xend-lite, and the include files test guests share."""

from __future__ import annotations

import os

DEFAULT_GUEST = "default.elf"
DEFAULT_SOURCE = "default.S"


def default_image() -> bytes:
    """The embedded default guest (built from default.S; a test keeps the two in sync). Read
    through the package's own loader (a plain file, or a member of a zip archive): importing
    importlib.resources for it cost about a tenth of the daemon's start."""
    return __spec__.loader.get_data(os.path.join(os.path.dirname(__file__), DEFAULT_GUEST))
