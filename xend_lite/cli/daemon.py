"""`xend-lite`: the daemon's console script. Everything lives in xend_lite.daemon."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from xend_lite.daemon.main import main as daemon_main

    return daemon_main(argv)


if __name__ == "__main__":
    sys.exit(main())
