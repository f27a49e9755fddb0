"""Waiting for a real guest's console text, for the GRUB and Linux tests."""

from __future__ import annotations

import time

from xend_lite.vmm.domain import Domain


def wait_text(d: Domain, text: str, timeout: float, after: int = 0, every: float = 0.1) -> int:
    """Wait until ``text`` is on the console past offset ``after``; its end offset. Fails
    naming the tail of the console when the guest stops or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        out = d.machine.console.text()
        at = out.find(text, after)
        if at >= 0:
            return at + len(text)
        st = d.machine.status
        assert st is None and time.monotonic() < deadline, \
            f"no {text!r} on the console ({st}): {out[-800:]!r}"
        time.sleep(every)
