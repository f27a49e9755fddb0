"""Connection floods against the real daemon under the usual 1024-descriptor limit: 2,000
connections that send half a header (over the Unix socket and TCP, without the token) do not
stop a client's query-status from being answered, fill the log, or outlive the request
timeout; a burst of 2,000 local connects while the daemon is stopped is queued, not refused;
the descriptor limit is raised to its hard limit at start."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import tempfile
import time

import pytest

from .daemonproc import TOKEN, DaemonProc, http, wait_until

pytestmark = pytest.mark.kvm

HALF = b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Le"
QUERY_STATUS = b'{"jsonrpc":"2.0","id":1,"method":"query-status"}'
QUERY_HEAD = (f"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(QUERY_STATUS)}\r\n\r\n").encode()
USUAL = (1024, 1024)


@pytest.fixture
def tmp():
    path = tempfile.mkdtemp(prefix="xl-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def flood(where, n: int, send: bytes = HALF, persist: float = 0.0) -> tuple[list[socket.socket], int]:
    """``n`` non-blocking connects, each then sending ``send``; (the sockets, how many
    connects were refused). With ``persist``, a refused Unix connect is tried again for that
    many seconds, as an attacker would."""
    socks, todo = [], n
    deadline = time.monotonic() + persist
    while True:
        refused = 0
        for _ in range(todo):
            s = socket.socket(socket.AF_UNIX if isinstance(where, str) else socket.AF_INET)
            s.setblocking(False)
            try:
                s.connect(where)
            except BlockingIOError as exc:
                if isinstance(where, str):      # a Unix socket's backlog is full: refused
                    refused += 1
                    s.close()
                    continue
                assert exc.errno == errno.EINPROGRESS
            except OSError:
                refused += 1
                s.close()
                continue
            socks.append(s)
        todo = refused
        if not todo or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    time.sleep(0.2)
    for s in socks:
        try:
            s.send(send)
        except OSError:
            pass
    return socks, refused


def answered(where, headers=None, timeout: float = 20.0) -> float:
    """Seconds query-status took on a new connection (it must be answered)."""
    t0 = time.monotonic()
    status, _h, body = http(where, QUERY_STATUS, headers=headers, timeout=timeout)
    assert status == 200 and b'"running"' in body, (status, body[:200])
    return time.monotonic() - t0


def still_open(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the daemon has not closed (what it sent is read and dropped)."""
    n = 0
    for s in socks:
        try:
            while s.recv(65536, socket.MSG_DONTWAIT):
                pass
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n


def test_a_flood_of_half_open_connections_does_not_stop_query_status(tmp):
    d = DaemonProc(tmp, nofile=USUAL)
    socks: list[socket.socket] = []
    try:
        tcp = ("127.0.0.1", d.port)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        lines_before = d.log_text().count("\n")
        for where, n in ((d.sock, 1500), (tcp, 500)):
            got, _refused = flood(where, n, persist=5)
            socks += got
        took = [answered(d.sock), answered(tcp, auth)]
        more, _ = flood(d.sock, 1000, persist=5)   # newcomers keep replacing the oldest
        socks += more
        took += [answered(d.sock), answered(tcp, auth)]
        print(f"\nquery-status under a flood of {len(socks)} connections: "
              f"{', '.join(f'{t * 1000:.0f} ms' for t in took)}")
        assert d.alive()
        # every connection that never sent a whole request is gone by the request timeout
        wait_until(lambda: still_open(socks) == 0, 10, "the half-open connections to be closed")
        lines = d.log_text().count("\n") - lines_before
        print(f"log lines during the flood: {lines}")
        assert lines < 100, d.log_text()[-2000:]
        assert "Traceback" not in d.log_text()
        answered(d.sock)
        assert d.result("query-status")["status"] == "running"
    finally:
        for s in socks:
            s.close()
        d.stop()


def test_slow_requests_are_closed_after_the_request_timeout(tmp):
    d = DaemonProc(tmp, tcp=False)
    try:
        silent, _ = flood(d.sock, 1, b"")
        half, _ = flood(d.sock, 1)
        body, _ = flood(d.sock, 1, QUERY_HEAD + QUERY_STATUS[:10])   # the body stops short
        request = QUERY_HEAD + QUERY_STATUS
        drip, _ = flood(d.sock, 1, request[:1])
        t0 = time.monotonic()
        conns = silent + half + body + drip
        while still_open(conns):
            assert time.monotonic() - t0 < 10, "a connection without a whole request stayed open"
            sent = int(time.monotonic() - t0) + 2
            try:                           # a byte a second: progress is no excuse
                drip[0].send(request[sent - 1:sent])
            except OSError:
                pass
            time.sleep(1.0)
        took = time.monotonic() - t0
        print(f"\nclosed after {took:.1f} s")
        assert took >= 3
        answered(d.sock)
        for s in conns:
            s.close()
    finally:
        d.stop()


def test_a_burst_of_local_connects_is_queued_not_refused(tmp):
    d = DaemonProc(tmp, tcp=False)
    socks: list[socket.socket] = []
    try:
        cap = int(open("/proc/sys/net/core/somaxconn").read())
        if cap < 2048:
            pytest.skip(f"net.core.somaxconn is {cap} here: the kernel caps any backlog below "
                        "a burst of 2,000")
        os.kill(d.pid, signal.SIGSTOP)      # nobody accepts: everything waits in the backlog
        try:
            socks, refused = flood(d.sock, 2000, b"")
        finally:
            os.kill(d.pid, signal.SIGCONT)
        print(f"\n{refused} of 2000 connects refused")
        assert refused == 0
        for s in socks:
            s.close()
        answered(d.sock)
    finally:
        for s in socks:
            s.close()
        d.stop()


def test_the_open_file_limit_is_raised_to_the_hard_limit(tmp):
    d = DaemonProc(tmp, tcp=False, nofile=(1024, 4096))
    try:
        answered(d.sock)
        with open(f"/proc/{d.pid}/limits") as f:
            line = next(ln for ln in f if ln.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
    finally:
        d.stop()

