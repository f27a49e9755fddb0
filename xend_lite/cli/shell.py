"""`xend-lite-ctl shell`: an interactive session with the daemon.

Each line is a method and its parameters as key=value (values as on the command line:
JSON when they parse, 0x-hexadecimal, strings otherwise); the result is printed as JSON.
Method names and their parameter names complete with Tab (from query-commands), lines are
kept in a history file (readline), and events are printed as they arrive. `help` lists the
methods, `quit` or end of input leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import sys
from typing import Any, Callable

PROMPT = "xend-lite> "
HISTORY_SIZE = 1000


def history_path(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    if env.get("XEND_LITE_HISTORY"):
        return env["XEND_LITE_HISTORY"]
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "xend-lite", "ctl_history")


class Completer:
    """Completes the first word from the method names, later words from that method's
    parameter names (as ``name=``)."""

    def __init__(self, commands: list[dict]):
        self.params = {c["name"]: [p["name"] for p in c.get("params", [])] for c in commands}
        self._matches: list[str] = []

    def candidates(self, line: str, text: str) -> list[str]:
        words = line.split()
        first = not words or (len(words) == 1 and not line.endswith(" "))
        if first:
            return sorted(n + " " for n in [*self.params, "help", "quit"] if n.startswith(text))
        used = {w.partition("=")[0] for w in words[1:]}
        return [p + "=" for p in self.params.get(words[0], [])
                if p.startswith(text) and p not in used]

    def __call__(self, text: str, state: int) -> str | None:
        if state == 0:
            import readline

            self._matches = self.candidates(readline.get_line_buffer()[:readline.get_endidx()], text)
        return self._matches[state] if state < len(self._matches) else None


def _setup_readline(completer: Completer, path: str) -> Callable[[], None]:
    """Completion and history; returns the function that saves the history."""
    try:
        import readline
    except ImportError:        # no readline: plain input
        return lambda: None
    readline.set_completer(completer)
    readline.set_completer_delims(" \t")
    readline.parse_and_bind("tab: complete")
    readline.set_history_length(HISTORY_SIZE)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)

    def save() -> None:
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            readline.write_history_file(path)
    return save


def _show_event(event: dict) -> None:
    """Print an event above the prompt and redraw what was being typed."""
    try:
        import readline

        typed = readline.get_line_buffer()
    except ImportError:
        typed = ""
    sys.stdout.write(f"\r\x1b[K[event] {json.dumps(event, sort_keys=True)}\n{PROMPT}{typed}")
    sys.stdout.flush()


async def run_shell(client: Any, parse_params: Callable[[list[str]], dict], indent: int | None,
                    rpc_error: type[Exception]) -> int:
    commands = await client.call("query-commands")
    save_history = _setup_readline(Completer(commands), history_path())

    async def follow() -> None:
        async for event in client.events():
            _show_event(event)

    events = asyncio.create_task(follow())
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                line = await loop.run_in_executor(None, input, PROMPT)
            except EOFError:
                print()
                return 0
            try:
                words = shlex.split(line)
            except ValueError as exc:
                print(f"error: {exc}")
                continue
            if not words:
                continue
            if words[0] in ("quit", "exit"):
                return 0
            if words[0] == "help":
                for c in sorted(commands, key=lambda c: c["name"]):
                    params = " ".join(p["name"] + ("=" if p["required"] else "=?") for p in c["params"])
                    print(f"  {c['name']} {params}".rstrip())
                continue
            try:
                result = await client.call(words[0], parse_params(words[1:]))
            except ValueError as exc:
                print(f"error: {exc}")
                continue
            except rpc_error as exc:
                cls = getattr(exc, "error_class", None)
                print(f"error {getattr(exc, 'code', '?')}{f' ({cls})' if cls else ''}: {exc}")
                continue
            print(json.dumps(result, indent=indent, sort_keys=True))
    finally:
        events.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await events
        save_history()
