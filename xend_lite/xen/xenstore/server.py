"""The xenstore server of one guest: its ring, its connection, the store, and the operator.

The integrator calls :meth:`XenstoreServer.process` when the guest signals the store event
channel (and from a safety-net timer); it reads requests, answers them, writes replies and
watch events to the ring and calls ``notify()`` (send the guest its event) when it consumed
or produced anything. The operator API acts as domain 0, the toolstack. Not thread-safe:
call everything from one thread (the VM owner).

Bounds: at most ``quotas.outstanding`` replies wait for ring space (then requests are left
in the ring until the guest reads its replies), at most ``quotas.queued_events`` watch
events (further ones are dropped, as xenstored drops them past its memory quota; a pending
identical event is not queued twice), at most one partial request of header + 4096 bytes,
and :data:`MAX_REQUESTS` requests per call. A ring the guest broke (impossible indices, a
payload over 4096 bytes) stops being served, as xenstored ignores such a connection: the
error is written to the page and every queue, watch and transaction of the connection is
dropped, until the guest asks to reconnect (the ring's reconnection feature) or a reset.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from xend_lite.errors import InvalidArgument
from xend_lite.record import Frozen, Record
from xend_lite.record import set_field as _set
from xend_lite.xen.page import Page
from xend_lite.xen.xenstore import dispatch, ops
from xend_lite.xen.xenstore.errors import XsError, to_domain_error
from xend_lite.xen.xenstore.protocol import (
    DOMID_FIRST_RESERVED,
    PAYLOAD_MAX,
    Header,
    MessageReader,
    XsType,
    canonical,
    encode,
    error_message,
)
from xend_lite.xen.xenstore.ring import (
    CONNECTION,
    CONNECTED,
    ERROR,
    ERROR_COMM,
    PAGE_FAULTS,
    RECONNECT,
    RingBroken,
    XsRing,
)
from xend_lite.xen.xenstore.store import Edit, Quotas, Store, format_perms, parse_perms
from xend_lite.xen.xenstore.toolstack import DomainInfo, write_domain_tree
from xend_lite.xen.xenstore.watches import Connection

__all__ = ["XenstoreServer", "ProcessResult", "Outgoing", "MAX_REQUESTS"]

log = logging.getLogger("xend_lite.xenstore")

MAX_REQUESTS = 64               # requests handled by one process() call


class ProcessResult(Record):
    __slots__ = ("consumed", "produced", "requests", "broken", "again", "reconnected")

    def __init__(self, consumed: int = 0, produced: int = 0, requests: int = 0, broken: int = 0,
                 again: bool = False, reconnected: bool = False):
        self.consumed = consumed        # request bytes taken from the ring
        self.produced = produced        # reply and event bytes written to it
        self.requests = requests        # requests answered
        self.broken = broken            # XENSTORE_ERROR_* while the ring is not served, else 0
        self.again = again              # stopped at MAX_REQUESTS with requests pending: call soon
        self.reconnected = reconnected  # the guest asked for a reconnection and got it


class Outgoing(Frozen):
    __slots__ = ("reply", "data")
    reply: bool                 # a reply (counts as outstanding) or a watch event
    data: bytes                 # the whole message, header included

    def __init__(self, reply: bool, data: bytes):
        _set(self, "reply", reply)
        _set(self, "data", data)


class XenstoreServer:
    def __init__(self, domid: int, page: Page, notify: Callable[[], None],
                 quotas: Quotas | None = None):
        if type(domid) is not int or not 0 < domid < DOMID_FIRST_RESERVED:
            raise InvalidArgument(f"xenstore: guest domid {domid!r} is not 1..0x7fef")
        self.domid = domid
        self.ring = XsRing(page)
        self.notify = notify
        self.quotas = quotas or Quotas()
        self.store = Store(self.quotas)
        self.conn = Connection(domid, self.quotas, self._queue_event)
        self.reader = MessageReader()
        self.out: deque[Outgoing] = deque()
        self.out_offset = 0         # bytes of out[0] already on the ring
        self.replies = 0            # replies in out
        self.events_dropped = 0
        self.broken = 0             # XENSTORE_ERROR_* once the guest broke the ring
        self.breaks = 0             # how many times it did

    # -- the ring ---------------------------------------------------------------------

    def process(self) -> ProcessResult:
        res = ProcessResult()
        was_broken = self.broken
        try:
            ctl = self.ring.offer_features()
            if ctl.connection == RECONNECT:
                self._reconnect()
                res.reconnected = True
            elif not self.broken and (self.out or ctl.req_cons != ctl.req_prod):
                self._serve(res)
        except RingBroken as err:
            self._break(err.code, f"broke its ring: {err}")
        except PAGE_FAULTS as err:
            self._break(ERROR_COMM, f"ring page not accessible: {err}")
        res.broken = self.broken
        if res.consumed or res.produced or res.reconnected or self.broken != was_broken:
            self.notify()
        return res

    def _serve(self, res: ProcessResult) -> None:
        res.produced += self._flush()
        while self.replies < self.quotas.outstanding:
            if res.requests >= MAX_REQUESTS:
                ctl = self.ring.control()
                res.again = ctl.req_cons != ctl.req_prod
                return
            data = self.ring.take(self.reader.need())
            if not data:
                return
            res.consumed += len(data)
            msg = self.reader.feed(data)
            if msg is not None:
                res.requests += 1
                self._handle(*msg)
                res.produced += self._flush()

    def _handle(self, hdr: Header, payload: bytes) -> None:
        session = dispatch.Session(self.store, self.conn, [self.conn])
        try:
            reply, after = dispatch.handle(session, hdr, payload)
        except Exception:       # a fault of ours must not stop the guest's xenstore
            log.exception("xenstore: request type %d of domain %d failed", hdr.type,
                          self.domid)
            reply, after = error_message(hdr.req_id, hdr.tx_id, "EIO"), []
        self.out.append(Outgoing(True, reply))
        self.replies += 1
        for path, token in after:
            self._queue_event(path, token)

    def _queue_event(self, path: bytes, token: bytes) -> None:
        payload = path + b"\0" + token + b"\0"
        msg = encode(XsType.WATCH_EVENT, 0, 0, payload)
        if len(payload) > PAYLOAD_MAX:
            self.events_dropped += 1
            return
        if not path.startswith(b"@") and any(not o.reply and o.data == msg for o in self.out):
            return                  # the same event is waiting already
        if len(self.out) - self.replies >= self.quotas.queued_events:
            self.events_dropped += 1
            return
        self.out.append(Outgoing(False, msg))

    def _flush(self) -> int:
        produced = 0
        while self.out:
            head = self.out[0]
            n = self.ring.put(head.data[self.out_offset:])
            produced += n
            self.out_offset += n
            if self.out_offset < len(head.data):
                break
            self.out.popleft()
            self.out_offset = 0
            self.replies -= head.reply
        return produced

    def _drop_connection(self) -> None:
        self.conn.reset()
        self.reader = MessageReader()
        self.out.clear()
        self.out_offset = self.replies = 0

    def _break(self, code: int, why: str) -> None:
        # The first time is worth a warning; a guest breaking and reconnecting in a loop
        # must not flood the log.
        self.breaks += 1
        log.log(logging.WARNING if self.breaks == 1 else logging.DEBUG,
                "xenstore: domain %d %s", self.domid, why)
        self._drop_connection()
        self.broken = code
        try:
            self.ring.set_field(ERROR, code)
        except PAGE_FAULTS:
            pass

    def _reconnect(self) -> None:
        self._drop_connection()
        self.broken = 0
        self.ring.reset()
        self.ring.set_field(ERROR, 0)
        self.ring.set_field(CONNECTION, CONNECTED)

    def _deliver(self) -> None:
        """Send what an operator change queued for the guest."""
        if self.broken or not self.out:
            return
        try:
            produced = self._flush()
        except RingBroken as err:
            self._break(err.code, f"broke its ring: {err}")
            produced = 0
        except PAGE_FAULTS as err:
            self._break(ERROR_COMM, f"ring page not accessible: {err}")
            produced = 0
        if produced or self.broken:
            self.notify()

    def reset(self) -> None:
        """A guest soft reset: drop watches, transactions, partial and queued messages;
        the tree stays."""
        self._drop_connection()
        self.broken = 0

    # -- the operator (domain 0) ------------------------------------------------------

    def run(self, what: str, fn: Callable[[Edit], object]) -> object:
        """Run a store operation as domain 0, firing the guest's watches."""
        try:
            return dispatch.run(self.store, [self.conn], 0, None, fn)
        except XsError as err:
            raise to_domain_error(err, what) from None
        finally:
            self._deliver()

    def path(self, path: str, special: bool = False) -> str:
        """An operator path: absolute, or relative to the guest's home."""
        if not isinstance(path, str):
            raise InvalidArgument("xenstore: a path must be a string")
        try:
            return canonical(path, self.domid, allow_special=special)[0]
        except XsError as err:
            exc = InvalidArgument(f"xenstore: {path[:80]!r} is not a valid path: {err.name}")
            exc.extra = {"errno": err.name}
            raise exc from None

    def read(self, path: str) -> bytes:
        p = self.path(path)
        return self.run(f"read {p}", lambda e: ops.read(e, p))

    def write(self, path: str, value: bytes | str) -> None:
        p = self.path(path)
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray)):
            raise InvalidArgument("xenstore: a value must be bytes or a string")
        data = bytes(value)
        self.run(f"write {p}", lambda e: ops.write(e, p, data))

    def mkdir(self, path: str) -> None:
        p = self.path(path)
        self.run(f"mkdir {p}", lambda e: ops.mkdir(e, p))

    def rm(self, path: str) -> None:
        p = self.path(path)
        self.run(f"rm {p}", lambda e: ops.rm(e, p))

    def get_perms(self, path: str) -> list[str]:
        p = self.path(path, special=True)
        return format_perms(self.run(f"get-perms {p}", lambda e: ops.get_perms(e, p)))

    def set_perms(self, path: str, perms: list[str]) -> None:
        p = self.path(path, special=True)
        if not isinstance(perms, list) or not all(isinstance(x, str) for x in perms):
            raise InvalidArgument("xenstore: permissions are a list of strings like 'r5'")
        try:
            parsed = parse_perms(perms)
        except XsError:
            raise InvalidArgument(f"xenstore: bad permissions {perms[:8]!r}") from None
        self.run(f"set-perms {p}", lambda e: ops.set_perms(e, p, parsed))

    def ls(self, path: str = "/") -> dict:
        """The subtree at ``path`` like xenstore-ls: {"value", "perms", "children": {name:
        {...}}}; values are text with non-printable bytes escaped as \\xNN."""
        p = self.path(path)
        top = self.store.get(p)
        if top is None:
            raise to_domain_error(XsError("ENOENT"), f"ls {p}")
        root = _entry(top)
        stack = [(p, top, root)]
        while stack:
            q, node, entry = stack.pop()
            for name in node.children:
                cq = f"/{name}" if q == "/" else f"{q}/{name}"
                child = self.store.get(cq)
                if child is not None:
                    entry["children"][name] = sub = _entry(child)
                    stack.append((cq, child, sub))
        return root

    def write_domain_tree(self, info: DomainInfo) -> None:
        """Write what a toolstack writes for this guest (see toolstack.py), atomically."""
        self.run("domain tree", lambda e: write_domain_tree(e, self.domid, info))

def _entry(node) -> dict:
    return {"value": escape(node.value), "perms": format_perms(node.perms), "children": {}}


def escape(value: bytes) -> str:
    """Printable ASCII as is, a backslash doubled, anything else as \\xNN."""
    out = []
    for b in value:
        if b == 0x5C:
            out.append("\\\\")
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)
