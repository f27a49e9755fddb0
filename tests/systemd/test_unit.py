"""Run the daemon the way systemd/xend-lite.service does: its ExecStart line (the binary path
swapped for this checkout's), the environment systemd gives a Type=notify service with a
watchdog, a fake NOTIFY_SOCKET, and the kernel's deny-write-execute flag that
MemoryDenyWriteExecute=yes sets (PR_SET_MDWE); then socket activation as xend-lite@.socket
does. READY, WATCHDOG and STOPPING must arrive and the guest must really run."""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).parent / "xend-lite"
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1

pytestmark = pytest.mark.kvm


def unit_value(unit: str, key: str) -> str:
    for line in (ROOT / "systemd" / unit).read_text().splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1]
    raise KeyError(key)


def mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0


# A tiny launcher: deny write+execute mappings for itself and what it execs, as systemd's
# MemoryDenyWriteExecute= does on kernels with PR_SET_MDWE, then exec the daemon.
LAUNCH = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed: %d" % ctypes.get_errno())
os.execv(sys.argv[1], sys.argv[1:])
"""


def rpc(path: str, method: str, params: dict | None = None) -> dict:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}).encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def recv_until(sock: socket.socket, want: str, timeout: float, seen: list[str]) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            break
        seen.extend(msg.splitlines())
        if want in msg.splitlines():
            return True
    return False


@pytest.fixture
def short_tmp():
    import tempfile

    d = tempfile.mkdtemp(prefix="xlu-", dir="/tmp")
    yield Path(d)
    subprocess.run(["rm", "-rf", d])


def test_execstart_under_mdwe_with_notify_and_watchdog(short_tmp):
    if not mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE, so MemoryDenyWriteExecute cannot be tried")
    argv = shlex.split(unit_value("xend-lite.service", "ExecStart"))
    assert argv[0] == "/usr/local/bin/xend-lite"
    sock = short_tmp / "xend-lite.sock"
    cfg = short_tmp / "xend-lite.toml"
    cfg.write_text((ROOT / "config" / "xend-lite.toml").read_text())
    argv = [str(EXE)] + [str(cfg) if a == "/etc/xend-lite/xend-lite.toml" else
                         str(sock) if a == "/run/xend-lite/xend-lite.sock" else a for a in argv[1:]]
    assert str(cfg) in argv and str(sock) in argv, argv
    notify = short_tmp / "notify"
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(notify))
    watchdog_sec = unit_value("xend-lite.service", "WatchdogSec").rstrip("s")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    # systemd sets WATCHDOG_USEC from WatchdogSec; shortened here so a ping comes quickly
    env |= {"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "400000",
            "STATE_DIRECTORY": str(short_tmp), "RUNTIME_DIRECTORY": str(short_tmp)}
    assert int(watchdog_sec) > 0
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: list[str] = []
    try:
        assert recv_until(ns, "READY=1", 20, seen), (seen, proc.poll())
        assert sock.exists() and (sock.stat().st_mode & 0o777) == 0o600
        assert recv_until(ns, "WATCHDOG=1", 5, seen), seen
        assert rpc(str(sock), "query-status")["result"]["status"] == "running"
        end = time.monotonic() + 10
        while time.monotonic() < end:
            hc = rpc(str(sock), "query-hypercalls")["result"]
            if hc.get("hypercalls", {}).get("memory_op"):
                break
            time.sleep(0.05)
        assert hc["hypercalls"]["memory_op"]["calls"] >= 1, hc   # the guest ran under MDWE
        proc.send_signal(signal.SIGTERM)
        assert recv_until(ns, "STOPPING=1", 10, seen), seen
        assert proc.wait(15) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ns.close()


def test_socket_activation_as_the_socket_unit_does(short_tmp):
    assert unit_value("xend-lite@.socket", "SocketMode") == "0600"
    sock = short_tmp / "vm1.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(sock))
    os.chmod(sock, 0o600)
    lsock.listen(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    env |= {"LISTEN_FDS": "1", "STATE_DIRECTORY": str(short_tmp)}
    # LISTEN_PID must be the daemon's own pid: set it in the child just before exec
    launch = ("import os, sys\nos.dup2(int(sys.argv[1]), 3)\nos.environ['LISTEN_PID'] = str(os.getpid())\n"
              "os.execv(sys.argv[2], sys.argv[2:])\n")
    proc = subprocess.Popen([sys.executable, "-c", launch, str(lsock.fileno()), str(EXE),
                             "--socket", str(short_tmp / "unused.sock")],
                            env=env, pass_fds=(lsock.fileno(),),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 20
        while True:
            try:
                status = rpc(str(sock), "query-status")
                break
            except (ConnectionError, json.JSONDecodeError, socket.timeout, IndexError):
                assert time.monotonic() < end and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "timeout"
                time.sleep(0.1)
        assert status["result"]["status"] == "running"
        assert not (short_tmp / "unused.sock").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lsock.close()
