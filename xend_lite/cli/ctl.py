"""`xend-lite-ctl`: a small client for the daemon's control plane.

    xend-lite-ctl query-status
    xend-lite-ctl xen-overlay-map page=shared_info gpa=0x400000
    xend-lite-ctl snapshot-save path=before.snap paused=true
    xend-lite-ctl events                 # follow the event stream, one JSON object a line
    xend-lite-ctl console                # attach to the guest console (Ctrl-] leaves)
    xend-lite-ctl console read-only=true # watch it while another client types
    xend-lite-ctl --tcp http://127.0.0.1:8405 --token-file token query-status

Values are parsed as JSON when they parse (numbers, true/false, null, quoted strings,
objects), as 0x-prefixed hexadecimal integers, and are strings otherwise. Results are
printed as JSON; an error prints its message and exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from xend_lite.cli.progress import JOBS as PROGRESS_JOBS, call_with_progress
from xend_lite.cli.tools import TOOLS, TOOLS_HELP, run_tool

from xend_lite.cli.client import (  # noqa: F401 - the client's names, as ctl has always had them
    EXIT_CONNECT,
    EXIT_RPC_ERROR,
    EXIT_USAGE,
    Client,
    ConnectError,
    RpcError,
    default_socket,
)


def parse_value(text: str) -> Any:
    if text.lower().startswith(("0x", "-0x")):
        try:
            return int(text, 16)
        except ValueError:
            return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"parameter {pair!r} is not key=value")
        params[key] = parse_value(value)
    return params


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xend-lite-ctl", description="Talk to a running xend-lite.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Methods: query-commands lists them. `events` follows the "
                                       "event stream; `console` attaches to the guest console.\n"
                                       + TOOLS_HELP)
    p.add_argument("--socket", help="the daemon's Unix socket (default: the daemon's default)")
    p.add_argument("--tcp", metavar="URL", help="reach the daemon over TCP, e.g. http://127.0.0.1:8405")
    p.add_argument("--token-file", help="file with the bearer token (TCP)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a reply (600)")
    p.add_argument("--compact", action="store_true", help="print JSON on one line")
    p.add_argument("method", help="a method name, or `events`")
    p.add_argument("params", nargs="*", metavar="key=value")
    return p


async def _run(ns: argparse.Namespace, params: dict, token: str | None) -> int:
    client = Client(ns.socket, ns.tcp, token, timeout=ns.timeout)
    indent = None if ns.compact else 2
    async with client:
        if ns.method == "console":
            from xend_lite.cli.console import attach

            return await attach(client, read_only=params.get("read-only") is True)
        if ns.method == "events":
            async for event in client.events():
                print(json.dumps(event), flush=True)
            return 0
        if ns.method in TOOLS:
            return await run_tool(ns.method, client, indent, parse_params, RpcError)
        if ns.method in PROGRESS_JOBS and sys.stdout.isatty():
            result = await call_with_progress(client, ns.method, params, sys.stdout)
        else:
            result = await client.call(ns.method, params)
    print(json.dumps(result, indent=indent, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        params = parse_params(ns.params)
    except ValueError as exc:
        print(f"xend-lite-ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if ns.method in TOOLS and ns.method != "shell" and params:
        print(f"xend-lite-ctl: {ns.method} takes no parameters", file=sys.stderr)
        return EXIT_USAGE
    if ns.method == "events" and params:
        print("xend-lite-ctl: events takes no parameters", file=sys.stderr)
        return EXIT_USAGE
    if ns.method == "console" and not set(params) <= {"read-only"}:
        print("xend-lite-ctl: console takes only read-only=true", file=sys.stderr)
        return EXIT_USAGE
    token = None
    if ns.token_file:
        try:
            with open(ns.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            print(f"xend-lite-ctl: cannot read token file {ns.token_file}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
    elif ns.tcp and os.environ.get("XEND_LITE_TOKEN"):
        token = os.environ["XEND_LITE_TOKEN"]
    try:
        return asyncio.run(_run(ns, params, token))
    except RpcError as exc:
        cls = f" ({exc.error_class})" if exc.error_class else ""
        print(f"xend-lite-ctl: error {exc.code}{cls}: {exc.message}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except ConnectError as exc:
        print(f"xend-lite-ctl: {exc} (is xend-lite running? pass --socket)", file=sys.stderr)
        return EXIT_CONNECT
    except asyncio.TimeoutError:
        print(f"xend-lite-ctl: no reply within {ns.timeout:g} s", file=sys.stderr)
        return EXIT_CONNECT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
