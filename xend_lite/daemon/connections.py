"""Connection limits of the control plane: what keeps a flood of idle or half-open
connections from taking the daemon down.

aiohttp has no defence of its own against clients that connect and then send nothing, or
half a header, or a body byte by byte: each holds a file descriptor for as long as it likes,
and at the descriptor limit the listening sockets stop accepting, the Unix socket included.
So every accepted connection is wrapped (``Connection``, around aiohttp's own protocol object
made by the runner's public ``server`` factory) and counted by a ``ConnectionGuard``:

- A request (headers and body) must arrive within ``request_timeout`` of its first byte, and
  a new connection must start one within that time; otherwise the connection is closed. The
  clock stops while a handler holds the connection (``hold``: the body is in and the reply is
  being made, or it is an event stream) and starts again with the next request's first byte.
- At most ``max_connections`` are open at once (below the descriptor limit, which is raised
  to its hard limit at start), and at most ``max_unauthenticated`` TCP connections that have
  not yet sent the token. A new connection at a cap closes the oldest one that is not held:
  TCP connections without the token first, then idle or half-open ones. A held connection (a
  client being answered, an event subscriber) is never closed for a newcomer; a newcomer that
  finds only held connections is refused.

So however many idle or half-open connections arrive, a client that sends a whole request
gets in and is answered. Listening sockets get a backlog that a burst of local connects does
not overflow, and accept errors are logged at a bounded rate.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

log = logging.getLogger("xend_lite.connections")

__all__ = ["Connection", "ConnectionGuard", "Limits", "RateLimitedLog", "hold",
           "on_response_prepare", "raise_fd_limit", "BACKLOG"]

REQUEST_TIMEOUT = 5.0       # seconds from a request's first byte to all of it (headers + body)
MAX_CONNECTIONS = 1000      # open at once, at most; fewer when the descriptor limit is low
MAX_UNAUTHENTICATED = 64    # TCP connections that have not yet sent the token
FD_RESERVE = 64             # descriptors kept beyond those open at start (snapshots, logs)
#: The listen backlog asked for: above a burst of 2,000 local connects. The kernel caps it
#: at net.core.somaxconn, which is checked at start.
BACKLOG = 4096
#: How many connections asyncio accepts per turn of the loop (create_server's backlog). It is
#: kept at asyncio's default, and the kernel backlog raised with listen() afterwards: asyncio
#: uses one number for both, and when accept() fails for lack of descriptors it logs the error
#: and schedules a retry for each of those accepts in one turn; at 4096 that was thousands of
#: log records and timers per turn.
ACCEPTS_PER_TURN = 100


class Limits(Frozen):
    __slots__ = ("max_connections", "max_unauthenticated", "request_timeout")
    max_connections: int
    max_unauthenticated: int
    request_timeout: float

    def __init__(self, max_connections: int = MAX_CONNECTIONS,
                 max_unauthenticated: int = MAX_UNAUTHENTICATED,
                 request_timeout: float = REQUEST_TIMEOUT):
        _set(self, "max_connections", max_connections)
        _set(self, "max_unauthenticated", max_unauthenticated)
        _set(self, "request_timeout", request_timeout)

    @classmethod
    def for_fd_limit(cls, nofile: int, in_use: int, listeners: int = 1) -> Limits:
        """The caps for a process allowed ``nofile`` descriptors with ``in_use`` open now.
        Beyond the reserve, each listener may accept ACCEPTS_PER_TURN connections in one turn
        of the loop before the descriptors of those they replace are closed (a transport
        closes its socket on the next turn)."""
        room = max(8, nofile - in_use - FD_RESERVE - ACCEPTS_PER_TURN * listeners)
        conns = min(MAX_CONNECTIONS, room)
        return cls(conns, max(1, min(MAX_UNAUTHENTICATED, conns // 4)))


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def fds_in_use() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def somaxconn() -> int | None:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


class RateLimitedLog:
    """At most ``burst`` records at once, then one per ``interval`` seconds carrying the
    count of those left out."""

    def __init__(self, logger: logging.Logger, burst: int = 5, interval: float = 10.0):
        self.logger, self.burst, self.interval = logger, burst, interval
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.dropped = 0

    def __call__(self, level: int, msg: str, *args: Any) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) / self.interval)
        self.last = now
        if self.tokens < 1:
            self.dropped += 1
            return False
        self.tokens -= 1
        if self.dropped:
            msg += f" ({self.dropped} more like this not logged)"
            self.dropped = 0
        self.logger.log(level, msg, *args)
        return True


class Connection(asyncio.Protocol):
    """One accepted connection: aiohttp's protocol object inside, the guard's bookkeeping
    around it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol, tcp: bool):
        self.guard = guard
        self.inner = inner
        self.tcp = tcp
        self.authenticated = not tcp      # Unix-socket clients are trusted by the socket mode
        self.held = False                 # a handler is answering it, or streams events
        self.pending = False              # bytes of a request no handler has taken yet
        self.transport: asyncio.Transport | None = None
        self.started = False              # aiohttp's side has the connection
        self.closed = False
        # the request clock: its deadline, and one timer that is moved on by letting it run
        # out and setting it again, not remade for every request
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        if not self.guard.admit(self):
            self.closed = True
            transport.abort()
            return
        self.started = True
        self.inner.connection_made(transport)
        self._arm()                       # the first request must come in time too

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.pending and not self.held:
            self.pending = True
            self._arm()
        elif not self.pending:
            self.pending = True           # pipelined behind a held request: timed on release
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self.closed else self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        self.guard.forget(self)
        self.closed = True
        if self.started:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- the guard's side ----------------------------------------------------------------

    def hold(self) -> None:
        """A handler has the whole request (so the client passed the token check, if any):
        the clock stops and the connection is not closed for newcomers."""
        self.held = True
        self.pending = False
        self._disarm()
        self.guard.held(self)

    def release(self) -> None:
        """A reply is on its way: idle again. After a held request, bytes that came in the
        meantime began the next one, whose clock starts now; a reply to a request no
        handler held (a refusal, an unknown path) ends that request's clock."""
        if not self.held:
            self.pending = False
            self._disarm()
            return
        self.held = False
        self.guard.touch(self)
        if self.pending:
            self._arm()

    def close(self, why: str) -> None:
        if self.closed or self.transport is None:
            return
        self._stop_clock()
        self.closed = True
        self.guard.closed_by_us(self, why)
        self.transport.abort()

    def _arm(self) -> None:
        """Start the request clock. A timer already set (for an earlier deadline) is left
        to run out and set again for this one: a keep-alive client's requests make and
        cancel no timer each."""
        loop = self._loop or asyncio.get_running_loop()
        self._deadline = loop.time() + self.guard.limits.request_timeout
        if self._timer is None:
            self._set_timer(loop, self._deadline)

    def _disarm(self) -> None:
        self._deadline = None       # a timer still set finds nothing to do when it runs out

    def _stop_clock(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _set_timer(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._timer_at = when
        self._timer = loop.call_at(when, self._expired)

    def _expired(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.held or self.closed:
            return
        if deadline > self._timer_at:        # the clock started again since the timer was set
            self._set_timer(self._loop or asyncio.get_running_loop(), deadline)
            return
        self.close("no whole request within the request timeout")


class ConnectionGuard:
    def __init__(self, limits: Limits | None = None, nofile: int = 1024):
        self.limits: Limits = limits  # type: ignore[assignment] - set by serve() when None
        self.nofile = nofile
        # insertion order is age: touch() moves a connection to the end
        self._open: dict[Connection, None] = {}
        self._unauthenticated: dict[Connection, None] = {}
        self.counts = {"accepted": 0, "refused": 0, "closed": 0}
        self._say = RateLimitedLog(log)
        self._servers: list[asyncio.AbstractServer] = []

    @property
    def open(self) -> int:
        return len(self._open)

    @property
    def unauthenticated(self) -> int:
        return len(self._unauthenticated)

    def protocol_factory(self, make: Callable[[], asyncio.Protocol], tcp: bool
                         ) -> Callable[[], Connection]:
        return lambda: Connection(self, make(), tcp)

    # -- bookkeeping ---------------------------------------------------------------------

    def admit(self, conn: Connection) -> bool:
        if not conn.authenticated:
            while len(self._unauthenticated) >= self.limits.max_unauthenticated:
                oldest = next(iter(self._unauthenticated))
                oldest.close("too many TCP connections without the token")
        while len(self._open) >= self.limits.max_connections:
            victim = self._victim()
            if victim is None:
                self.counts["refused"] += 1
                self._say(logging.WARNING, "refused a connection: all %d are busy", self.open)
                return False
            victim.close("the connection limit was reached")
        self._open[conn] = None
        if not conn.authenticated:
            self._unauthenticated[conn] = None
        self.counts["accepted"] += 1
        return True

    def _victim(self) -> Connection | None:
        """The connection a newcomer at the cap replaces: the oldest TCP one without the
        token, else the oldest that no handler holds."""
        for conn in self._unauthenticated:
            if not conn.held:
                return conn
        for conn in self._open:
            if not conn.held:
                return conn
        return None

    def touch(self, conn: Connection) -> None:
        if conn in self._open:
            del self._open[conn]
            self._open[conn] = None

    def held(self, conn: Connection) -> None:
        conn.authenticated = True
        self._unauthenticated.pop(conn, None)
        self.touch(conn)

    def forget(self, conn: Connection) -> None:
        self._open.pop(conn, None)
        self._unauthenticated.pop(conn, None)

    def closed_by_us(self, conn: Connection, why: str) -> None:
        self.forget(conn)
        self.counts["closed"] += 1
        self._say(logging.WARNING, "closed a %s connection: %s (%d open)",
                  "TCP" if conn.tcp else "Unix-socket", why, self.open)

    # -- serving -------------------------------------------------------------------------

    async def serve(self, make: Callable[[], asyncio.Protocol],
                    sockets: list[tuple[Any, bool]]) -> None:
        """Serve each (socket, is-TCP) with protocols from ``make`` (aiohttp's
        ``runner.server``), the caps sized to the descriptors left now that the VM is
        built."""
        if self.limits is None:
            self.limits = Limits.for_fd_limit(self.nofile, fds_in_use(), len(sockets))
            log.debug("connection limits: %d open, %d without the token, %.0f s per request "
                      "(%d descriptors)", self.limits.max_connections,
                      self.limits.max_unauthenticated, self.limits.request_timeout, self.nofile)
        loop = asyncio.get_running_loop()
        for sock, tcp in sockets:
            server = await loop.create_server(self.protocol_factory(make, tcp), sock=sock,
                                              backlog=ACCEPTS_PER_TURN)
            sock.listen(BACKLOG)              # the kernel's queue (see ACCEPTS_PER_TURN)
            self._servers.append(server)

    def close(self) -> None:
        """Stop accepting (the connections themselves are closed by aiohttp's runner)."""
        for server in self._servers:
            server.close()
        self._servers.clear()

    def install_exception_handler(self, loop: asyncio.AbstractEventLoop) -> None:
        """Accept errors (out of descriptors or memory) go to the log at a bounded rate;
        asyncio logs each failed accept of a loop turn with a traceback otherwise."""
        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, OSError) and "accept" in str(context.get("message", "")):
                self._say(logging.ERROR, "cannot accept connections: %s (%d open)",
                          os.strerror(exc.errno or errno.EIO), self.open)
                return
            loop.default_exception_handler(context)

        loop.set_exception_handler(handler)


def start_guard() -> ConnectionGuard:
    """At the start of the start: raise the descriptor limit, log accept errors at a bounded
    rate, and say if the kernel caps the listen backlog below a local burst. The caps are
    sized when ``serve`` is called."""
    cap = somaxconn()
    if cap is not None and cap < 2048:
        log.warning("net.core.somaxconn is %d: a burst of more local connects than that is "
                    "refused (sysctl -w net.core.somaxconn=4096)", cap)
    guard = ConnectionGuard(nofile=raise_fd_limit())
    guard.install_exception_handler(asyncio.get_running_loop())
    return guard


def connection_of(request: Any) -> Connection | None:
    transport = request.transport
    proto = transport.get_protocol() if transport is not None else None
    return proto if isinstance(proto, Connection) else None


def hold(request: Any) -> None:
    """A handler has the whole request: see ``Connection.hold``."""
    conn = connection_of(request)
    if conn is not None:
        conn.hold()


async def on_response_prepare(request: Any, response: Any) -> None:
    """The app's signal: a reply is about to go out, so the connection is idle again. An
    event stream's upgrade is not the end of it: that connection stays held until it
    closes."""
    if isinstance(response, web.WebSocketResponse):
        return
    conn = connection_of(request)
    if conn is not None:
        conn.release()
