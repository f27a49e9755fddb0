"""The snapshot job that runs now, if any: what query-snapshot-job answers from the event
loop while the VM owner saves or loads, and the SNAPSHOT_PROGRESS events it publishes.

A save reports progress as the writer goes (bytes of guest memory written of the total);
a load reports its start and its end. Events are throttled: one per PROGRESS_STEP percent
or per PROGRESS_INTERVAL seconds, and always the last one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("xend_lite.controller")

PROGRESS_STEP = 5          # percent between two progress events
PROGRESS_INTERVAL = 0.5    # seconds between two progress events
LOG_INTERVAL = 1.0         # seconds between two progress log lines


@dataclass
class SnapshotJob:
    kind: str                      # "save" or "load"
    path: str
    emit: Callable[[str, dict], None]
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _sent_pct: int = -1
    _sent_at: float = 0.0
    _logged_at: float = field(default_factory=time.monotonic)

    @property
    def percent(self) -> int:
        return 100 * self.done // self.total if self.total else 0

    def __call__(self, done: int, total: int) -> None:
        """The progress callback (on the VM owner)."""
        with self._lock:
            self.done, self.total = done, total
        now = time.monotonic()
        pct = self.percent
        last = total > 0 and done >= total
        if last or pct >= self._sent_pct + PROGRESS_STEP or now - self._sent_at >= PROGRESS_INTERVAL:
            self._sent_pct, self._sent_at = pct, now
            self.emit("SNAPSHOT_PROGRESS", {"kind": self.kind, "path": self.path, "percent": pct,
                                            "bytes": done, "total": total})
        if last or now - self._logged_at >= LOG_INTERVAL:
            self._logged_at = now
            log.info("%s %s: %d%% (%d of %d MiB)", "saving" if self.kind == "save" else "loading",
                     self.path, pct, done >> 20, total >> 20)

    def finish(self) -> None:
        """The job is done: the last progress event says 100 %."""
        total = self.total or 1
        self._sent_pct = -PROGRESS_STEP
        self(total, total)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            done, total = self.done, self.total
        return {"status": "active", "kind": self.kind, "path": self.path,
                "percent": self.percent, "bytes": done, "total": total,
                "seconds": round(time.monotonic() - self.started, 3)}


IDLE = {"status": "none"}


def memory_size(domain: Any, path: Any) -> int:
    """The guest memory a snapshot holds, for a load's progress (0 if it cannot be told)."""
    try:
        size = type(domain).snapshot_describe(path).get("memory_size", 0)
    except Exception:  # noqa: BLE001 - the load itself reports what is wrong with the file
        return 0
    return size if isinstance(size, int) else 0
