"""The event stream: QMP-shaped events fanned out to subscribers, each with its own bounded
queue. Publishing never waits: a subscriber whose queue is full is dropped (its stream is
closed with a reason) so one slow reader cannot hold up the VM or the other readers.

Everything here runs on the event loop; other threads reach ``publish`` through
``loop.call_soon_threadsafe`` (the controller does that).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Callable

log = logging.getLogger("xend_lite.events")

QUEUE_SIZE = 256
HISTORY = 64

# The events the daemon sends, for documentation and for clients to check against.
EVENT_NAMES = ("STOP", "RESUME", "RESET", "SHUTDOWN", "GUEST_PANICKED", "XEN_OVERLAY_MAPPED",
               "XEN_OVERLAY_UNMAPPED", "SNAPSHOT_SAVED", "SNAPSHOT_LOADED", "POWERDOWN",
               "SNAPSHOT_PROGRESS")


def make_event(name: str, data: dict | None, timestamp: float | None = None) -> dict:
    ts = time.time() if timestamp is None else timestamp
    seconds = int(ts)
    return {"event": name,
            "timestamp": {"seconds": seconds, "microseconds": int((ts - seconds) * 1_000_000)},
            "data": dict(data or {})}


class Subscriber:
    """One reader of the stream. ``get`` returns the next event as JSON text, or None once
    the stream ended (the bus closed, or this reader was dropped: see ``reason``)."""

    def __init__(self, bus: EventBus, maxsize: int):
        self._bus = bus
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize)
        self.closed = False
        self.reason = ""
        self._ended = False

    async def get(self) -> str | None:
        if self.closed and self._queue.empty():
            return None
        item = await self._queue.get()
        if item is None:
            self.closed = True
        return item

    def _offer(self, text: str) -> bool:
        if self._ended:
            return False
        try:
            self._queue.put_nowait(text)
            return True
        except asyncio.QueueFull:
            return False

    def _end(self, reason: str, drop_pending: bool) -> None:
        """End the stream: after the pending events (bus closing) or at once (dropped)."""
        if self._ended:
            return
        self._ended = True
        self.reason = reason
        if drop_pending:
            while not self._queue.empty():
                self._queue.get_nowait()
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            # Full with events still to send: the reader gets them, then sees closed.
            self.closed = True
            return
        # `closed` is set when the reader takes the end marker, so pending events still go out.

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self, queue_size: int = QUEUE_SIZE):
        self._subs: set[Subscriber] = set()
        self._queue_size = queue_size
        self.history: deque[dict] = deque(maxlen=HISTORY)
        self.closed = False
        self.dropped = 0
        self.observers: list[Callable[[dict], None]] = []   # told of every event (metrics)

    def subscribe(self) -> Subscriber:
        sub = Subscriber(self, self._queue_size)
        if self.closed:
            sub._end("the daemon is stopping", drop_pending=True)
        else:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def publish(self, name: str, data: dict | None = None, timestamp: float | None = None) -> dict:
        event = make_event(name, data, timestamp)
        try:
            text = json.dumps(event, allow_nan=False)
        except (TypeError, ValueError):
            log.error("event %s has data that cannot be sent as JSON; sent without data", name)
            event["data"] = {}
            text = json.dumps(event)
        self.history.append(event)
        for observe in self.observers:
            observe(event)
        log.debug("event %s", text)
        for sub in list(self._subs):
            if not sub._offer(text):
                self._drop(sub)
        return event

    def _drop(self, sub: Subscriber) -> None:
        self._subs.discard(sub)
        self.dropped += 1
        log.warning("event subscriber dropped: it fell %d events behind", self._queue_size)
        sub._end("too slow: the event queue overflowed", drop_pending=True)

    def close(self) -> None:
        """End every stream after the events already queued (the daemon is stopping)."""
        self.closed = True
        for sub in list(self._subs):
            sub._end("the daemon is stopping", drop_pending=False)
        self._subs.clear()
