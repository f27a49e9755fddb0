"""systemd integration without libsystemd: sd_notify over $NOTIFY_SOCKET, the watchdog
interval, socket activation ($LISTEN_FDS), and a journald-friendly log format."""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Mapping

log = logging.getLogger("xend_lite.systemd")

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages when the service manager asked for them (NOTIFY_SOCKET is
    set); otherwise every call is a no-op. Abstract socket names start with '@'."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        if addr.startswith("@"):
            self._addr = b"\0" + addr[1:].encode()
        elif addr.startswith("/"):
            self._addr = addr
        elif addr:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name; not notifying", addr)
        self._sock: socket.socket | None = None
        self.sent: list[str] = []
        self._watchdog = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *fields: str) -> bool:
        if self._addr is None:
            return False
        msg = "\n".join(fields)
        try:
            if self._sock is None:
                # non-blocking: a manager that stops reading must not stall the event loop
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                           | socket.SOCK_NONBLOCK)
            self._sock.sendto(msg.encode(), self._addr)
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", msg.split("\n", 1)[0], exc.strerror or exc)
            return False
        self.sent.append(msg)
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    @property
    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1 (half the manager's timeout), or None."""
        return None if self._watchdog is None else self._watchdog / 2

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number; no watchdog pings", usec)
        return None
    return value / 1e6 if value > 0 else None


def listen_fds(env: dict[str, str] | None = None, unset: bool = True) -> list[socket.socket]:
    """The sockets systemd passed (fd 3 onward) when LISTEN_PID names this process."""
    env = os.environ if env is None else env
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    if not count:
        return []
    if pid != str(os.getpid()):
        log.debug("LISTEN_FDS is for pid %s, not this process; ignored", pid)
        return []
    try:
        n = int(count)
    except ValueError:
        log.warning("LISTEN_FDS=%r is not a number; ignored", count)
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        try:
            s = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("passed fd %d is not a socket (%s); ignored", fd, exc.strerror or exc)
            continue
        s.setblocking(False)
        socks.append(s)
    return socks


# -- logging -------------------------------------------------------------------------------

_SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
                    logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    """"<6>xend_lite.controller: message": journald reads the priority from the prefix."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.split("\n"))


def setup_logging(level: str, env: Mapping[str, str] | None = None, stream=None) -> logging.Handler:
    env = os.environ if env is None else env
    handler = logging.StreamHandler(stream or sys.stderr)
    if env.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("xend_lite")
    for h in list(root.handlers):
        if getattr(h, "_xend_lite", False):
            root.removeHandler(h)
    handler._xend_lite = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False
    return handler
