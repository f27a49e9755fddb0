"""A progress bar for `xend-lite-ctl snapshot-save` / `snapshot-load` on a terminal: the
call runs while the event stream's SNAPSHOT_PROGRESS events for it redraw one line."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TextIO

WIDTH = 30
JOBS = {"snapshot-save": "save", "snapshot-load": "load"}


def bar(percent: int, done: int, total: int, what: str) -> str:
    pct = max(0, min(100, percent))
    filled = WIDTH * pct // 100
    return (f"\r{what} [{'#' * filled}{'.' * (WIDTH - filled)}] {pct:3d}% "
            f"{done >> 20}/{total >> 20} MiB")


async def call_with_progress(client: Any, method: str, params: dict, out: TextIO) -> Any:
    """``client.call(method, params)`` with a bar drawn on ``out`` from progress events."""
    kind = JOBS[method]
    name = str(params.get("path", ""))
    connected = asyncio.Event()
    complete = asyncio.Event()
    drawn = False

    async def follow() -> None:
        nonlocal drawn
        async for event in client.events(connected):
            d = event.get("data") or {}
            if (event.get("event") == "SNAPSHOT_PROGRESS" and d.get("kind") == kind
                    and str(d.get("path", "")).endswith(name)):
                out.write(bar(int(d.get("percent", 0)), int(d.get("bytes", 0)),
                              int(d.get("total", 0)), kind))
                out.flush()
                drawn = True
                if int(d.get("percent", 0)) >= 100:
                    complete.set()

    task = asyncio.create_task(follow())
    try:
        waiter = asyncio.create_task(connected.wait())
        await asyncio.wait({task, waiter}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        result = await client.call(method, params)
        if drawn:   # the reply may overtake the last event, which is on another connection
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(complete.wait(), 0.5)
        return result
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if drawn:
            out.write("\n")
            out.flush()
