"""Transactions: a private view of the store, committed only if nothing it touched changed.

A transaction keeps its own copy of every node it has touched (read, written, found
missing), taken from the store at first touch together with that node's generation. Reads
and writes then see that copy. Commit checks every touched node against the store: if any
generation differs (changed, removed, created meanwhile) the commit fails with EAGAIN and
the guest retries; else the transaction's changes are applied and their watches fire.
Adding a child changes the parent, so a conflicting change below a touched node conflicts.
"""

from __future__ import annotations

from xend_lite.record import Record
from xend_lite.xen.xenstore.errors import XsError
from xend_lite.xen.xenstore.store import Change, Edit, Node, Store

__all__ = ["Transaction"]


def _gen(node: Node | None) -> int:
    return node.generation if node is not None else 0


class Transaction(Record):
    __slots__ = ("id", "original", "nodes", "modified", "changes", "delta")

    def __init__(self, id: int, original: dict[str, Node | None] | None = None,  # noqa: A002
                 nodes: dict[str, Node | None] | None = None,
                 modified: dict[str, None] | None = None, changes: dict[str, bool] | None = None,
                 delta: dict[int, int] | None = None):
        self.id = id
        self.original = {} if original is None else original    # store's node at 1st touch
        self.nodes = {} if nodes is None else nodes             # this transaction's view
        self.modified = {} if modified is None else modified    # paths it changed, ordered
        self.changes = {} if changes is None else changes       # watch path -> exact
        self.delta = {} if delta is None else delta             # nodes owned, vs store

    def view(self, store: Store, path: str) -> Node | None:
        return self.nodes[path] if path in self.nodes else store.get(path)

    def edit(self, store: Store, actor: int) -> Edit:
        return Edit(lambda p: self.view(store, p), actor, store.quotas,
                    lambda d: store.counts.get(d, 0) + self.delta.get(d, 0),
                    lambda: len(store.nodes) + sum(self.delta.values()))

    def record(self, store: Store, edit: Edit) -> None:
        """Remember the nodes an edit looked at (a failed read counts too: a node found
        missing must still be missing at commit); ENOSPC past the quota."""
        new = [p for p in edit.seen if p not in self.nodes]
        if len(self.nodes) + len(new) > store.quotas.transaction_nodes:
            raise XsError("ENOSPC", "transaction node quota")
        for p in new:
            self.original[p] = self.nodes[p] = store.get(p)

    def apply(self, store: Store, edit: Edit) -> None:
        """Take a checked edit into this transaction (no watch fires until commit)."""
        edit.finish()
        self.record(store, edit)
        for d, n in edit.delta().items():
            self.delta[d] = self.delta.get(d, 0) + n
        for p, node in edit.staged.items():
            self.nodes[p] = None if node is None else node.replace(generation=store.bump())
            self.modified[p] = None
        for c in edit.changes:
            self.changes[c.path] = self.changes.get(c.path, True) and c.exact

    def commit(self, store: Store, actor: int) -> list[Change]:
        """Apply to the store if nothing touched has changed there (else EAGAIN) and the
        node quotas hold (else ENOSPC). Returns the changes for the watches."""
        for p, orig in self.original.items():
            if _gen(store.get(p)) != _gen(orig):
                raise XsError("EAGAIN", "conflict")
        grow = sum(self.delta.values()) if actor == 0 else self.delta.get(actor, 0)
        if grow > 0:
            if actor == 0 and len(store.nodes) + grow > store.quotas.max_nodes:
                raise XsError("ENOSPC", "store node limit")
            if actor != 0 and store.counts.get(actor, 0) + grow > store.quotas.nodes:
                raise XsError("ENOSPC", "node quota")
        for p in self.modified:
            node = self.nodes[p]
            store.put(p, None if node is None else node.replace(generation=store.bump()))
        return [Change(p, exact, tuple(n.perms for n in (self.original.get(p), self.nodes.get(p))
                                       if n is not None))
                for p, exact in self.changes.items()]
