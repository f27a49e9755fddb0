"""A guest's side of the xenstore ring, written from xs_wire.h, for driving the server."""

from __future__ import annotations

import struct

from xend_lite.xen.page import BytesPage
from xend_lite.xen.xenstore.protocol import XsType
from xend_lite.xen.xenstore.server import XenstoreServer
from xend_lite.xen.xenstore.store import Quotas

REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD = 2048, 2052, 2056, 2060
FEATURES, CONNECTION, ERROR = 2064, 2068, 2072
RING = 1024
U32 = 1 << 32


class XsFailed(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def msg(type_: int, payload: bytes, req_id: int = 0, tx_id: int = 0,
        length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack("<IIII", type_, req_id, tx_id, n) + payload


def z(*parts: bytes | str) -> bytes:
    """NUL-terminated strings."""
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


class Guest:
    def __init__(self, domid: int = 1, quotas: Quotas | None = None, start: int = 0):
        self.page = BytesPage()
        self.notified = 0
        self.domid = domid
        self.server = XenstoreServer(domid, self.page, self._notify, quotas)
        for off in (REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD):
            self.set(off, start)
        self.rx = bytearray()
        self.events: list[tuple[bytes, bytes]] = []
        self.replies: dict[int, tuple[int, bytes]] = {}
        self.next_id = 1

    def _notify(self) -> None:
        self.notified += 1

    def get(self, off: int) -> int:
        return struct.unpack_from("<I", self.page.buf, off)[0]

    def set(self, off: int, v: int) -> None:
        struct.pack_into("<I", self.page.buf, off, v % U32)

    # -- raw ring access ----------------------------------------------------------------

    def send_raw(self, data: bytes) -> int:
        cons, prod = self.get(REQ_CONS), self.get(REQ_PROD)
        n = min(len(data), RING - (prod - cons) % U32)
        for i in range(n):
            self.page.buf[(prod + i) % RING] = data[i]
        self.set(REQ_PROD, prod + n)
        return n

    def recv_raw(self) -> bytes:
        cons, prod = self.get(RSP_CONS), self.get(RSP_PROD)
        n = (prod - cons) % U32
        assert n <= RING, "server produced past the ring"
        data = bytes(self.page.buf[1024 + (cons + i) % RING] for i in range(n))
        self.set(RSP_CONS, prod)
        return data

    def process(self):
        return self.server.process()

    def pump(self) -> None:
        """Read every complete message off the reply ring."""
        while True:
            self.rx += self.recv_raw()
            progressed = False
            while len(self.rx) >= 16:
                t, rid, _tx, n = struct.unpack_from("<IIII", self.rx)
                if len(self.rx) < 16 + n:
                    break
                payload = bytes(self.rx[16:16 + n])
                del self.rx[:16 + n]
                if t == XsType.WATCH_EVENT:
                    parts = payload.split(b"\0")
                    self.events.append((parts[0], parts[1]))
                else:
                    self.replies[rid] = (t, payload)
                progressed = True
            res = self.process()
            if not progressed and not res.produced:
                return

    # -- requests -----------------------------------------------------------------------

    def send(self, type_: int, payload: bytes, tx: int = 0) -> int:
        rid = self.next_id
        self.next_id += 1
        data = msg(type_, payload, rid, tx)
        while data:
            n = self.send_raw(data)
            data = data[n:]
            self.process()
            self.pump()
        return rid

    def call(self, type_: int, payload: bytes, tx: int = 0) -> bytes:
        rid = self.send(type_, payload, tx)
        self.pump()
        t, payload = self.replies.pop(rid)
        if t == XsType.ERROR:
            assert payload.endswith(b"\0")
            raise XsFailed(payload[:-1].decode())
        assert t == type_
        return payload

    def error(self, type_: int, payload: bytes, tx: int = 0) -> str:
        try:
            self.call(type_, payload, tx)
        except XsFailed as err:
            return err.name
        raise AssertionError("request succeeded")

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.call(XsType.READ, z(path), tx)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        v = value.encode() if isinstance(value, str) else value
        assert self.call(XsType.WRITE, path.encode() + b"\0" + v, tx) == b"OK\0"

    def mkdir(self, path: str, tx: int = 0) -> None:
        assert self.call(XsType.MKDIR, z(path), tx) == b"OK\0"

    def rm(self, path: str, tx: int = 0) -> None:
        assert self.call(XsType.RM, z(path), tx) == b"OK\0"

    def ls(self, path: str, tx: int = 0) -> list[bytes]:
        return self.call(XsType.DIRECTORY, z(path), tx).split(b"\0")[:-1]

    def perms(self, path: str, tx: int = 0) -> list[str]:
        return [p.decode() for p in self.call(XsType.GET_PERMS, z(path), tx).split(b"\0")[:-1]]

    def set_perms(self, path: str, *perms: str, tx: int = 0) -> None:
        assert self.call(XsType.SET_PERMS, z(path, *perms), tx) == b"OK\0"

    def watch(self, path: str, token: str) -> None:
        assert self.call(XsType.WATCH, z(path, token)) == b"OK\0"

    def unwatch(self, path: str, token: str) -> None:
        assert self.call(XsType.UNWATCH, z(path, token)) == b"OK\0"

    def start(self) -> int:
        return int(self.call(XsType.TRANSACTION_START, b"\0")[:-1])

    def end(self, tx: int, commit: bool = True) -> None:
        assert self.call(XsType.TRANSACTION_END, b"T\0" if commit else b"F\0", tx) == b"OK\0"

    def take_events(self) -> list[tuple[bytes, bytes]]:
        self.pump()
        out, self.events = self.events, []
        return out
