"""The xenstore ring page (struct xenstore_domain_interface, docs/misc/xenstore-ring.txt).

``req[1024]`` carries requests from the guest, ``rsp[1024]`` replies and watch events to it;
then the u32 fields req_cons, req_prod, rsp_cons, rsp_prod, server_features, connection and
error. Indices are free-running modulo 2**32 and re-read from the page on every access; a
pair with the producer more than a ring ahead of the consumer raises :class:`RingBroken`
(nothing is read or written). Messages are rebuilt from the bytes taken by
protocol.MessageReader; this module knows only the page, so the domain can read a ring's
indices without loading the protocol (xenstore/backend.py).
"""

from __future__ import annotations

from xend_lite.errors import XendLiteError
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set
from xend_lite.xen.page import Page, read_u32s, ring_read, ring_used, ring_write, write_u32

__all__ = ["XsRing", "RingBroken", "Control", "RING_SIZE",
           "FEATURE_RECONNECTION", "FEATURE_ERROR", "SERVER_FEATURES", "ERROR_COMM",
           "ERROR_RINGIDX", "ERROR_PROTO", "CONNECTED", "RECONNECT", "PAGE_FAULTS"]

REQ_OFF, RSP_OFF, RING_SIZE = 0, 1024, 1024      # XENSTORE_RING_SIZE
REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD, FEATURES, CONNECTION, ERROR = (
    2048 + 4 * i for i in range(7))

FEATURE_RECONNECTION, FEATURE_ERROR = 1, 2       # XENSTORE_SERVER_FEATURE_*
SERVER_FEATURES = FEATURE_RECONNECTION | FEATURE_ERROR     # what the server offers
CONNECTED, RECONNECT = 0, 1                      # XENSTORE_CONNECTED / _RECONNECT
ERROR_NONE, ERROR_COMM, ERROR_RINGIDX, ERROR_PROTO = 0, 1, 2, 3   # XENSTORE_ERROR_*
# What a page accessor raises when guest memory is not there (the integrator's accessor
# raises GuestMemoryError; BytesPage ValueError).
PAGE_FAULTS = (XendLiteError, ValueError, OSError)


class RingBroken(Exception):
    """The guest broke the ring; ``code`` is the XENSTORE_ERROR_* to report."""

    def __init__(self, code: int, detail: str):
        super().__init__(detail)
        self.code = code


class Control(Frozen):
    __slots__ = ("req_cons", "req_prod", "rsp_cons", "rsp_prod", "features", "connection",
                 "error")
    req_cons: int
    req_prod: int
    rsp_cons: int
    rsp_prod: int
    features: int
    connection: int
    error: int

    def __init__(self, req_cons: int, req_prod: int, rsp_cons: int, rsp_prod: int,
                 features: int, connection: int, error: int):
        _set(self, "req_cons", req_cons)
        _set(self, "req_prod", req_prod)
        _set(self, "rsp_cons", rsp_cons)
        _set(self, "rsp_prod", rsp_prod)
        _set(self, "features", features)
        _set(self, "connection", connection)
        _set(self, "error", error)


class XsRing:
    """The server side of one xenstore page, reached only through ``page``."""

    def __init__(self, page: Page):
        self.page = page

    def control(self) -> Control:
        return Control(*read_u32s(self.page, REQ_CONS, 7))

    def set_field(self, off: int, value: int) -> None:
        write_u32(self.page, off, value)

    def offer_features(self) -> Control:
        """The control fields, with the server's feature bits set first if the guest's
        page lacks them (every pass of the server, and the domain before it makes one)."""
        ctl = self.control()
        if ctl.features & SERVER_FEATURES != SERVER_FEATURES:
            self.set_field(FEATURES, ctl.features | SERVER_FEATURES)
        return ctl

    def take(self, n: int) -> bytes:
        """Up to ``n`` request bytes the guest has produced; advances req_cons."""
        cons, prod = read_u32s(self.page, REQ_CONS, 2)
        avail = ring_used(cons, prod, RING_SIZE)
        if avail is None:
            raise RingBroken(ERROR_RINGIDX, f"request indices {cons:#x}/{prod:#x}")
        n = min(n, avail)
        if n <= 0:
            return b""
        data = ring_read(self.page, REQ_OFF, RING_SIZE, cons, n)
        write_u32(self.page, REQ_CONS, cons + n)
        return data

    def put(self, data: bytes) -> int:
        """Write what fits of ``data`` to the reply ring; advances rsp_prod."""
        cons, prod = read_u32s(self.page, RSP_CONS, 2)
        used = ring_used(cons, prod, RING_SIZE)
        if used is None:
            raise RingBroken(ERROR_RINGIDX, f"reply indices {cons:#x}/{prod:#x}")
        n = min(len(data), RING_SIZE - used)
        if n > 0:
            ring_write(self.page, RSP_OFF, RING_SIZE, prod, data[:n])
            write_u32(self.page, RSP_PROD, prod + n)
        return max(n, 0)

    def reset(self) -> None:
        """Empty both queues (reconnection: the guest ignores the ring meanwhile)."""
        for off in (REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD):
            write_u32(self.page, off, 0)
