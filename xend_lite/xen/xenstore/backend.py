"""The xenstore server bound into the domain: served when the guest signals the store's event
channel and, as a safety net, by the ring poll on the VM owner (xen/ringpoll.py); the
operator's reads and writes come from the owner.

The server, and the store's modules with it, is made when it is first needed: the guest's
first request on the ring (or its ask to reconnect), an operator call, a save or a load.
Until then serving the ring only reads its indices and sets the feature bits, as the
server's first pass does, and the toolstack trees written are kept and written into the
new store in order. A guest that never uses xenstore (the embedded default guest) never
loads it; one that does pays for it at its first request (about 1.7 ms, once). Seen from the
guest and the operator nothing differs.

Locking: the server is not thread-safe, so ``_lock`` serialises every call into it (vCPU
threads for the guest's event, the owner for the poll and the operator). The server calls
``notify`` with the lock held; notify only raises an event-channel port.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from xend_lite.errors import GuestMemoryError
from xend_lite.xen.page import Page
from xend_lite.xen.xenstore.ring import PAGE_FAULTS, RECONNECT, XsRing

if TYPE_CHECKING:   # saving and loading bring in the snapshot layer: imported when used
    from xend_lite.xen.xenstore.server import XenstoreServer
    from xend_lite.xen.xenstore.state import XenstoreState
    from xend_lite.xen.xenstore.toolstack import DomainInfo

MAX_ROUNDS = 16      # process() calls per serve: each handles a bounded number of requests


class XenstoreBackend:
    def __init__(self, domid: int, page: Page):
        self._lock = threading.RLock()
        self.notify: Callable[[], None] = lambda: None     # tells the guest (set when bound)
        self._domid = domid
        self._page = page
        self._server: XenstoreServer | None = None
        self._trees: list[DomainInfo] = []      # written before the server was made

    @property
    def server(self) -> XenstoreServer:
        """The server, made (with the trees written so far) at the first use."""
        with self._lock:
            if self._server is None:
                from xend_lite.xen.xenstore.server import XenstoreServer

                server = XenstoreServer(self._domid, self._page, lambda: self.notify())
                for info in self._trees:
                    server.write_domain_tree(info)
                self._server, self._trees = server, []
            return self._server

    def serve(self) -> bool:
        """Serve the ring; True when anything moved or is still waiting to."""
        moved = False
        with self._lock:
            if self._server is None and self._unasked():
                return False
            server = self.server
            for _ in range(MAX_ROUNDS):
                try:
                    res = server.process()
                except GuestMemoryError:
                    return moved  # the ring's page is not memory now (ballooned out)
                moved = moved or bool(res.consumed or res.produced or res.reconnected)
                if not res.again:
                    return moved or bool(server.out)
        return True

    def _unasked(self) -> bool:
        """Before the server is made: True when the guest asked nothing of it (no request
        on the ring, no reconnection), with the feature bits set as the server's first pass
        sets them. A page that cannot be read is left to the server, which reports it."""
        try:
            ctl = XsRing(self._page).offer_features()
        except PAGE_FAULTS:
            return False
        return ctl.connection != RECONNECT and ctl.req_cons == ctl.req_prod

    def call(self, method: str, *args: Any) -> Any:
        """An operator call into the server (read, write, mkdir, rm, ls, get/set_perms)."""
        with self._lock:
            return getattr(self.server, method)(*args)

    def write_domain_tree(self, info: DomainInfo) -> None:
        with self._lock:
            if self._server is None:
                self._trees.append(info)
            else:
                self._server.write_domain_tree(info)

    def reset(self) -> None:
        with self._lock:
            if self._server is not None:    # one never made has nothing to drop
                self._server.reset()

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
