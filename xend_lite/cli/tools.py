"""`xend-lite-ctl` commands beyond single method calls: the interactive shell and the
metrics page; and the --help text that names the operator's tools."""

from __future__ import annotations

import sys
from typing import Any, Callable

TOOLS = ("shell", "metrics")

TOOLS_HELP = """
Commands:
  shell                    interactive: Tab completes methods and parameters, history is
                           kept, events are printed as they arrive
  metrics                  print GET /metrics (Prometheus text format)
  events                   follow the event stream, one JSON object a line

Looking inside the guest:
  xen-event-list                       event channel ports (type, vcpu, pending, masked)
  xen-event-inject port=N              set a port pending and deliver its upcall
  x-read-memory gpa=ADDR size=N        up to 4096 bytes, base64 (or gva=ADDR cpu-index=N)
  x-write-memory gpa=ADDR data=B64     write up to 4096 bytes (only while paused)
  pmemsave val=GPA size=N filename=F   guest-physical memory to a new file in the snapshot dir
  memsave val=GVA size=N filename=F cpu-index=N   guest-virtual memory, likewise
  query-vcpus registers=true           general, segment and control registers

Snapshots and state:
  snapshot-save path=NAME              (a progress bar on a terminal)
  snapshot-load path=NAME
  query-snapshot-job                   the save or load running now
  query-status                         status and qmp-status; stop/cont are idempotent
"""


async def run_tool(name: str, client: Any, indent: int | None,
                   parse_params: Callable[[list[str]], dict], rpc_error: type[Exception]) -> int:
    """Run a tool; ctl passes its own parser and error class (it may run as __main__, whose
    classes are not those of an import of it)."""
    if name == "shell":
        from xend_lite.cli.shell import run_shell

        return await run_shell(client, parse_params, indent, rpc_error)
    text = await client.get_text("/metrics")
    sys.stdout.write(text)
    return 0
