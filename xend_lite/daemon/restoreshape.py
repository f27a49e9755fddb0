"""``--restore FILE`` builds the VM the snapshot was saved from: its memory, vCPUs and Xen
settings come from the file, so the operator need not repeat them. A value given explicitly
(an option or a configuration-file key) that differs from the snapshot's is a ConfigError at
start naming both; one that agrees is fine."""

from __future__ import annotations

from typing import Any

from xend_lite.daemon.config import KEYS_BY_FIELD
from xend_lite.errors import ConfigError
from xend_lite.vmm.shape import SHAPE_FIELDS


def with_shape(cfg: Any, shape: dict[str, Any], explicit: set[str]) -> Any:
    """``cfg`` with the snapshot's shape; ConfigError when an explicit value conflicts."""
    changes: dict[str, Any] = {}
    for field in SHAPE_FIELDS:
        if field not in shape:
            continue
        key = KEYS_BY_FIELD[field]
        name, unit = f"{key.option} ({key.dotted})", " MiB" if field == "memory_mib" else ""
        saved, given = shape[field], getattr(cfg, field)
        if saved == given:
            continue
        if field in explicit:
            raise ConfigError(f"{name} is {given}{unit} but the snapshot {cfg.restore} holds a "
                              f"VM with {saved}{unit}: leave it out (--restore takes the VM's "
                              "shape from the snapshot) or give the same value")
        changes[field] = saved
    return cfg.with_overrides(**changes) if changes else cfg
