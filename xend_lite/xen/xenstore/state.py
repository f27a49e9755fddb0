"""The saved state of a xenstore server, as plain data: the whole tree, the guest's watches
and open transactions, the partial request read so far and the messages queued for the
ring. Ring indices are in the page, which is guest memory and saved with it.

:func:`restore` checks everything (paths, permissions, the tree's shape, quotas, message
framing) and builds the new store and connection aside; only then does it swap them in, so
a bad state changes nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from xend_lite.errors import SnapshotError
from xend_lite.snapshot.state import State
from xend_lite.xen.xenstore.errors import XsError
from xend_lite.xen.xenstore.protocol import (
    HEADER_SIZE,
    PAYLOAD_MAX,
    Header,
    MessageReader,
    XsType,
    canonical,
    home_path,
)
from xend_lite.xen.xenstore.ring import ERROR_PROTO
from xend_lite.xen.xenstore.server import Outgoing, XenstoreServer
from xend_lite.xen.xenstore.store import (
    SPECIAL,
    Node,
    Quotas,
    Store,
    basename,
    child_path,
    format_perms,
    parent_of,
    parse_perms,
)
from xend_lite.xen.xenstore.transaction import Transaction
from xend_lite.xen.xenstore.watches import TX_ID_MAX, Connection

__all__ = ["XenstoreState", "NodeData", "WatchRecord", "TxEntry", "TxRecord", "OutRecord",
           "capture", "restore"]

GEN_MAX = (1 << 63) - 1


@dataclass
class NodeData:
    value: bytes
    perms: list[str]
    children: list[str]
    generation: int


@dataclass
class WatchRecord:
    path: str
    token: bytes
    relative: bool


@dataclass
class TxEntry:
    path: str
    original: NodeData | None       # the store's node when the transaction first touched it
    node: NodeData | None           # the transaction's own
    modified: bool


@dataclass
class TxRecord:
    id: int
    entries: list[TxEntry]
    changes: dict[str, bool]        # watch path -> exact


@dataclass
class OutRecord:
    reply: bool
    data: bytes


@dataclass
class XenstoreState(State):
    NAME = "xenstore"
    VERSION = 1
    domid: int = 0
    generation: int = 0
    nodes: dict[str, NodeData] = field(default_factory=dict)
    watches: list[WatchRecord] = field(default_factory=list)
    transactions: list[TxRecord] = field(default_factory=list)
    next_tx: int = 1
    partial: bytes = b""
    out: list[OutRecord] = field(default_factory=list)
    out_offset: int = 0
    events_dropped: int = 0
    broken: int = 0


def _data(node: Node | None) -> NodeData | None:
    if node is None:
        return None
    return NodeData(node.value, format_perms(node.perms), list(node.children), node.generation)


def capture(server: XenstoreServer) -> XenstoreState:
    conn = server.conn
    return XenstoreState(
        domid=server.domid, generation=server.store.generation,
        nodes={p: _data(n) for p, n in server.store.nodes.items()},
        watches=[WatchRecord(w.path, w.token, w.relative) for w in conn.watches.values()],
        transactions=[TxRecord(tx.id, [TxEntry(p, _data(tx.original[p]), _data(n),
                                               p in tx.modified)
                                       for p, n in tx.nodes.items()], dict(tx.changes))
                      for tx in conn.transactions.values()],
        next_tx=conn.next_tx, partial=server.reader.partial(),
        out=[OutRecord(o.reply, o.data) for o in server.out], out_offset=server.out_offset,
        events_dropped=server.events_dropped, broken=server.broken)


class _Bad(Exception):
    pass


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise _Bad(what)


def _path(path: str, special: bool = True) -> str:
    try:
        p, relative = canonical(path, 0, allow_special=special)
    except XsError:
        raise _Bad(f"invalid path {path[:80]!r}") from None
    _check(not relative, f"relative path {path[:80]!r}")
    return p


def _node(d: NodeData, where: str) -> Node:
    try:
        perms = parse_perms(d.perms)
    except XsError:
        raise _Bad(f"{where}: bad permissions") from None
    _check(len(perms) <= 256 and len(d.value) <= PAYLOAD_MAX, f"{where}: node too large")
    _check(0 < d.generation <= GEN_MAX, f"{where}: bad generation")
    for c in d.children:
        _check("/" not in c and _path("/" + c, False) == "/" + c, f"{where}: bad child {c!r}")
    _check(len(set(d.children)) == len(d.children), f"{where}: repeated child")
    return Node(d.value, perms, tuple(d.children), d.generation)


def _tree(state: XenstoreState, store: Store) -> None:
    nodes = {}
    for p, d in state.nodes.items():
        _check(_path(p) == p, f"invalid path {p[:80]!r}")
        nodes[p] = _node(d, p)
        _check(d.generation <= state.generation, f"{p}: generation ahead of the store")
    for p in ("/", *SPECIAL):
        _check(p in nodes, f"{p} is missing")
    for p, node in nodes.items():
        for c in node.children:
            _check(child_path(p, c) in nodes, f"{p}: child {c!r} is missing")
        if p != "/" and not p.startswith("@"):
            parent = nodes.get(parent_of(p))
            _check(parent is not None and basename(p) in parent.children, f"{p}: orphan")
        if p.startswith("@"):
            _check(not node.children, f"{p}: a special node has no children")
    _check(len(nodes) <= store.quotas.max_nodes + store.quotas.nodes, "too many nodes")
    store.nodes.clear()
    store.counts.clear()
    for p, node in nodes.items():
        store.put(p, node)
    store.generation = state.generation


def _connection(state: XenstoreState, store: Store, conn: Connection) -> None:
    q = store.quotas
    home = home_path(conn.domid) + "/"
    _check(len(state.watches) <= q.watches, "too many watches")
    for w in state.watches:
        _check(_path(w.path) == w.path, "bad watch path")
        _check(not w.relative or w.path.startswith(home), "relative watch outside home")
        _check(b"\0" not in w.token and len(w.path) + len(w.token) + 2 <= PAYLOAD_MAX,
               "bad watch token")
        _check((w.path, w.token) not in conn.watches, "repeated watch")
        conn.add_watch(w.path, w.token, w.relative)
    _check(len(state.transactions) <= q.transactions, "too many transactions")
    _check(0 <= state.next_tx <= TX_ID_MAX, "bad next transaction id")
    conn.next_tx = state.next_tx
    for t in state.transactions:
        _check(0 < t.id <= TX_ID_MAX and t.id not in conn.transactions, "bad transaction id")
        _check(len(t.entries) <= q.transaction_nodes, "transaction too large")
        tx = conn.transactions[t.id] = Transaction(t.id)
        for e in t.entries:
            _check(_path(e.path) == e.path and e.path not in tx.nodes, "bad transaction path")
            tx.original[e.path] = None if e.original is None else _node(e.original, e.path)
            tx.nodes[e.path] = None if e.node is None else _node(e.node, e.path)
            for n, sign in ((tx.original[e.path], -1), (tx.nodes[e.path], 1)):
                if n is not None and e.modified:
                    tx.delta[n.owner] = tx.delta.get(n.owner, 0) + sign
            if e.modified:
                tx.modified[e.path] = None
            else:
                _check(tx.original[e.path] == tx.nodes[e.path], "unmodified node differs")
        _check(len(t.changes) <= q.transaction_nodes, "too many transaction changes")
        for p, exact in t.changes.items():
            _check(_path(p) == p, "bad change path")
            tx.changes[p] = exact


def _queues(state: XenstoreState, q: Quotas) -> tuple[MessageReader, deque[Outgoing], int]:
    part = state.partial
    _check(len(part) < HEADER_SIZE + PAYLOAD_MAX, "partial request too long")
    if len(part) >= HEADER_SIZE:
        hdr = Header.unpack(part[:HEADER_SIZE])
        _check(hdr.len <= PAYLOAD_MAX and len(part) < HEADER_SIZE + hdr.len,
               "partial request inconsistent")
    out: deque[Outgoing] = deque()
    replies = 0
    for o in state.out:
        _check(HEADER_SIZE <= len(o.data) <= HEADER_SIZE + PAYLOAD_MAX, "bad queued message")
        hdr = Header.unpack(o.data[:HEADER_SIZE])
        _check(hdr.len == len(o.data) - HEADER_SIZE, "bad queued message length")
        _check((hdr.type == XsType.WATCH_EVENT) != o.reply, "queued message of wrong kind")
        replies += o.reply
        out.append(Outgoing(o.reply, o.data))
    _check(replies <= q.outstanding and len(out) - replies <= q.queued_events,
           "too many queued messages")
    _check(0 <= state.out_offset < len(out[0].data) if out else state.out_offset == 0,
           "bad output offset")
    return MessageReader(part), out, replies


def restore(server: XenstoreServer, state: XenstoreState) -> None:
    prepare(server, state)()


def prepare(server: XenstoreServer, state: XenstoreState) -> Callable[[], None]:
    """Check a saved state and build what it describes, changing nothing; the returned call
    puts it in place (a snapshot load checks every component before it applies any)."""
    if not isinstance(state, XenstoreState):
        raise SnapshotError("xenstore: not a xenstore state")
    if state.domid != server.domid:
        raise SnapshotError(f"xenstore: state of domain {state.domid}, not {server.domid}")
    store = Store(server.quotas)
    conn = Connection(server.domid, server.quotas, server._queue_event)
    try:
        _check(0 < state.generation <= GEN_MAX, "bad generation")
        _check(0 <= state.broken <= ERROR_PROTO and 0 <= state.events_dropped <= GEN_MAX,
               "bad counters")
        _tree(state, store)
        _connection(state, store, conn)
        for tx in conn.transactions.values():
            for n in tx.nodes.values():
                _check(n is None or n.generation <= state.generation, "bad generation")
        reader, out, replies = _queues(state, server.quotas)
    except _Bad as err:
        raise SnapshotError(f"xenstore: state rejected: {err}") from None

    def apply() -> None:
        server.store, server.conn, server.reader = store, conn, reader
        server.out, server.out_offset, server.replies = out, state.out_offset, replies
        server.events_dropped, server.broken = state.events_dropped, state.broken
    return apply
