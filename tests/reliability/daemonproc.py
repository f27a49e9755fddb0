"""The real xend-lite as a subprocess (real guest, Unix socket and TCP with a token), and a
raw HTTP client that can send anything, including what a well-behaved client never would."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import time

from tests.daemon.test_process import REAL, REPO, env, wait_listening

TOKEN = "s3cret-token-0123456789abcdefghijklmnopqrstuvwxyz"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class DaemonProc:
    def __init__(self, tmp: str, memory_mib: int = 32, tcp: bool = True, extra: list[str] | None = None,
                 nofile: tuple[int, int] | None = None):
        """``nofile``: the (soft, hard) open-file limit the daemon starts with."""
        self.tmp = tmp
        self.sock = os.path.join(tmp, "d.sock")
        self.port = free_port() if tcp else None
        args = ["--socket", self.sock, "--snapshot-dir", tmp, "--memory", str(memory_mib),
                "--log-level", "warning"]
        if tcp:
            token_file = os.path.join(tmp, "token")
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, TOKEN.encode() + b"\n")
            os.close(fd)
            args += ["--tcp", f"127.0.0.1:{self.port}", "--token-file", token_file]
        self.log_path = os.path.join(tmp, "daemon.log")
        self.log = open(self.log_path, "w")
        limit = None if nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile))
        self.proc = subprocess.Popen(REAL + args + (extra or []), cwd=REPO, env=env(), text=True,
                                     stdout=subprocess.DEVNULL, stderr=self.log, preexec_fn=limit)
        try:
            wait_listening(self.proc, self.sock)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def call(self, method: str, params=None, rid: int = 1):
        req = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            req["params"] = params
        status, _h, body = http(self.sock, json.dumps(req).encode())
        assert status == 200, (status, body)
        reply = json.loads(body)
        assert reply.get("id") == rid, reply
        return reply

    def result(self, method: str, params=None):
        reply = self.call(method, params)
        assert "result" in reply, reply
        return reply["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def connect(where, timeout: float = 20.0) -> socket.socket:
    if isinstance(where, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(where)
    return s


def http(where, body: bytes, headers: dict | None = None, path: str = "/rpc", method: str = "POST",
         content_length: int | None = None, timeout: float = 20.0) -> tuple[int, dict, bytes]:
    """One request on its own connection; returns (status, headers, body)."""
    h = {"Host": "xend-lite", "Content-Type": "application/json", "Connection": "close"}
    h.update(headers or {})
    h["Content-Length"] = str(len(body) if content_length is None else content_length)
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    s = connect(where, timeout)
    try:
        try:
            s.sendall(head.encode() + body)
        except (BrokenPipeError, ConnectionResetError):
            pass    # the server may answer (413) and close before reading everything
        raw = b""
        while not complete(raw):
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                break
            if not b:
                break
            raw += b
    finally:
        s.close()
    return parse_response(raw)


def complete(raw: bytes) -> bool:
    """The whole response is in (the server may linger before closing, so do not wait for
    EOF when the length is known)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return len(body) >= int(v)
    return False


def parse_response(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines and lines[0].startswith("HTTP/1."), f"not an HTTP response: {raw[:200]!r}"
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        n = int(data[pos:end].split(b";")[0], 16)
        if n == 0:
            return bytes(out)
        out += data[end + 2:end + 2 + n]
        pos = end + 2 + n + 2


def wait_until(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)
