"""`python -m tests.daemon.fakedaemon ARGS`: the real xend-lite process with a FakeDomain,
for tests of the process as a whole (signals, exit statuses, systemd)."""

import sys

from tests.daemon.fakes import FakeDomain
from xend_lite.daemon.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], domain_factory=FakeDomain))
