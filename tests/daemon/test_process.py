"""The xend-lite process as a whole (run as a subprocess with a FakeDomain): signals, exit
statuses for start errors and guest poweroff, sd_notify, socket activation, log format, and
the xend-lite-ctl client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
FAKE = [PY, "-m", "tests.daemon.fakedaemon"]
REAL = [PY, "-m", "xend_lite.daemon.main"]
CTL = [PY, "-m", "xend_lite.cli.ctl"]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC", "JOURNAL_STREAM")}
    e["PYTHONPATH"] = REPO
    e.update(extra)
    return e


def spawn(args, cmd=FAKE, **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd + args, cwd=REPO, env=kw.pop("env", None) or env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def run(args, cmd=FAKE, timeout=20, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd + args, cwd=REPO, env=kw.pop("env", None) or env(), text=True,
                          capture_output=True, timeout=timeout, **kw)


def answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_listening(proc: subprocess.Popen, path: str, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not answers(path):
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > end:
            raise AssertionError("daemon did not start listening")
        time.sleep(0.05)


def ctl(sock: str, *args, timeout=20) -> subprocess.CompletedProcess:
    return run(["--socket", sock, *args], cmd=CTL, timeout=timeout)


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout=10.0) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
        raise AssertionError(f"daemon did not stop on {sig!r}: {err}") from None
    return proc.returncode, err


@pytest.fixture
def sock(short_tmp):
    return os.path.join(short_tmp, "d.sock")


def base_args(short_tmp, sock):
    return ["--socket", sock, "--snapshot-dir", short_tmp]


# -- signals -------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(short_tmp, sock, sig):
    proc = spawn(base_args(short_tmp, sock))
    wait_listening(proc, sock)
    assert json.loads(ctl(sock, "query-status").stdout)["status"] == "running"
    rc, err = stop(proc, sig)
    assert rc == 0, err
    assert not os.path.exists(sock)
    assert f"{sig.name} received" in err
    assert "Traceback" not in err


def test_second_signal_exits_at_once(short_tmp, sock):
    proc = spawn(base_args(short_tmp, sock), env=env(FAKE_DOMAIN_CLOSE_SECONDS="30"))
    wait_listening(proc, sock)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # still stopping the (slow) VM
    t0 = time.monotonic()
    rc, err = stop(proc, signal.SIGINT, timeout=10)
    assert time.monotonic() - t0 < 5
    assert rc == 1 and "received again" in err
    assert not os.path.exists(sock)


def test_quit_exits_zero_and_removes_the_socket(short_tmp, sock):
    proc = spawn(base_args(short_tmp, sock))
    wait_listening(proc, sock)
    r = ctl(sock, "quit")
    assert r.returncode == 0 and json.loads(r.stdout) == {}
    assert proc.wait(10) == 0
    assert not os.path.exists(sock)


def test_guest_poweroff_code_is_the_exit_status(short_tmp, sock):
    r = run(base_args(short_tmp, sock) + ["--cmdline", "poweroff:5@200"])
    assert r.returncode == 5, r.stderr
    assert "guest stopped: poweroff (code 5)" in r.stderr
    assert not os.path.exists(sock)


def test_guest_clean_poweroff_exits_zero(short_tmp, sock):
    r = run(base_args(short_tmp, sock) + ["--cmdline", "poweroff@100"])
    assert r.returncode == 0, r.stderr


def test_on_poweroff_pause_stays_up(short_tmp, sock):
    proc = spawn(base_args(short_tmp, sock) + ["--cmdline", "poweroff:5@50", "--on-poweroff", "pause"])
    wait_listening(proc, sock)
    time.sleep(0.3)
    assert proc.poll() is None
    assert json.loads(ctl(sock, "query-status").stdout)["status"] == "shutdown"
    assert stop(proc)[0] == 0


# -- start errors --------------------------------------------------------------------------

def one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("xend-lite:")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_bad_option_value(short_tmp, sock):
    r = run(base_args(short_tmp, sock) + ["--memory", "lots"])
    assert r.returncode == 78
    assert "--memory" in one_line_error(r)


def test_bad_config_file(short_tmp, sock, tmp_path):
    cfg = tmp_path / "x.toml"
    cfg.write_text("[guest]\nmemory = \"big\"\n")
    r = run(base_args(short_tmp, sock) + ["--config", str(cfg)])
    assert r.returncode == 78
    assert "guest.memory" in one_line_error(r)
    cfg.write_text("[guest]\nbogus = 1\n")
    r = run(base_args(short_tmp, sock) + ["--config", str(cfg)])
    assert r.returncode == 78 and "guest.bogus" in one_line_error(r)


def test_unknown_option_is_a_usage_error(short_tmp, sock):
    r = run(base_args(short_tmp, sock) + ["--frobnicate"])
    assert r.returncode == 2


def test_missing_image(short_tmp, sock):
    r = run(base_args(short_tmp, sock) + ["--image", os.path.join(short_tmp, "nope.elf")])
    assert r.returncode == 66
    assert "nope.elf does not exist" in one_line_error(r)


def test_no_kvm_device(short_tmp, sock):
    r = run(base_args(short_tmp, sock) + ["--kvm", os.path.join(short_tmp, "kvm")], cmd=REAL)
    assert r.returncode == 69
    assert "does not exist" in one_line_error(r)


def test_kvm_device_without_permission(short_tmp, sock):
    dev = os.path.join(short_tmp, "kvm")
    open(dev, "w").close()
    os.chmod(dev, 0)
    if os.access(dev, os.R_OK | os.W_OK):
        # root passes access(2) on any file; an unusable device is still refused
        r = run(base_args(short_tmp, sock) + ["--kvm", dev], cmd=REAL)
        assert r.returncode in (69, 70)
        one_line_error(r)
        return
    r = run(base_args(short_tmp, sock) + ["--kvm", dev], cmd=REAL)
    assert r.returncode == 69 and "permission" in one_line_error(r)


def test_socket_in_use(short_tmp, sock):
    proc = spawn(base_args(short_tmp, sock))
    wait_listening(proc, sock)
    try:
        r = run(base_args(short_tmp, sock))
        assert r.returncode == 73
        assert "in use" in one_line_error(r)
        r = run(base_args(short_tmp, sock) + ["--debug"])
        assert r.returncode == 73 and "Traceback" in r.stderr
    finally:
        assert stop(proc)[0] == 0


def test_snapshot_not_loadable(short_tmp, sock):
    r = run(base_args(short_tmp, sock) + ["--restore", os.path.join(short_tmp, "none.snap")])
    assert r.returncode == 65
    assert "none.snap" in one_line_error(r)
    bad = os.path.join(short_tmp, "bad.snap")
    with open(bad, "w") as f:
        f.write("not a snapshot")
    r = run(base_args(short_tmp, sock) + ["--restore", bad])
    assert r.returncode == 65
    assert "cannot be loaded" in one_line_error(r)
    assert not os.path.exists(sock)


def test_restore_at_start(short_tmp, sock):
    proc = spawn(base_args(short_tmp, sock))
    wait_listening(proc, sock)
    assert ctl(sock, "xen-overlay-map", "page=shared_info", "gpa=0x400000").returncode == 0
    assert ctl(sock, "snapshot-save", "path=s.snap").returncode == 0
    assert stop(proc)[0] == 0
    # --restore is the operator's own path: anywhere, not only in the snapshot directory
    elsewhere = os.path.join(short_tmp, "elsewhere")
    os.mkdir(elsewhere)
    os.rename(os.path.join(short_tmp, "s.snap"), os.path.join(elsewhere, "s.snap"))
    proc = spawn(base_args(short_tmp, sock) + ["--restore", os.path.join(elsewhere, "s.snap"), "-S"])
    wait_listening(proc, sock)
    overlay = json.loads(ctl(sock, "query-xen-overlay").stdout)
    assert {"page": "shared_info", "gpa": 0x400000} in overlay
    assert json.loads(ctl(sock, "query-status").stdout)["status"] == "paused"
    assert stop(proc)[0] == 0


def test_version_and_check():
    r = run(["--version"])
    assert r.returncode == 0 and r.stdout.startswith("xend-lite ")
    r = run(["--check"], cmd=REAL)
    assert r.returncode in (0, 69)
    assert "kvm device:" in r.stdout


# -- systemd -------------------------------------------------------------------------------

class NotifySocket:
    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        """Read what has arrived (a bounded number, as the watchdog never stops sending)."""
        for _ in range(50):
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, socket.timeout):
                break
        return self.messages

    def wait_for(self, field: str, timeout: float = 10.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for m in self.drain():
                if field in m.split("\n"):
                    return m
        raise AssertionError(f"no {field} in {self.messages}")

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_ready_status_watchdog_stopping(short_tmp, sock, abstract):
    if abstract:
        name = f"xend-lite-test-{os.getpid()}-{time.monotonic_ns()}"
        ns = NotifySocket("\0" + name)
        notify_env = "@" + name
    else:
        path = os.path.join(short_tmp, "notify")
        ns = NotifySocket(path)
        notify_env = path
    try:
        proc = spawn(base_args(short_tmp, sock), env=env(NOTIFY_SOCKET=notify_env, WATCHDOG_USEC="200000"))
        ready = ns.wait_for("READY=1")
        assert answers(sock), "READY=1 came before the socket listened"
        assert any(f.startswith("STATUS=guest running") for f in ready.split("\n"))
        assert f"MAINPID={proc.pid}" in ready.split("\n")
        t0 = time.monotonic()
        while sum("WATCHDOG=1" in m.split("\n") for m in ns.drain()) < 3:
            assert time.monotonic() - t0 < 5, ns.messages
        rc, err = stop(proc)
        assert rc == 0, err
        stopping = ns.wait_for("STOPPING=1")
        assert any(f.startswith("STATUS=stopping") for f in stopping.split("\n"))
        before_ready = ns.messages[:ns.messages.index(ready)]
        assert not any("WATCHDOG=1" in m for m in before_ready)
    finally:
        ns.close()


def test_status_follows_the_run_state(short_tmp, sock):
    path = os.path.join(short_tmp, "notify")
    ns = NotifySocket(path)
    try:
        proc = spawn(base_args(short_tmp, sock), env=env(NOTIFY_SOCKET=path))
        ns.wait_for("READY=1")
        assert ctl(sock, "stop").returncode == 0
        msg = None
        end = time.monotonic() + 5
        while msg is None and time.monotonic() < end:
            msg = next((m for m in ns.drain() if m.startswith("STATUS=guest paused")), None)
        assert msg, ns.messages
        assert stop(proc)[0] == 0
    finally:
        ns.close()


ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
if fd != 3:
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "tests.daemon.fakedaemon"] + sys.argv[2:])
"""


