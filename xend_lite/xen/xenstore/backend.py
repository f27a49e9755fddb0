"""The xenstore server bound into the domain: served when the guest signals the store's event
channel and, as a safety net, by the ring poll on the VM owner (xen/ringpoll.py); the
operator's reads and writes come from the owner.

Locking: the server is not thread-safe, so ``_lock`` serialises every call into it (vCPU
threads for the guest's event, the owner for the poll and the operator). The server calls
``notify`` with the lock held; notify only raises an event-channel port.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from xend_lite.errors import GuestMemoryError
from xend_lite.xen.page import Page
from xend_lite.xen.xenstore.server import XenstoreServer
from xend_lite.xen.xenstore.toolstack import DomainInfo

if TYPE_CHECKING:   # saving and loading bring in the snapshot layer: imported when used
    from xend_lite.xen.xenstore.state import XenstoreState

MAX_ROUNDS = 16      # process() calls per serve: each handles a bounded number of requests


class XenstoreBackend:
    def __init__(self, domid: int, page: Page):
        self._lock = threading.RLock()
        self.notify: Callable[[], None] = lambda: None     # tells the guest (set when bound)
        self.server = XenstoreServer(domid, page, lambda: self.notify())

    def serve(self) -> bool:
        """Serve the ring; True when anything moved or is still waiting to."""
        moved = False
        with self._lock:
            for _ in range(MAX_ROUNDS):
                try:
                    res = self.server.process()
                except GuestMemoryError:
                    return moved  # the ring's page is not memory now (ballooned out)
                moved = moved or bool(res.consumed or res.produced or res.reconnected)
                if not res.again:
                    return moved or bool(self.server.out)
        return True

    def call(self, method: str, *args: Any) -> Any:
        """An operator call into the server (read, write, mkdir, rm, ls, get/set_perms)."""
        with self._lock:
            return getattr(self.server, method)(*args)

    def write_domain_tree(self, info: DomainInfo) -> None:
        with self._lock:
            self.server.write_domain_tree(info)

    def reset(self) -> None:
        with self._lock:
            self.server.reset()

    def save(self) -> XenstoreState:
        from xend_lite.xen.xenstore.state import capture

        with self._lock:
            return capture(self.server)

    def prepare_load(self, state: XenstoreState) -> Callable[[], None]:
        """Check a saved state (SnapshotError if bad); the returned call puts it in place."""
        from xend_lite.xen.xenstore.state import prepare

        with self._lock:
            apply = prepare(self.server, state)

        def put() -> None:
            with self._lock:
                apply()
        return put
