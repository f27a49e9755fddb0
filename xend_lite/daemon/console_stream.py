"""Guest console output fanned out to attached clients (``GET /console``), each with its own
bounded buffer, and the one writer slot.

Publishing never waits and never grows without bound: a reader whose unsent output passes
``READER_LIMIT`` bytes loses it all and gets, in its place, one line saying how many bytes
were dropped; it stays attached and goes on with what comes next (a console is read by
people: the newest output matters more than a complete history). Only one client at a time
may type into the console (the writer); another asking to write is refused.

Everything here runs on the event loop; the controller hands output from vCPU threads over
with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
from collections import deque

READER_LIMIT = 256 * 1024     # unsent bytes one reader may hold before its backlog is dropped
SEND_CHUNK = 16 * 1024        # bytes handed to a client in one message at most


def dropped_marker(n: int) -> bytes:
    return f"\r\n[xend-lite: {n} bytes of console output dropped: this reader was too slow]\r\n".encode()


class ConsoleReader:
    """One attached client. ``get`` returns the next bytes to send, or None once closed."""

    def __init__(self, limit: int):
        self._limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._ready = asyncio.Event()
        self.dropped = 0            # bytes dropped in all, for the log and tests
        self.closed = False
        self.reason = ""

    def offer(self, data: bytes) -> None:
        if self.closed:
            return
        if self._size + len(data) > self._limit:
            lost = self._size + len(data)
            self.dropped += lost
            self._chunks.clear()
            marker = dropped_marker(lost)
            self._chunks.append(marker)
            self._size = len(marker)
        else:
            self._chunks.append(data)
            self._size += len(data)
        self._ready.set()

    @property
    def pending(self) -> int:
        return self._size

    async def get(self) -> bytes | None:
        while not self._chunks:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        out = bytearray()
        while self._chunks and len(out) < SEND_CHUNK:
            out += self._chunks.popleft()
        self._size -= len(out)
        return bytes(out)

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.reason = reason
            self._ready.set()


class WriterBusy(Exception):
    """Another client holds the console for writing."""


class ConsoleHub:
    def __init__(self, reader_limit: int = READER_LIMIT):
        self._readers: set[ConsoleReader] = set()
        self._limit = reader_limit
        self.writer: ConsoleReader | None = None
        self.closed = False

    @property
    def readers(self) -> int:
        return len(self._readers)

    def attach(self, write: bool) -> ConsoleReader:
        """A new reader; with write=True also the writer, or WriterBusy if one is attached."""
        if write and self.writer is not None:
            raise WriterBusy("another client is attached to the console for writing")
        reader = ConsoleReader(self._limit)
        if self.closed:
            reader.close("the daemon is stopping")
            return reader
        self._readers.add(reader)
        if write:
            self.writer = reader
        return reader

    def detach(self, reader: ConsoleReader) -> None:
        self._readers.discard(reader)
        if self.writer is reader:
            self.writer = None
        reader.close("detached")

    def publish(self, data: bytes) -> None:
        for reader in self._readers:
            reader.offer(data)

    def close(self) -> None:
        self.closed = True
        for reader in list(self._readers):
            reader.close("the daemon is stopping")
        self._readers.clear()
        self.writer = None
