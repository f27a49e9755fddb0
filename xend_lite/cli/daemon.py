"""`xend-lite`: the daemon's console script. Everything lives in xend_lite.daemon."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    # The cyclic garbage collector is off from here until READY=1 (daemon/early.py says
    # why): from before the libraries the daemon is built on are loaded, not only from the
    # early start on. Their imports alone made it run some sixty times, about 10 ms of a
    # start. The early start gives it back at READY=1, main() for --incoming, and this when
    # the start ends before.
    import gc

    collecting = gc.isenabled()
    gc.disable()
    try:
        from xend_lite.daemon.main import main as daemon_main

        return daemon_main(argv, collecting=collecting)
    finally:
        if collecting:
            gc.enable()     # a start that ended before READY=1 (or a daemon that stopped)


if __name__ == "__main__":
    sys.exit(main())
