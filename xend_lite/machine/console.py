"""The console sink: guest output to stdout, a log file and an in-memory ring."""

from __future__ import annotations

import os
import sys
import threading
from typing import BinaryIO

# Ports a guest writes its console to: Xen's/Bochs' debug ports and a 16550's registers.
DEBUG_PORTS = (0x12, 0xE9)
UART_BASE = 0x3F8
UART_LSR = UART_BASE + 5
LSR_THR_EMPTY = 0x60  # transmitter holding register and shift register empty


class ConsoleSink:
    """Collects guest console bytes. Thread-safe; writes are flushed line by line."""

    def __init__(self, stdout: bool = False, log_path: str | None = None, ring_bytes: int = 64 * 1024,
                 stream: BinaryIO | None = None):
        self._lock = threading.Lock()
        self._ring = bytearray()
        self._ring_max = ring_bytes
        self.total = 0
        self._stream = stream if stream is not None else (sys.stdout.buffer if stdout else None)
        self._log = open(log_path, "ab", buffering=0) if log_path else None  # noqa: SIM115
        self._listeners: list = []

    def add_listener(self, fn) -> None:
        """fn(bytes) is called (on the writer's thread) with every chunk written."""
        self._listeners.append(fn)

    def write(self, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            self._ring += data
            if len(self._ring) > self._ring_max:
                del self._ring[:len(self._ring) - self._ring_max]
            self.total += len(data)
            if self._stream is not None:
                try:
                    self._stream.write(data)
                    if b"\n" in data:
                        self._stream.flush()
                except (OSError, ValueError):
                    self._stream = None
            if self._log is not None:
                try:
                    self._log.write(data)
                except OSError:
                    pass
        for fn in self._listeners:
            fn(data)

    def tail(self, max_bytes: int = 4096) -> bytes:
        with self._lock:
            return bytes(self._ring[-max_bytes:]) if max_bytes > 0 else b""

    def restore_ring(self, data: bytes) -> None:
        """Put back a saved ring (a restore): the tail queries show what the guest printed
        before the save. Nothing is written to stdout or the log again."""
        with self._lock:
            self._ring = bytearray(data[-self._ring_max:])

    def text(self) -> str:
        return self.tail(self._ring_max).decode("utf-8", "replace")

    def flush(self) -> None:
        with self._lock:
            if self._stream is not None:
                try:
                    self._stream.flush()
                except (OSError, ValueError):
                    pass
            if self._log is not None:
                try:
                    os.fsync(self._log.fileno())
                except OSError:
                    pass

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
