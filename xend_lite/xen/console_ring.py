"""The PV console ring (Xen's io/console.h, struct xencons_interface).

Layout of the page: ``in[1024]`` (host to guest) at 0, ``out[2048]`` (guest to host) at
1024, then the indices ``in_cons, in_prod, out_cons, out_prod`` (u32 each) at 3072. The guest
produces ``out`` and consumes ``in``; this side does the opposite. Indices are free-running
modulo 2**32 and read from the page on every call: a pair whose producer is more than a ring
ahead of its consumer is broken, and then nothing is read or written and :attr:`broken` says
so until the guest puts the indices right. Sending the event is the caller's business.
"""

from __future__ import annotations

from xend_lite.xen.page import Page, read_u32s, ring_read, ring_used, ring_write, write_u32

__all__ = ["ConsoleRing", "IN_SIZE", "OUT_SIZE"]

IN_OFF, IN_SIZE = 0, 1024
OUT_OFF, OUT_SIZE = 1024, 2048
IDX_OFF = 3072              # in_cons, in_prod, out_cons, out_prod
IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = (IDX_OFF + 4 * i for i in range(4))


class ConsoleRing:
    """The host side of one console page, reached only through ``page``."""

    def __init__(self, page: Page):
        self.page = page
        self.broken = False          # the last look at the indices found them impossible
        self.broken_count = 0        # how many times that happened

    def _bad(self) -> None:
        self.broken = True
        self.broken_count += 1

    def drain(self) -> bytes:
        """Take everything the guest has written to ``out`` (at most 2048 bytes) and
        advance out_cons past it. Broken indices: take nothing."""
        cons, prod = read_u32s(self.page, OUT_CONS, 2)
        used = ring_used(cons, prod, OUT_SIZE)
        if used is None:
            self._bad()
            return b""
        self.broken = False
        if not used:
            return b""
        data = ring_read(self.page, OUT_OFF, OUT_SIZE, cons, used)
        write_u32(self.page, OUT_CONS, cons + used)
        return data

    def push_input(self, data: bytes) -> int:
        """Write what fits of ``data`` into ``in``, advance in_prod, return the count.
        Broken indices: write nothing, return 0."""
        cons, prod = read_u32s(self.page, IN_CONS, 2)
        used = ring_used(cons, prod, IN_SIZE)
        if used is None:
            self._bad()
            return 0
        self.broken = False
        n = min(len(data), IN_SIZE - used)
        if n:
            ring_write(self.page, IN_OFF, IN_SIZE, prod, bytes(data[:n]))
            write_u32(self.page, IN_PROD, prod + n)
        return n

    def pending_output(self) -> int:
        """Bytes the guest has produced and not yet drained (0 when broken)."""
        cons, prod = read_u32s(self.page, OUT_CONS, 2)
        return ring_used(cons, prod, OUT_SIZE) or 0
