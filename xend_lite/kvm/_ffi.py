"""Loads the compiled cffi module. Only the kvm package imports this."""

from __future__ import annotations

try:
    from xend_lite.kvm._kvm import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "xend_lite.kvm._kvm is not built: install the package (make venv, or pip install .) "
        "on a host with gcc and <linux/kvm.h>"
    ) from exc

__all__ = ["ffi", "lib"]
