"""The safety net under the console and xenstore rings: serve them on the VM owner even when
the guest did not signal. A guest that forgets a notification still gets served, and one
that keeps its rings busy is polled every ``POLL_EVERY`` seconds; while nothing moves the
period doubles up to ``POLL_IDLE_MAX``, so an idle guest costs the host a few wake-ups a
second instead of twenty. A signal from the guest on either port counts as activity and
brings the next poll back to the short period."""

from __future__ import annotations

from typing import Callable

POLL_EVERY = 0.05       # seconds, while the rings move
POLL_IDLE_MAX = 1.0     # seconds, the longest an unsignalled ring waits


class RingPoll:
    def __init__(self, running: Callable[[], bool], serve: list[Callable[[], bool]]):
        self._running = running
        self._serve = serve
        self.period = POLL_EVERY
        self._active = False

    def activity(self) -> None:
        """The guest signalled a ring (any thread): poll at the short period again."""
        self._active = True

    def __call__(self) -> float:
        """One poll (on the owner); returns the seconds until the next."""
        moved = False
        if self._running():
            for serve in self._serve:
                moved = bool(serve()) or moved
        if moved or self._active:
            self._active = False
            self.period = POLL_EVERY
        else:
            self.period = min(POLL_IDLE_MAX, self.period * 2)
        return self.period
