"""Moving a restored guest's RAM off its snapshot file, in the background.

A restore maps the snapshot's memory copy-on-write (vmm/persist.py). ``DETACH_DELAY`` later
(the restored guest gets going first; the file's read lease covers the wait) the VM owner
starts a thread that copies the file's data into memory of the VM's own and swaps it in
(machine/ram.py ``detach_ram``). The thread is started then, not during the restore:
starting a thread waits until the new thread runs, which on a busy host is milliseconds
the restore need not pay.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xend_lite.machine.machine import Machine

log = logging.getLogger("xend_lite.domain")

DETACH_DELAY = 0.2   # seconds between a restore and moving its RAM off the snapshot file
DETACH_STOP = 30.0   # seconds to wait for a move of RAM to give up


class RamDetach:
    """One move of RAM off ``fd`` (a descriptor of the snapshot file, held with its read
    lease; this job closes it), whose RAM lies at ``offset``. ``done`` is set once the
    guest no longer uses the file."""

    def __init__(self, machine: Machine, fd: int, offset: int, path: str, done: threading.Event):
        self.machine = machine
        self.fd = fd
        self.offset = offset
        self.path = path
        self.done = done
        self._stop = threading.Event()
        self._lock = threading.Lock()       # the thread, between its start and stop()
        self._thread: threading.Thread | None = None
        self._fd_open = True

    def schedule(self) -> None:
        self.machine.owner.after(DETACH_DELAY, self._begin)

    def _begin(self) -> None:
        """On the owner, DETACH_DELAY after the restore."""
        with self._lock:
            if self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="ram-detach", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            t0 = time.monotonic()
            if self.machine.detach_ram(self.fd, self.offset, self._stop):
                log.info("guest RAM no longer depends on %s (moved in %.3f s)", self.path,
                         time.monotonic() - t0)
                self.done.set()
        except Exception:  # noqa: BLE001 - the VM runs on from the file; say why
            log.exception("moving guest RAM off %s failed; the VM keeps using the file", self.path)
        finally:
            self._close_fd()

    def _close_fd(self) -> None:
        from xend_lite.vmm.persist import release_lease

        with self._lock:
            if not self._fd_open:
                return
            self._fd_open = False
        release_lease(self.fd)
        os.close(self.fd)

    def stop(self) -> None:
        """Stop the move and wait for it. On the owner, its last step is served while
        waiting (it is a request to the owner)."""
        with self._lock:
            self._stop.set()
            t = self._thread
        if t is None:
            self._close_fd()
            return
        owner = self.machine.owner
        if owner is not None and owner.on_owner():
            owner.wait_until(lambda: not t.is_alive(), DETACH_STOP)
        else:
            t.join(DETACH_STOP)
