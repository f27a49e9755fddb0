"""One request in, one reply out: the xenstore operations on the wire.

:func:`handle` never raises for anything a client sends: an unknown type is ENOSYS, a
request xenstored serves only to the privileged domain is EACCES, a bad transaction id is
ENOENT, bad arguments are EINVAL, and the store's own errors become their error reply.
"""

from __future__ import annotations

from collections.abc import Callable

from xend_lite.record import Record
from xend_lite.xen.xenstore import ops
from xend_lite.xen.xenstore.errors import XsError
from xend_lite.xen.xenstore.protocol import (
    PAYLOAD_MAX,
    PRIVILEGED_ONLY,
    Header,
    XsType,
    canonical,
    encode,
    error_message,
    home_path,
    one_arg,
    parse_domid,
    strings,
)
from xend_lite.xen.xenstore.store import Edit, Store, format_perms, parse_perms
from xend_lite.xen.xenstore.transaction import Transaction
from xend_lite.xen.xenstore.watches import Connection, fire

__all__ = ["Session", "handle", "run"]

OK = b"OK\0"
Events = list[tuple[bytes, bytes]]          # (path, token) to send after the reply


class Session(Record):
    """What a request runs against: the store, the requesting connection, and every
    connection whose watches may fire."""

    __slots__ = ("store", "conn", "peers")

    def __init__(self, store: Store, conn: Connection, peers: list[Connection]):
        self.store = store
        self.conn = conn
        self.peers = peers

    def path(self, raw: bytes, special: bool = False) -> tuple[str, bool]:
        limit = None if self.conn.privileged else self.store.quotas.path_max
        return canonical(raw, self.conn.domid, allow_special=special, path_max=limit)


def run(store: Store, peers: list[Connection], actor: int, tx: Transaction | None,
        fn: Callable[[Edit], object]) -> object:
    """Run one store operation as ``actor``, in ``tx`` or directly, all or nothing; fire
    the watches of a direct change."""
    if tx is None:
        edit = store.edit(actor)
        result = fn(edit)
        fire(store, peers, store.apply(edit))
        return result
    edit = tx.edit(store, actor)
    try:
        result = fn(edit)
    except XsError:
        tx.record(store, edit)      # what the failure was based on; ENOSPC if it won't fit
        raise
    tx.apply(store, edit)
    return result


def _run(s: Session, tx: Transaction | None, fn: Callable[[Edit], object]) -> object:
    return run(s.store, s.peers, s.conn.domid, tx, fn)


def _read(s: Session, tx: Transaction | None, payload: bytes) -> tuple[bytes, Events]:
    path, _ = s.path(one_arg(payload))
    return _run(s, tx, lambda e: ops.read(e, path)), []


def _write(s: Session, tx: Transaction | None, payload: bytes) -> tuple[bytes, Events]:
    nul = payload.find(b"\0")
    if nul < 0:
        raise XsError("EINVAL", "no path")
    path, _ = s.path(payload[:nul])
    value = payload[nul + 1:]
    _run(s, tx, lambda e: ops.write(e, path, value))
    return OK, []


def _mkdir(s: Session, tx: Transaction | None, payload: bytes) -> tuple[bytes, Events]:
    path, _ = s.path(one_arg(payload))
    _run(s, tx, lambda e: ops.mkdir(e, path))
    return OK, []


def _rm(s: Session, tx: Transaction | None, payload: bytes) -> tuple[bytes, Events]:
    path, _ = s.path(one_arg(payload))
    _run(s, tx, lambda e: ops.rm(e, path))
    return OK, []


def _directory(s: Session, tx: Transaction | None, payload: bytes) -> tuple[bytes, Events]:
    path, _ = s.path(one_arg(payload))
    node = _run(s, tx, lambda e: ops.directory(e, path))
    return b"".join(c.encode() + b"\0" for c in node.children), []


def _directory_part(s: Session, tx: Transaction | None,
                    payload: bytes) -> tuple[bytes, Events]:
    raw_path, raw_off = strings(payload, count=2)
    if not raw_off.isdigit() or len(raw_off) > 10:
        raise XsError("EINVAL", "bad offset")
    path, _ = s.path(raw_path)
    node = _run(s, tx, lambda e: ops.directory(e, path))
    gen = str(node.generation).encode() + b"\0"
    listing = b"".join(c.encode() + b"\0" for c in node.children)
    off = int(raw_off)
    if off >= len(listing):
        return gen + b"\0", []
    # Whole names from ``off`` while they fit; an empty string marks the end of the list.
    room = PAYLOAD_MAX - len(gen) - 1
    end = off
    while end < len(listing):
        nxt = listing.index(b"\0", end) + 1
        if nxt - off > room:
            break
        end = nxt
    return gen + listing[off:end] + (b"\0" if end == len(listing) else b""), []


