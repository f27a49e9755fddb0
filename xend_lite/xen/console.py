"""The guest's console: console_io (Xen's debug console) and the PV console ring the domain
advertises in HVM_PARAM_CONSOLE_PFN/EVTCHN, both into the machine's console sink (the
console log, stdout, query-console).

The ring is served when the guest signals its event channel and, as a safety net, by the
ring poll on the VM owner (xen/ringpoll.py). Input from the operator waits in a bounded queue and
goes into the ring's ``in`` as space frees up (or to CONSOLEIO_read, whichever asks first).

Locking: ``_lock`` guards the ring indices' use and the input queue; it is taken on vCPU
threads (the guest's event, console_io) and on the owner (the poll, operator input).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

from xend_lite.errors import GuestMemoryError, InvalidArgument
from xend_lite.xen.console_ring import ConsoleRing
from xend_lite.xen.errors import XenError
from xend_lite.xen.xenabi import X

if TYPE_CHECKING:
    from xend_lite.machine.console import ConsoleSink
    from xend_lite.machine.guestmem import GuestMemory
    from xend_lite.xen.hypercall import Call

CONSOLE_CHUNK = 4096
MAX_PENDING_INPUT = 64 * 1024
DRAIN_ROUNDS = 8


class GuestPage:
    """A Page (see page.py) at a guest-physical address, through bounds-checked guest
    memory on every access."""

    def __init__(self, mem: GuestMemory, gpa: int):
        self.mem = mem
        self.gpa = gpa

    def read(self, off: int, n: int) -> bytes:
        return self.mem.read(self.gpa + off, n)

    def write(self, off: int, data: bytes) -> None:
        self.mem.write(self.gpa + off, data)


class Console:
    def __init__(self, sink: ConsoleSink, mem: GuestMemory, ring_gpa: int):
        self.sink = sink
        self.ring = ConsoleRing(GuestPage(mem, ring_gpa))
        self.notify: Callable[[], None] = lambda: None     # tells the guest (set when bound)
        self._lock = threading.Lock()
        self._input = bytearray()
        self.broken_reported = False

    # -- the ring ------------------------------------------------------------------------

    def _drain(self) -> bool:
        """Move what the guest wrote into the sink (``_lock`` held); True if any. At most
        DRAIN_ROUNDS rings' worth: a guest writing on another vCPU as fast as we read must
        not keep this thread here."""
        moved = False
        for _ in range(DRAIN_ROUNDS):
            data = self.ring.drain()
            if not data:
                break
            moved = True
            self.sink.write(data)
        return moved

    def flush_output(self) -> None:
        """Take what the guest wrote without telling it (its last words before it stops:
        a guest may write its ring and shut down before the ring is served)."""
        with self._lock:
            try:
                self._drain()
            except GuestMemoryError:
                pass

    def serve(self) -> bool:
        """Drain what the guest wrote, feed it waiting input, and tell it if anything moved.
        True when something moved or input still waits for room."""
        with self._lock:
            try:
                moved = self._drain()
                if self._input:
                    n = self.ring.push_input(bytes(self._input))
                    if n:
                        del self._input[:n]
                        moved = True
            except GuestMemoryError:
                return False    # the ring's page is not memory now (ballooned out)
            waiting = bool(self._input)
        if moved:
            self.notify()
        return moved or waiting

    def write_input(self, data: bytes) -> int:
        """Queue operator input for the guest; returns how many bytes were taken."""
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidArgument("console input must be bytes")
        with self._lock:
            room = MAX_PENDING_INPUT - len(self._input)
            if room <= 0 and data:
                raise InvalidArgument("the guest is not reading its console: input queue full")
            taken = bytes(data[:room])
            self._input += taken
        self.serve()
        return len(taken)

    def pending_input(self) -> int:
        return len(self._input)

    def reset(self) -> None:
        with self._lock:
            self._input.clear()

    # -- console_io ----------------------------------------------------------------------

    def console_io(self, c: Call, cmd: int, count: int, buf: int) -> int:
        if cmd == X.CONSOLEIO_write:
            done = 0
            while done < count:
                n = min(CONSOLE_CHUNK, count - done)
                self.sink.write(c.view.read(buf + done, n))
                done += n
            return 0
        if cmd == X.CONSOLEIO_read:
            with self._lock:
                data = bytes(self._input[:count])
                if data:
                    c.view.write(buf, data)
                    del self._input[:len(data)]
            return len(data)
        raise XenError(X.XEN_ENOSYS, "unknown console_io command")
