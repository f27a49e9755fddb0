"""The host side of guests/ringclient64.S: a real guest that writes what a test scripts into
its console and xenstore rings, signals their event channels, and captures every xenstore
reply, so tests reach the backends the way a guest does (ring page + event channel)."""

from __future__ import annotations

import struct
import threading
import time

from xend_lite.vmm.domain import Domain
from xend_lite.vmm.spec import DomainSpec
from xend_lite.xen.xenstore.protocol import HEADER, XsType

CTL = 0x300000
PROG = 0x301000
PROG_END = 0x400000
DATA = 0x400000
DATA_END = 0x1000000
CAPTURE = 0x1000000
DONE_PORT = 0xF0
OP_SIZE = 32

XS_WRITE, CONS_WRITE, POKE32, SEND_STORE, SEND_CONSOLE, WAIT_REPLIES, WAIT32, SIGNAL, \
    HCALL, CPUID = range(1, 11)

# ring offsets a test pokes
XS_REQ_CONS, XS_REQ_PROD, XS_RSP_CONS, XS_RSP_PROD, XS_FEATURES, XS_CONNECTION, XS_ERROR = \
    (2048 + 4 * i for i in range(7))
CO_IN_CONS, CO_IN_PROD, CO_OUT_CONS, CO_OUT_PROD = (3072 + 4 * i for i in range(4))


def xs_msg(type_: int, *args: bytes, req_id: int = 0, tx_id: int = 0, raw: bytes | None = None,
           length: int | None = None) -> bytes:
    """A request: NUL-terminated ``args`` (or ``raw`` bytes as they are); ``length`` overrides
    the header's length field (a guest that lies)."""
    payload = raw if raw is not None else b"".join(a + b"\0" for a in args)
    return HEADER.pack(type_, req_id, tx_id, len(payload) if length is None else length) + payload


class RingGuest:
    def __init__(self, image: str, **spec):
        spec.setdefault("memory_mib", 64)
        self.domain = Domain(DomainSpec(image=image, **spec))
        self.machine = self.domain.machine
        self.mem = self.machine.mem
        self.xen = self.domain.xen
        self.signals = 0
        self._signalled = threading.Event()
        self._count = 0
        self._data = DATA
        self.machine.exits.register_io_out(DONE_PORT, self._on_signal)

    def _on_signal(self, _r, _ex) -> None:
        self.signals += 1
        self._signalled.set()

    def ctl(self, index: int) -> int:
        return struct.unpack("<Q", self.mem.read(CTL + 8 * index, 8))[0]

    @property
    def done(self) -> int:
        return self.ctl(1)

    @property
    def reply_bytes(self) -> int:
        return self.ctl(2)

    @property
    def store_gpa(self) -> int:
        return self.ctl(4)

    @property
    def console_gpa(self) -> int:
        return self.ctl(6)

    @property
    def result(self) -> int:
        return struct.unpack("<q", self.mem.read(CTL + 72, 8))[0]

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """The guest runs CPUID: (eax, ebx, ecx, edx) as it sees them."""
        self.run((CPUID, leaf, subleaf))
        return struct.unpack("<4I", self.mem.read(CTL + 80, 16))

    def hcall(self, nr: int, rdi: int, rsi: int = 0) -> int:
        """The guest makes a hypercall; its RAX."""
        self.run((HCALL, nr, rdi, rsi))
        return self.result

    def start(self, timeout: float = 10.0) -> None:
        self.domain.start()
        self.wait(lambda: self.ctl(8) > 0, timeout, "the guest to read its params")

    def wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            st = self.machine.status
            assert st is None, f"the guest stopped waiting for {what}: {st}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.005)

    def data(self, blob: bytes) -> int:
        """Put ``blob`` in guest memory for an op to use; its address."""
        gpa = self._data
        assert gpa + len(blob) <= DATA_END, "test data area full"
        self.mem.write(gpa, blob)
        self._data = (gpa + len(blob) + 15) & ~15
        return gpa

    def run(self, *ops: tuple[int, ...], timeout: float = 20.0) -> None:
        """Append ops and wait until the guest has done them all."""
        assert PROG + (self._count + len(ops)) * OP_SIZE <= PROG_END
        for i, op in enumerate(ops):
            self.mem.write(PROG + (self._count + i) * OP_SIZE,
                           struct.pack("<4Q", *(list(op) + [0] * (4 - len(op)))))
        self._count += len(ops)
        self.mem.write(CTL, struct.pack("<Q", self._count))
        self.wait(lambda: self.done >= self._count, timeout, f"ops up to {self._count}")

    def xs_send(self, blob: bytes, timeout: float = 20.0) -> None:
        self.run((XS_WRITE, self.data(blob), len(blob)), timeout=timeout)

    def xs_wait(self, n_bytes: int, timeout: float = 20.0) -> None:
        self.run((WAIT_REPLIES, n_bytes), timeout=timeout)

    def console_write(self, text: bytes) -> None:
        self.run((CONS_WRITE, self.data(text), len(text)))

    def replies(self) -> list[tuple[int, int, int, bytes]]:
        """Every whole message captured so far: (type, req_id, tx_id, payload)."""
        raw = self.mem.read(CAPTURE, self.ctl(3))
        out, pos = [], 0
        while pos + HEADER.size <= len(raw):
            t, rid, tx, n = HEADER.unpack_from(raw, pos)
            if pos + HEADER.size + n > len(raw):
                break
            out.append((t, rid, tx, raw[pos + HEADER.size:pos + HEADER.size + n]))
            pos += HEADER.size + n
        return out

    def answers(self) -> dict[int, tuple[int, bytes]]:
        """Replies (not watch events) by request id: (type, payload)."""
        return {rid: (t, p) for t, rid, _tx, p in self.replies() if t != XsType.WATCH_EVENT}

    def ask(self, type_: int, *args: bytes, req_id: int, tx_id: int = 0,
            timeout: float = 20.0) -> tuple[int, bytes]:
        """Send one request and wait for its reply."""
        self.xs_send(xs_msg(type_, *args, req_id=req_id, tx_id=tx_id), timeout)
        self.wait(lambda: req_id in self.answers(), timeout, f"the reply to request {req_id}")
        return self.answers()[req_id]

    def close(self) -> None:
        self.domain.close()