def _get_perms(s: Session, tx: Transaction | None, payload: bytes) -> tuple[bytes, Events]:
    path, _ = s.path(one_arg(payload), special=True)
    perms = _run(s, tx, lambda e: ops.get_perms(e, path))
    return b"".join(p.encode() + b"\0" for p in format_perms(perms)), []


def _set_perms(s: Session, tx: Transaction | None, payload: bytes) -> tuple[bytes, Events]:
    raw = strings(payload, at_least=2)
    if not s.conn.privileged and len(raw) - 1 > s.store.quotas.perms:
        raise XsError("ENOSPC", "permission quota")
    perms = parse_perms(raw[1:])
    path, _ = s.path(raw[0], special=True)
    _run(s, tx, lambda e: ops.set_perms(e, path, perms))
    return OK, []


def _watch(s: Session, tx: Transaction | None, payload: bytes) -> tuple[bytes, Events]:
    raw_path, token = strings(payload, count=2)
    path, relative = s.path(raw_path, special=True)
    watch = s.conn.add_watch(path, token, relative)
    # A new watch fires once straight away, after its reply.
    return OK, [(s.conn.event_path(watch, path), token)]


def _unwatch(s: Session, tx: Transaction | None, payload: bytes) -> tuple[bytes, Events]:
    raw_path, token = strings(payload, count=2)
    path, _ = s.path(raw_path, special=True)
    s.conn.remove_watch(path, token)
    return OK, []


def _tx_start(s: Session, tx: Transaction | None, payload: bytes) -> tuple[bytes, Events]:
    if tx is not None:
        raise XsError("EBUSY", "no nested transactions")
    return str(s.conn.start_transaction().id).encode() + b"\0", []


def _tx_end(s: Session, tx: Transaction | None, payload: bytes) -> tuple[bytes, Events]:
    arg = one_arg(payload)
    if arg not in (b"T", b"F"):
        raise XsError("EINVAL", "expected T or F")
    if tx is None:
        raise XsError("ENOENT", "no transaction")
    del s.conn.transactions[tx.id]          # ended whatever the outcome
    if arg == b"T":
        fire(s.store, s.peers, tx.commit(s.store, s.conn.domid))
    return OK, []


def _domain_path(s: Session, tx: Transaction | None, payload: bytes) -> tuple[bytes, Events]:
    return home_path(parse_domid(one_arg(payload))).encode() + b"\0", []


def _reset_watches(s: Session, tx: Transaction | None,
                   payload: bytes) -> tuple[bytes, Events]:
    s.conn.reset()
    return OK, []


Handler = Callable[[Session, "Transaction | None", bytes], tuple[bytes, Events]]
HANDLERS: dict[int, Handler] = {
    XsType.READ: _read, XsType.WRITE: _write, XsType.MKDIR: _mkdir, XsType.RM: _rm,
    XsType.DIRECTORY: _directory, XsType.DIRECTORY_PART: _directory_part,
    XsType.GET_PERMS: _get_perms, XsType.SET_PERMS: _set_perms,
    XsType.WATCH: _watch, XsType.UNWATCH: _unwatch,
    XsType.TRANSACTION_START: _tx_start, XsType.TRANSACTION_END: _tx_end,
    XsType.GET_DOMAIN_PATH: _domain_path, XsType.RESET_WATCHES: _reset_watches,
}
_NO_TX = (XsType.WATCH, XsType.UNWATCH)       # the tx_id of these is ignored


def handle(s: Session, hdr: Header, payload: bytes) -> tuple[bytes, Events]:
    """The reply message to one request, and the watch events to send after it."""
    try:
        if hdr.type in PRIVILEGED_ONLY and not s.conn.privileged:
            raise XsError("EACCES", "privileged request")
        handler = HANDLERS.get(hdr.type)
        if handler is None:
            raise XsError("ENOSYS", f"request type {hdr.type}")
        tx = None if hdr.type in _NO_TX else s.conn.transaction(hdr.tx_id)
        out, after = handler(s, tx, payload)
        if len(out) > PAYLOAD_MAX:
            raise XsError("E2BIG", "reply too large")
        return encode(hdr.type, hdr.req_id, hdr.tx_id, out), after
    except XsError as err:
        return error_message(hdr.req_id, hdr.tx_id, err.name), []
