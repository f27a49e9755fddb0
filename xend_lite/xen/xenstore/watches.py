"""Connections to the store: each has its watches and open transactions.

A watch on P fires for a change at P or below it (a removal fires exact watches on every
removed node too), for a watcher that could read the node before or after the change, or
its parent. The event names the changed path, relative when the watch was set relative.
A connection's watches and transactions are bounded by its quotas.
"""

from __future__ import annotations

from collections.abc import Callable

from xend_lite.record import Frozen
from xend_lite.record import set_field as _set
from xend_lite.xen.xenstore.errors import XsError
from xend_lite.xen.xenstore.protocol import home_path
from xend_lite.xen.xenstore.store import READ, Change, Quotas, Store, access, parent_of
from xend_lite.xen.xenstore.transaction import Transaction

__all__ = ["Watch", "Connection", "fire", "is_child"]

TX_ID_MAX = 0xFFFF_FFFF


def is_child(path: str, parent: str) -> bool:
    """xenstored's test: ``path`` is ``parent`` or below it; everything is below ``/``."""
    if parent == "/":
        return True
    return path == parent or path.startswith(parent + "/")


class Watch(Frozen):
    __slots__ = ("path", "token", "relative")
    path: str           # absolute, or a special @path
    token: bytes
    relative: bool      # set with a relative path: events are relative too

    def __init__(self, path: str, token: bytes, relative: bool):
        _set(self, "path", path)
        _set(self, "token", token)
        _set(self, "relative", relative)


class Connection:
    """One client of the store. ``deliver(path, token)`` queues a watch event for it."""

    def __init__(self, domid: int, quotas: Quotas, deliver: Callable[[bytes, bytes], None]):
        self.domid = domid
        self.quotas = quotas
        self.deliver = deliver
        self.watches: dict[tuple[str, bytes], Watch] = {}
        self.transactions: dict[int, Transaction] = {}
        self.next_tx = 1

    @property
    def privileged(self) -> bool:
        return self.domid == 0

    def event_path(self, watch: Watch, path: str) -> bytes:
        if watch.relative:
            path = path[len(home_path(self.domid)) + 1:]
        return path.encode("ascii")

    def add_watch(self, path: str, token: bytes, relative: bool) -> Watch:
        if (path, token) in self.watches:
            raise XsError("EEXIST", "watch exists")
        if not self.privileged and len(self.watches) >= self.quotas.watches:
            raise XsError("E2BIG", "watch quota")
        watch = self.watches[(path, token)] = Watch(path, token, relative)
        return watch

    def remove_watch(self, path: str, token: bytes) -> None:
        if self.watches.pop((path, token), None) is None:
            raise XsError("ENOENT", "no such watch")

    def start_transaction(self) -> Transaction:
        if not self.privileged and len(self.transactions) >= self.quotas.transactions:
            raise XsError("ENOSPC", "transaction quota")
        while self.next_tx in self.transactions or self.next_tx == 0:
            self.next_tx = (self.next_tx + 1) & TX_ID_MAX
        tx = self.transactions[self.next_tx] = Transaction(self.next_tx)
        self.next_tx = (self.next_tx + 1) & TX_ID_MAX
        return tx

    def transaction(self, tx_id: int) -> Transaction | None:
        """The open transaction ``tx_id`` (None for 0); ENOENT if there is none."""
        if tx_id == 0:
            return None
        tx = self.transactions.get(tx_id)
        if tx is None:
            raise XsError("ENOENT", "no such transaction")
        return tx

    def reset(self) -> None:
        """Drop every watch and transaction (RESET_WATCHES, soft reset, broken ring)."""
        self.watches.clear()
        self.transactions.clear()

    def permitted(self, store: Store, change: Change) -> bool:
        if any(access(self.domid, p) & READ for p in change.perms):
            return True
        parent = store.get(parent_of(change.path))
        return parent is not None and bool(access(self.domid, parent.perms) & READ)


def fire(store: Store, connections: list[Connection], changes: list[Change]) -> None:
    """Deliver the events of committed ``changes`` to every matching watch."""
    for conn in connections:
        if not conn.watches:
            continue
        for change in changes:
            if not conn.permitted(store, change):
                continue
            for watch in conn.watches.values():
                hit = (change.path == watch.path if change.exact
                       else is_child(change.path, watch.path))
                if hit:
                    conn.deliver(conn.event_path(watch, change.path), watch.token)
