"""A real domain running guests/fuzz.S: one boot, many tables of hypercalls.

The host plants a table, bumps the generation, waits for the guest's done signal and reads
back each call's RAX and registers. Guest memory is split into zones so a hostile table can
never make the guest destroy itself (its code, page tables, stack, table and hypercall page
all lie in OWN, which no pointer, frame or extent of a table reaches), and so anything
written where no pointer ever points shows up:

    0x000000 .. 0x100000  boot structures the guest no longer reads: "zero" pointers and
                        "low" frames may land here
    OWN                 guest image (code, GDT, page tables, stack), hypercall page, table
    SCRATCH             random output pointers land here
    GUARD               nothing points here: must stay all zero
    STRUCTS             host-planted structs whose nested pointers are safe
    BALLOON             frames the fuzz may balloon out / put back
    OVERLAY_ARENA       frames the fuzz may lay overlay pages over
    END_SCRATCH         the last MiB: pointers that run across the end of RAM
"""

from __future__ import annotations

import struct
import time

from tests.xen.conftest import ALIAS, ENTRY, HCPAGE, TABLE, U64, Harness  # noqa: F401 - the layout hostile.py reads
from xend_lite.xen.xenabi import X

DONE_PORT = 0xF1
MAX_ENTRIES = 2000
U32 = (1 << 32) - 1

MEMORY_MIB = 64
RAM_END = MEMORY_MIB << 20
ARENA = 0x400000
OWN = (0x100000, ARENA)
SCRATCH = (0x400000, 0x1000000)
GUARD = (0x1000000, 0x1800000)
STRUCTS = (0x1800000, 0x1C00000)
BALLOON = (0x2000000, 0x2400000)
OVERLAY_ARENA = (0x2800000, 0x2C00000)
END_SCRATCH = (RAM_END - 0x100000, RAM_END)

XEN_ERRNOS = frozenset(getattr(X, n) for n in (
    "XEN_EPERM XEN_ENOENT XEN_ESRCH XEN_EIO XEN_ENXIO XEN_E2BIG XEN_ENOEXEC XEN_EBADF "
    "XEN_ECHILD XEN_EAGAIN XEN_ENOMEM XEN_EACCES XEN_EFAULT XEN_EBUSY XEN_EEXIST XEN_EXDEV "
    "XEN_ENODEV XEN_EINVAL XEN_ENFILE XEN_EMFILE XEN_ENOSPC XEN_EROFS XEN_EMLINK XEN_EDOM "
    "XEN_ERANGE XEN_EDEADLK XEN_ENAMETOOLONG XEN_ENOLCK XEN_ENOSYS XEN_ENOTEMPTY XEN_ENODATA "
    "XEN_ETIME XEN_EBADMSG XEN_EOVERFLOW XEN_EILSEQ XEN_EOPNOTSUPP XEN_EISCONN XEN_ENOTCONN "
    "XEN_ETIMEDOUT").split())


def result_ok(res: int) -> bool:
    """A hypercall result is a count/value (>= 0) or minus a Xen errno."""
    return res >= 0 or (-res in XEN_ERRNOS and 1 <= -res <= 133)


class FuzzGuest(Harness):
    """The harness's table layout and result reading, with a guest that runs table after
    table in one boot (see guests/fuzz.S)."""

    DONE_PORT = DONE_PORT

    def __init__(self, image_path: str, bits: int, memory_mib: int = MEMORY_MIB, vcpus: int = 1):
        super().__init__(image_path, bits, memory_mib=memory_mib, vcpus=vcpus)
        self.generation = 0
        self.calls_run = 0
        self.calls: list[list[int]] = []
        self.stopped_in: str | None = None     # where it stopped, for every later failure

    def boot(self, timeout: float = 20.0) -> None:
        hdr = struct.pack("<QQQQQQQQ", 0, HCPAGE, 0, 0, 0, 0, 0, 0)
        self.mem.write(TABLE, hdr)
        self.domain.start()
        deadline = time.monotonic() + timeout
        while self.xen.hypercall_page != HCPAGE:
            self.check_alive()
            assert time.monotonic() < deadline, "the fuzz guest never set its hypercall page"
            time.sleep(0.005)

    def check_alive(self) -> None:
        st = self.machine.status
        if st is None:
            return
        if self.stopped_in is None:
            self.stopped_in = self._where_stopped()
        raise AssertionError(f"the fuzz guest stopped: {st} {self.stopped_in} "
                             f"console {self.machine.console.tail(500)!r}")

    def _where_stopped(self) -> str:
        """The table and call the guest was in when it stopped, and its RIP and RSP. The guest
        is shared by every example of a test, so each later one fails on the stopped guest
        too (and hypothesis shrinks to one of those): only this names the call that did it."""
        try:
            done = self.mem.read_u64(TABLE + 16)
            if not self.generation:
                where = "while booting"
            elif self.mem.read_u64(TABLE + 56) == self.generation or done >= len(self.calls):
                where = f"after table {self.generation}"
            else:
                call = ", ".join(f"{a:#x}" for a in self.calls[done])
                where = f"in table {self.generation} at call {done} of {len(self.calls)}: ({call})"
        except Exception as exc:  # noqa: BLE001 - the guest may have given up its table
            where = f"in table {self.generation} (table unreadable: {exc})"
        try:
            regs = self.domain.query_registers()[0]["general"]
            where += f", rip {regs['rip']:#x} rsp {regs['rsp']:#x}"
        except Exception as exc:  # noqa: BLE001
            where += f", registers unreadable ({exc})"
        return where

    def run(self, calls, timeout: float = 60.0) -> list[tuple[int, int]]:
        """Run [(nr, a1..a5)] as one table; returns [(signed result, clobbered flag)]."""
        assert len(calls) <= MAX_ENTRIES
        self.calls = [[c[0]] + [a & U64 for a in c[1:6]] + [0] * (6 - len(c)) for c in calls]
        body = bytearray()
        for args in self.calls:
            body += struct.pack("<6QQQ", *args, 0, 0).ljust(ENTRY, b"\0")
        self.mem.write(TABLE + 64, bytes(body))
        self.mem.write_u64(TABLE, len(calls))
        self.mem.write_u64(TABLE + 16, 0)
        self._done.clear()
        self.generation += 1
        self.mem.write_u64(TABLE + 48, self.generation)
        deadline = time.monotonic() + timeout
        while self.mem.read_u64(TABLE + 56) != self.generation:
            self._done.wait(0.02)
            self._done.clear()
            self.check_alive()
            if time.monotonic() > deadline:
                done = self.mem.read_u64(TABLE + 16)
                raise AssertionError(f"table {self.generation} stuck after {done} of {len(calls)} "
                                     f"calls; next: {self.calls[done] if done < len(calls) else None}")
        self.calls_run += len(calls)
        return self.results(len(calls))
