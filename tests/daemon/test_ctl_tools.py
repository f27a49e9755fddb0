"""xend-lite-ctl's operator tools through a pseudo-terminal: the progress bar of a save,
and the interactive shell (completion, history, events as they arrive)."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import subprocess
import time

from tests.daemon.test_process import CTL

PROMPT = b"xend-lite> "


class Pty:
    """A ctl process on a pseudo-terminal; ``expect`` reads until a string appears."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.master, slave = pty.openpty()
        e = dict(os.environ, TERM="xterm", **(env or {}))
        self.proc = subprocess.Popen(CTL + args, stdin=slave, stdout=slave, stderr=slave,
                                     env=e, close_fds=True, start_new_session=True)
        os.close(slave)
        self.seen = b""

    def _expect(self, what: bytes, timeout: float) -> bytes:
        end = time.monotonic() + timeout
        while what not in self.seen:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"did not see {what!r} in {self.seen[-2000:]!r}")
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"ended before {what!r}: {self.seen[-2000:]!r}")
                self.seen += chunk
        i = self.seen.index(what) + len(what)
        out, self.seen = self.seen[:i], self.seen[i:]
        return out

    async def expect(self, what: str | bytes, timeout: float = 10.0) -> bytes:
        w = what.encode() if isinstance(what, str) else what
        return await asyncio.to_thread(self._expect, w, timeout)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    async def wait(self, timeout: float = 10.0) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


async def test_snapshot_save_draws_a_progress_bar_on_a_terminal(daemon):
    daemon.domain.slow_save = 0.8
    t = Pty(["--socket", daemon.cfg.socket, "snapshot-save", "path=bar.xls"])
    try:
        out = await t.expect(b"}")
        assert await t.wait() == 0
    finally:
        t.close()
    text = out.decode()
    assert "save [" in text and " 25%" in text and "100%" in text
    assert text.index("100%") < text.index('"path"')
    # not on a terminal: the JSON only
    r = await asyncio.to_thread(subprocess.run, CTL + ["--socket", daemon.cfg.socket,
                                                       "snapshot-save", "path=plain.xls"],
                                capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and r.stdout.lstrip().startswith("{") and "[" not in r.stdout


async def test_shell_completion_history_and_events(daemon, tmp_path):
    hist = tmp_path / "hist"
    env = {"XEND_LITE_HISTORY": str(hist)}
    t = Pty(["--socket", daemon.cfg.socket, "shell"], env)
    try:
        await t.expect(PROMPT)
        t.send("query-sta\t")                       # completes the method name
        await t.expect("query-status ")
        t.send("\r")
        await t.expect('"qmp-status": "running"')
        await t.expect(PROMPT)
        t.send("query-console max\t")               # completes a parameter name
        await t.expect("max_bytes=")
        t.send("3\r")
        await t.expect('"data"')
        await t.expect(PROMPT)
        t.send("query-console max_bytes=-1\r")
        await t.expect("error -32602")
        await t.expect(PROMPT)
        t.send("stop\r")                              # its event is printed as it arrives
        await t.expect("[event]")
        await t.expect('"STOP"')
        t.send("\x1b[A\x1b[A\r")                      # history: the line before stop again
        await t.expect("error -32602")
        t.send("quit\r")
        assert await t.wait() == 0
    finally:
        t.close()
    lines = hist.read_text().splitlines()
    assert "stop" in lines and "query-status" in [ln.strip() for ln in lines]
    # a new session starts with that history
    t = Pty(["--socket", daemon.cfg.socket, "shell"], env)
    try:
        await t.expect(PROMPT)
        t.send("\x1b[A\x1b[A\r")                      # the line before the last session's quit
        await t.expect("error -32602")
        await t.expect(PROMPT)
        t.send("\x04")                                # end of input leaves
        assert await t.wait() == 0
    finally:
        t.close()


async def test_metrics_command_prints_the_page(daemon):
    r = await asyncio.to_thread(subprocess.run, CTL + ["--socket", daemon.cfg.socket, "metrics"],
                                capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and "# TYPE xend_lite_uptime_seconds gauge" in r.stdout
