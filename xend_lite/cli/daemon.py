"""`xend-lite`: the daemon's console script.

The daemon proper lives in xend_lite.daemon. ``--foreground-guest`` boots the guest with its
console on stdout and no control plane (for debugging a guest image); the same happens when
the daemon package is not installed.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading


def run_foreground(image: str | None, memory_mib: int, cmdline: str) -> int:
    """Boot the guest, console to stdout, until it stops or Ctrl-C / SIGTERM."""
    from xend_lite.errors import XendLiteError
    from xend_lite.kvm import Kvm, KvmError
    from xend_lite.machine.console import ConsoleSink
    from xend_lite.machine.loader import load_image
    from xend_lite.machine.machine import Machine

    try:
        if image is None:
            from xend_lite.guests import default_image

            data = default_image()
        else:
            with open(image, "rb") as f:
                data = f.read()
        kvm = Kvm()
        machine = Machine(kvm, memory_mib << 20, 1, ConsoleSink(stdout=True))
        try:
            from xend_lite.xen.emulation import XenEmulation
        except ImportError:
            XenEmulation = None  # noqa: N806 - the Xen layer is optional here
        if XenEmulation is not None:
            XenEmulation(machine, None)
        load_image(machine, data, cmdline)
    except (XendLiteError, KvmError, OSError) as exc:
        print(f"xend-lite: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    machine.start()
    while not stop.is_set() and machine.wait(0.2) is None:
        pass
    status = machine.status
    machine.close()
    kvm.close()
    if status is None or status.reason == "stopped":
        return 0
    print(f"xend-lite: guest stopped: {status.reason} {status.detail}".rstrip(), file=sys.stderr)
    return 0 if status.reason in ("poweroff", "halted") else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from xend_lite.daemon.main import main as daemon_main
    except ImportError:
        daemon_main = None
    if "--foreground-guest" in argv or daemon_main is None:
        import argparse

        p = argparse.ArgumentParser(prog="xend-lite", description="boot a guest in the foreground")
        p.add_argument("--foreground-guest", action="store_true")
        p.add_argument("--image", default=None)
        p.add_argument("--memory", type=int, default=128, help="MiB")
        p.add_argument("--cmdline", default="")
        a, _rest = p.parse_known_args(argv)
        logging.basicConfig(level=logging.WARNING, format="xend-lite: %(message)s")
        return run_foreground(a.image, a.memory, a.cmdline)
    return daemon_main(argv)


if __name__ == "__main__":
    sys.exit(main())
