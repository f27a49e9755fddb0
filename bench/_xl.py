"""What the side-by-side benchmarks need from xend-lite as a process: spawn the daemon with a
NOTIFY_SOCKET we bind (READY=1 is the daemon's own word that it serves), a keep-alive
JSON-RPC client over the Unix socket written on raw sockets (the same weight as the QMP
client it is compared with), /proc readings, and the guests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench._harness import ROOT, Context, Skip, bench_guest, file_tail, stop_process


def require_kvm() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise Skip("/dev/kvm is missing or not accessible")


def daemon_argv() -> list[str]:
    script = ROOT / ".venv" / "bin" / "xend-lite"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from xend_lite.cli.daemon import main; sys.exit(main())"]


def spin_image(ctx: Context) -> Path:
    """bench/guests/spin.S as a plain 32-bit ELF (the loader takes it as it is)."""
    return bench_guest(ctx, "spin")


class RpcError(RuntimeError):
    pass


class Rpc:
    """One keep-alive HTTP/1.1 connection to POST /rpc on a Unix socket."""

    def __init__(self, path: str | os.PathLike, timeout: float = 120.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.buf = b""
        self.next_id = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_bytes(self, method: str, params: dict | None = None) -> bytes:
        req = {"jsonrpc": "2.0", "method": method, "id": self.next_id}
        self.next_id += 1
        if params is not None:
            req["params"] = params
        body = json.dumps(req, separators=(",", ":")).encode()
        return (b"POST /rpc HTTP/1.1\r\nHost: xend-lite\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)) + body

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> bytes:
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RpcError("the daemon closed the connection")
            buf += chunk
        length = 0
        for line in buf[:end].split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        start = end + 4
        while len(buf) < start + length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RpcError("the daemon closed the connection")
            buf += chunk
        self.buf = buf[start + length:]
        return buf[start:start + length]

    def call(self, method: str, params: dict | None = None):
        self.sock.sendall(self.request_bytes(method, params))
        reply = json.loads(self.read_reply())
        if "error" in reply:
            raise RpcError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result")


class Notify:
    """A datagram socket for sd_notify; ``wait_ready`` returns when READY=1 arrives."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def wait_ready(self, timeout: float, proc: subprocess.Popen | None = None) -> float:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no READY=1 from xend-lite")
            self.sock.settimeout(min(left, 0.5))
            try:
                msg = self.sock.recv(4096)
            except TimeoutError:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"xend-lite exited with status {proc.returncode} before READY=1")
                continue
            if b"READY=1" in msg.split(b"\n"):
                t = time.perf_counter()
                # Keep reading, as a service manager does: the daemon sends STATUS= on every
                # state change, and a full datagram queue would block it.
                threading.Thread(target=self._drain, daemon=True).start()
                return t

    def _drain(self) -> None:
        self.sock.settimeout(None)
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Daemon:
    """A xend-lite process in its own temporary directory (socket, notify socket, log)."""

    def __init__(self, *args: str, console_log: bool = False):
        self.dir = tempfile.mkdtemp(prefix="xl-bench-")
        self.socket = os.path.join(self.dir, "ctl.sock")
        self.console = os.path.join(self.dir, "console.log") if console_log else None
        self.notify = Notify(self.dir)
        argv = [*daemon_argv(), "--socket", self.socket, "--log-level", "warning", "--snapshot-dir", self.dir]
        if self.console:
            argv += ["--console-log", self.console]
        argv += list(args)
        env = dict(os.environ, NOTIFY_SOCKET=self.notify.path)
        self.stderr = open(os.path.join(self.dir, "stderr"), "w+b")
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr)
        self.t_ready: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from spawn to READY=1."""
        try:
            self.t_ready = self.notify.wait_ready(timeout, self.proc)
        except Exception as exc:  # noqa: BLE001 - any failure gets the daemon's stderr
            raise RuntimeError(f"{exc}: {self.stderr_text()}") from None
        return self.t_ready - self.t_spawn

    def stderr_text(self) -> str:
        return file_tail(self.stderr)

    def rpc(self) -> Rpc:
        return Rpc(self.socket)

    def close(self) -> None:
        stop_process(self.proc)
        self.notify.close()
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmRSS, RssAnon, RssFile, RssShmem, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            parts = v.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[k] = int(parts[0])
    return out


def memfd_of(pid: int, name_part: str) -> str:
    """/proc/PID/fd/N of the process's memfd whose name contains ``name_part`` (the largest)."""
    best, best_size = None, -1
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("/memfd:") and name_part in target:
            size = os.stat(os.path.join(fd_dir, fd)).st_size
            if size > best_size:
                best, best_size = os.path.join(fd_dir, fd), size
    if best is None:
        raise RuntimeError(f"process {pid} has no memfd named like {name_part!r}")
    return best


def write_random(path: str, offset: int, length: int, chunk: int = 16 << 20) -> None:
    """Write ``length`` random bytes at ``offset`` of a file (a guest's RAM memfd)."""
    fd = os.open(path, os.O_RDWR)
    try:
        done = 0
        while done < length:
            n = min(chunk, length - done)
            os.pwrite(fd, os.urandom(n), offset + done)
            done += n
    finally:
        os.close(fd)


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]
