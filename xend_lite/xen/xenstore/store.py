"""The xenstore tree: nodes with a value, permissions and children, kept flat by path.

Permissions are xenstored's: the first entry names the owner and the access every domain
not listed gets; later entries give one domain ``n``/``r``/``w``/``b``. The owner and
domain 0 (the toolstack) may do anything. Nodes are immutable and carry the generation
count of their last change, which transactions compare to find conflicts.

A request runs in an :class:`Edit`: it reads through to the store (or a transaction) and
stages every change; quotas are checked on the staged result; only a request that passed
every check is applied, so one that fails changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from xend_lite.record import Frozen
from xend_lite.record import set_field as _set
from xend_lite.xen.xenstore.errors import XsError
from xend_lite.xen.xenstore.protocol import PAYLOAD_MAX, REL_PATH_MAX, parse_domid

__all__ = ["READ", "WRITE", "OWNER", "Perms", "Node", "Change", "Quotas", "Store", "Edit",
           "access", "parse_perms", "format_perms", "parent_of", "basename", "SPECIAL"]

READ, WRITE, OWNER = 1, 2, 4
_ACCESS = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}
Perms = tuple[tuple[int, str], ...]          # ((owner, default access), (domid, access)...)

# xenstored counts a node as a 16-byte header, 8 bytes per permission, value, child names.
NODE_HEADER, PERM_SIZE = 16, 8
SPECIAL = ("@introduceDomain", "@releaseDomain")


def access(actor: int, perms: Perms) -> int:
    """What ``actor`` may do to a node with ``perms``: READ|WRITE|OWNER bits."""
    if actor == 0 or perms[0][0] == actor:
        return READ | WRITE | OWNER
    for domid, acc in perms[1:]:
        if domid == actor:
            return _ACCESS[acc]
    return _ACCESS[perms[0][1]]


def parse_perms(raws: list[bytes] | list[str]) -> Perms:
    """``["n0", "r5"]`` -> ``((0, "n"), (5, "r"))``; anything else is EINVAL."""
    out = []
    for raw in raws:
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
        if not text or text[0] not in _ACCESS:
            raise XsError("EINVAL", "bad permission")
        out.append((parse_domid(text[1:].encode("ascii", "replace")), text[0]))
    if not out:
        raise XsError("EINVAL", "no permissions")
    return tuple(out)


def format_perms(perms: Perms) -> list[str]:
    return [f"{acc}{domid}" for domid, acc in perms]


def parent_of(path: str) -> str:
    i = path.rfind("/")
    return path[:i] if i > 0 else "/"


def basename(path: str) -> str:
    return path[path.rfind("/") + 1:]


def child_path(path: str, name: str) -> str:
    return f"/{name}" if path == "/" else f"{path}/{name}"


class Node(Frozen):
    __slots__ = ("value", "perms", "children", "generation")
    value: bytes
    perms: Perms
    children: tuple[str, ...]
    generation: int

    def __init__(self, value: bytes, perms: Perms, children: tuple[str, ...] = (),
                 generation: int = 0):
        _set(self, "value", value)
        _set(self, "perms", perms)
        _set(self, "children", children)
        _set(self, "generation", generation)

    @property
    def owner(self) -> int:
        return self.perms[0][0]

    def size(self) -> int:
        return (NODE_HEADER + PERM_SIZE * len(self.perms) + len(self.value)
                + sum(len(c) + 1 for c in self.children))


class Change(Frozen):
    """A node changed: watches on ``path`` (and, unless ``exact``, on its ancestors) fire
    for watchers that could read it with any of ``perms`` (before and after)."""

    __slots__ = ("path", "exact", "perms")
    path: str
    exact: bool
    perms: tuple[Perms, ...]

    def __init__(self, path: str, exact: bool, perms: tuple[Perms, ...]):
        _set(self, "path", path)
        _set(self, "exact", exact)
        _set(self, "perms", perms)


class Quotas(Frozen):
    """Per-domain limits, xenstored's defaults. They bind the guest; ``max_nodes`` bounds
    what the toolstack (domain 0, not otherwise limited) may add to the whole store."""

    __slots__ = ("nodes", "node_size", "watches", "transactions", "transaction_nodes",
                 "outstanding", "path_max", "perms", "queued_events", "max_nodes")
    nodes: int                  # nodes a domain owns
    node_size: int              # one node: header, permissions, value, child names
    watches: int                # watches of a connection
    transactions: int           # open transactions of a connection
    transaction_nodes: int      # nodes one transaction may touch
    outstanding: int            # replies queued before requests stop being read
    path_max: int               # path length past /local/domain/<id>/
    perms: int                  # permission entries of a node
    queued_events: int          # watch events waiting for the ring, beyond: dropped
    max_nodes: int              # whole store, checked when domain 0 adds nodes

    def __init__(self, nodes: int = 1000, node_size: int = 2048, watches: int = 128,
                 transactions: int = 10, transaction_nodes: int = 1024, outstanding: int = 20,
                 path_max: int = REL_PATH_MAX, perms: int = 5, queued_events: int = 256,
                 max_nodes: int = 100_000):
        _set(self, "nodes", nodes)
        _set(self, "node_size", node_size)
        _set(self, "watches", watches)
        _set(self, "transactions", transactions)
        _set(self, "transaction_nodes", transaction_nodes)
        _set(self, "outstanding", outstanding)
        _set(self, "path_max", path_max)
        _set(self, "perms", perms)
        _set(self, "queued_events", queued_events)
        _set(self, "max_nodes", max_nodes)
        for name in self.__slots__:
            v = getattr(self, name)
            if type(v) is not int or not 1 <= v <= 10_000_000:
                raise ValueError(f"quota {name} must be an int in 1..10000000, not {v!r}")


class Store:
    """The committed tree. ``counts`` is the number of nodes each domain owns."""

    def __init__(self, quotas: Quotas | None = None):
        self.quotas = quotas or Quotas()
        self.generation = 0
        self.nodes: dict[str, Node] = {}
        self.counts: dict[int, int] = {}
        root = ((0, "n"),)
        for path, children in (("/", ("tool",)), ("/tool", ("xenstored",)),
                               ("/tool/xenstored", ()), *((s, ()) for s in SPECIAL)):
            self.put(path, Node(b"", root, children, self.bump()))

    def bump(self) -> int:
        self.generation += 1
        return self.generation

    def get(self, path: str) -> Node | None:
        return self.nodes.get(path)

    def put(self, path: str, node: Node | None) -> None:
        """Replace (None: remove) one node as it is, keeping the owner counts."""
        old = self.nodes.pop(path, None)
        if old is not None:
            self._count(old.owner, -1)
        if node is not None:
            self.nodes[path] = node
            self._count(node.owner, 1)

    def _count(self, domid: int, d: int) -> None:
        n = self.counts.get(domid, 0) + d
        if n:
            self.counts[domid] = n
        else:
            self.counts.pop(domid, None)

    def edit(self, actor: int) -> Edit:
        return Edit(self.get, actor, self.quotas, self.counts.get, lambda: len(self.nodes))

    def apply(self, edit: Edit) -> list[Change]:
        """Apply a checked edit; each changed node gets a new generation."""
        edit.finish()
        for path, node in edit.staged.items():
            self.put(path, None if node is None else node.replace(generation=self.bump()))
        return edit.changes


class Edit:
    """One request's view: reads fall through to ``lookup`` (and are remembered in
    ``seen``), writes are staged in ``staged`` (None: removed) until applied."""

    def __init__(self, lookup: Callable[[str], Node | None], actor: int, quotas: Quotas,
                 count: Callable[[int], int | None], total: Callable[[], int]):
        self.lookup = lookup
        self.actor = actor
        self.quotas = quotas
        self._count = count
        self._total = total
        self.staged: dict[str, Node | None] = {}
        self.seen: set[str] = set()
        self.changes: list[Change] = []

    @property
    def privileged(self) -> bool:
        return self.actor == 0

    def get(self, path: str) -> Node | None:
        if path in self.staged:
            return self.staged[path]
        self.seen.add(path)
        return self.lookup(path)

    def put(self, path: str, node: Node | None, check_size: bool = True) -> None:
        if node is not None:
            if len(node.value) > PAYLOAD_MAX:
                raise XsError("E2BIG", "value larger than a payload")
            if check_size and not self.privileged and node.size() > self.quotas.node_size:
                raise XsError("ENOSPC", "node size quota")
        self.seen.add(path)
        self.staged[path] = node

    def change(self, path: str, exact: bool, *nodes: Node | None) -> None:
        self.changes.append(Change(path, exact, tuple(n.perms for n in nodes if n)))

    def delta(self) -> dict[int, int]:
        """Change in nodes owned, per domain, if the staged changes were applied."""
        out: dict[int, int] = {}
        for path, node in self.staged.items():
            old = self.lookup(path)
            if old is not None:
                out[old.owner] = out.get(old.owner, 0) - 1
            if node is not None:
                out[node.owner] = out.get(node.owner, 0) + 1
        return out

    def finish(self) -> None:
        """Check the node quotas on the staged result (ENOSPC)."""
        delta = self.delta()
        if self.privileged:
            grow = sum(delta.values())
            if grow > 0 and self._total() + grow > self.quotas.max_nodes:
                raise XsError("ENOSPC", "store node limit")
            return
        grow = delta.get(self.actor, 0)
        if grow > 0 and (self._count(self.actor) or 0) + grow > self.quotas.nodes:
            raise XsError("ENOSPC", "node quota")