def test_socket_activation(short_tmp):
    activated = os.path.join(short_tmp, "act.sock")
    configured = os.path.join(short_tmp, "conf.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(activated)
    lsock.listen(16)
    fd = lsock.fileno()
    try:
        proc = subprocess.Popen([PY, "-c", ACTIVATE, str(fd), "--socket", configured,
                                 "--snapshot-dir", short_tmp],
                                cwd=REPO, env=env(), text=True, pass_fds=[fd],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        end = time.monotonic() + 15
        r = None
        while time.monotonic() < end:
            r = ctl(activated, "query-status", timeout=5)
            if r.returncode == 0:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        assert r is not None and r.returncode == 0, r.stderr if r else ""
        assert json.loads(r.stdout)["status"] == "running"
        assert not os.path.exists(configured)  # the passed socket replaces the configured path
        rc, err = stop(proc)
        assert rc == 0, err
        assert "passed by the service manager" in err
        assert os.path.exists(activated)        # systemd's socket file is not ours to remove
    finally:
        lsock.close()


def test_listen_fds_for_another_pid_are_ignored(short_tmp, sock):
    proc = spawn(base_args(short_tmp, sock), env=env(LISTEN_FDS="1", LISTEN_PID="1"))
    wait_listening(proc, sock)
    assert stop(proc)[0] == 0


def test_journal_log_prefixes(short_tmp, sock):
    proc = spawn(base_args(short_tmp, sock), env=env(JOURNAL_STREAM="8:1234"))
    wait_listening(proc, sock)
    rc, err = stop(proc)
    assert rc == 0
    lines = [ln for ln in err.splitlines() if ln]
    assert lines and all(ln.startswith("<") and ln[2] == ">" for ln in lines), err
    assert any(ln.startswith("<6>xend_lite.daemon: xend-lite serving on") for ln in lines)


def test_plain_log_format(short_tmp, sock):
    proc = spawn(base_args(short_tmp, sock))
    wait_listening(proc, sock)
    _rc, err = stop(proc)
    assert any(ln.startswith("INFO xend_lite.daemon: xend-lite serving on") for ln in err.splitlines())


# -- xend-lite-ctl -------------------------------------------------------------------------

def test_ctl(short_tmp, sock):
    proc = spawn(base_args(short_tmp, sock))
    wait_listening(proc, sock)
    try:
        events = subprocess.Popen(CTL + ["--socket", sock, "events"], cwd=REPO, env=env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.8)  # let it subscribe
        r = ctl(sock, "xen-overlay-map", "page=shared_info", "gpa=4194304")
        assert r.returncode == 0 and json.loads(r.stdout) == {"page": "shared_info", "gpa": 0x400000}
        r = ctl(sock, "query-console", "max_bytes=5")
        assert r.returncode == 0 and json.loads(r.stdout) == {"data": "oted\n"}
        r = ctl(sock, "stop")
        assert r.returncode == 0
        r = ctl(sock, "stop")         # already paused: a no-op, as in QMP (no second STOP)
        assert r.returncode == 0 and json.loads(r.stdout) == {}
        r = ctl(sock, "snapshot-load", "path=missing.xls")
        assert r.returncode == 1 and "NotFound" in r.stderr
        r = ctl(sock, "xen-overlay-map", "page=shared_info", "gpa=oops")
        assert r.returncode == 1 and "'gpa'" in r.stderr
        r = ctl(sock, "no-such-method")
        assert r.returncode == 1 and "Method not found" in r.stderr
        r = ctl(sock, "stop", "novalue")
        assert r.returncode == 2
    finally:
        assert stop(proc)[0] == 0
    out, _ = events.communicate(timeout=10)
    assert events.returncode == 0
    names = [json.loads(ln)["event"] for ln in out.splitlines()]
    assert names == ["XEN_OVERLAY_MAPPED", "STOP", "SHUTDOWN"]


def test_ctl_without_daemon(short_tmp):
    r = ctl(os.path.join(short_tmp, "none.sock"), "query-status")
    assert r.returncode == 3
    assert "cannot reach" in r.stderr


def test_ctl_value_parsing():
    from xend_lite.cli.ctl import parse_params

    assert parse_params(["a=1", "b=0x10", "c=true", "d=hello", "e=\"5\"", "f={\"x\":1}", "g="]) == \
        {"a": 1, "b": 16, "c": True, "d": "hello", "e": "5", "f": {"x": 1}, "g": ""}
    with pytest.raises(ValueError):
        parse_params(["novalue"])


def test_ctl_over_tcp_with_token(short_tmp, sock):
    token = os.path.join(short_tmp, "token")
    with open(token, "w") as f:
        f.write("tcp-token-0123456789abcdef\n")
    os.chmod(token, 0o666)        # anyone could read or change it: the daemon will not start
    r = run(base_args(short_tmp, sock) + ["--tcp", "127.0.0.1:1", "--token-file", token])
    assert r.returncode == 78 and "chmod 600" in one_line_error(r)
    assert not os.path.exists(sock)
    os.chmod(token, 0o600)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = spawn(base_args(short_tmp, sock) + ["--tcp", f"127.0.0.1:{port}", "--token-file", token])
    wait_listening(proc, sock)
    try:
        url = f"http://127.0.0.1:{port}"
        r = run(["--tcp", url, "--token-file", token, "query-status"], cmd=CTL)
        assert r.returncode == 0 and json.loads(r.stdout)["status"] == "running"
        wrong = os.path.join(short_tmp, "wrong")
        with open(wrong, "w") as f:
            f.write("not-the-token-0123456789\n")
        r = run(["--tcp", url, "--token-file", wrong, "query-status"], cmd=CTL)
        assert r.returncode == 1 and "Unauthorized" in r.stderr
        r = run(["--tcp", url, "query-status"], cmd=CTL)
        assert r.returncode == 1 and "Unauthorized" in r.stderr
    finally:
        assert stop(proc)[0] == 0
