"""The control plane's listening sockets. They are made here (not by aiohttp) so the Unix
socket is created 0600 from the start, a live daemon on the same path is detected instead
of being unlinked, and sockets passed by systemd are used as they are. A daemon binds them
before it builds its VM (early.py), before the HTTP side (server.py) is even loaded."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat

from xend_lite.daemon.config import DaemonConfig, TcpAddress, read_token
from xend_lite.daemon.connections import BACKLOG
from xend_lite.daemon.exitcodes import ExitCode, StartError
from xend_lite.daemon.systemd import listen_fds
from xend_lite.errors import ConfigError
from xend_lite.record import Record

log = logging.getLogger("xend_lite.server")
_daemon_log = logging.getLogger("xend_lite.daemon")


class ListenError(Exception):
    """A listening socket could not be set up; the message says what and how to fix it."""


class Listener(Record):
    __slots__ = ("sock", "kind", "where", "owned_path")

    def __init__(self, sock: socket.socket, kind: str, where: str, owned_path: str | None = None):
        self.sock = sock
        self.kind = kind                # "unix" or "tcp"
        self.where = where              # path or host:port, for logs
        self.owned_path = owned_path    # a socket file we created and must remove


class Listeners(Record):
    __slots__ = ("items",)

    def __init__(self, items: list[Listener] | None = None):
        self.items = [] if items is None else items

    def close(self) -> None:
        for lst in self.items:
            with contextlib.suppress(OSError):
                lst.sock.close()
            remove_socket_file(lst.owned_path)
        self.items.clear()


def remove_socket_file(path: str | None) -> None:
    if not path:
        return
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove socket %s: %s", path, exc.strerror)


def bind_unix(path: str) -> Listener:
    """A listening Unix socket at ``path``, mode 0600, its directory created 0700 if
    missing. A stale socket file (nobody answers) is replaced; a live one is an error."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ListenError(f"cannot create the socket directory {directory}: {exc.strerror} "
                          "(choose another path with --socket)") from None
    if len(os.fsencode(path)) >= 108:
        raise ListenError(f"socket path {path} is too long for a Unix socket (107 bytes at most): "
                          "choose a shorter one with --socket")
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"socket path {path} exists and is not a socket: remove it or choose "
                              "another with --socket")
        if _socket_answers(path):
            raise ListenError(f"socket path {path} is in use by a running daemon: stop it, or give "
                              "this one another --socket")
        log.info("removing stale socket %s", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"socket path {path} is in use: stop the other daemon or give this one "
                              "another --socket") from None
        raise ListenError(f"cannot bind {path}: {exc.strerror} (choose another path with --socket)") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return Listener(sock, "unix", path, owned_path=path)


def _socket_answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_tcp(addr: TcpAddress) -> Listener:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        how = ("stop what uses it or choose another port with --tcp" if exc.errno == errno.EADDRINUSE
               else "check the address given with --tcp")
        raise ListenError(f"cannot listen on tcp {addr}: {exc.strerror}: {how}") from None
    sock.setblocking(False)
    host, port = sock.getsockname()[:2]
    if not addr.is_loopback:
        log.warning("listening on tcp %s, which is not a loopback address: every client on that "
                    "network can try the token", addr)
    return Listener(sock, "tcp", str(TcpAddress(host, port)))


def adopt(sock: socket.socket) -> Listener:
    """A socket passed by systemd: used as it is, never unlinked by us."""
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        where = name.decode(errors="replace") if isinstance(name, bytes) else (name or "(unnamed)")
        return Listener(sock, "unix", where)
    host, port = sock.getsockname()[:2]
    return Listener(sock, "tcp", str(TcpAddress(host, port)))


def open_listeners(cfg: DaemonConfig, listeners: Listeners,
                   env: dict[str, str] | None = None) -> str | None:
    """Bind the control sockets (or take those systemd passed) into ``listeners``; the bearer
    token TCP clients need, read before any TCP port opens (None without TCP). A failure
    closes what was opened and is a StartError."""
    passed = listen_fds(env)
    token = None
    try:
        if passed:
            for sock in passed:
                listeners.items.append(adopt(sock))
            _daemon_log.info("using %d socket(s) passed by the service manager", len(passed))
        else:
            listeners.items.append(bind_unix(cfg.socket))
        has_tcp = any(lst.kind == "tcp" for lst in listeners.items)
        if cfg.tcp is not None and not passed:
            token = read_token(cfg.token_file)  # before binding: no open port without it
            listeners.items.append(bind_tcp(cfg.tcp))
        elif has_tcp:
            if not cfg.token_file:
                raise ConfigError("a TCP socket was passed but control.token_file is not set: TCP "
                                  "clients need a bearer token (--token-file)")
            token = read_token(cfg.token_file)
    except ListenError as exc:
        listeners.close()
        raise StartError(ExitCode.SOCKET, str(exc)) from exc
    except ConfigError as exc:
        listeners.close()
        raise StartError(ExitCode.CONFIG, str(exc)) from exc
    return token
