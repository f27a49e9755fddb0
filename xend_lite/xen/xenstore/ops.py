"""The store operations, each run inside one :class:`~.store.Edit` (xenstored's semantics).

A node the caller may not see answers as xenstored answers: a missing node is ENOENT only if
its nearest existing ancestor would have allowed the access, EACCES otherwise, so a guest
learns nothing of what it cannot read. WRITE and MKDIR create missing parents, which inherit
the permissions of the nearest existing ancestor (a guest owns what it creates). RM removes
a whole subtree. Every change is recorded for the watches.
"""

from __future__ import annotations

from xend_lite.xen.xenstore.errors import XsError
from xend_lite.xen.xenstore.store import (
    OWNER,
    READ,
    WRITE,
    Edit,
    Node,
    Perms,
    access,
    basename,
    child_path,
    parent_of,
)

__all__ = ["read", "write", "mkdir", "rm", "directory", "get_perms", "set_perms", "lookup"]

PRIVILEGED_PERMS_MAX = 256      # the toolstack's bound; xenstored leaves it unbounded


def _denied(edit: Edit, path: str, want: int, name: str) -> XsError:
    """xenstored's errno_from_parents: hide ENOENT behind EACCES unless the nearest
    existing ancestor grants ``want``."""
    p = path
    while p != "/":
        p = parent_of(p)
        anc = edit.get(p)
        if anc is not None:
            if access(edit.actor, anc.perms) & want:
                return XsError(name)
            break
    return XsError("EACCES")


def lookup(edit: Edit, path: str, want: int) -> Node:
    """The node at ``path`` if the actor has every bit of ``want``; else ENOENT/EACCES."""
    node = edit.get(path)
    if node is not None and access(edit.actor, node.perms) & want == want:
        return node
    raise _denied(edit, path, want, "ENOENT" if node is None else "EACCES")


def read(edit: Edit, path: str) -> bytes:
    return lookup(edit, path, READ).value


def directory(edit: Edit, path: str) -> Node:
    return lookup(edit, path, READ)


def get_perms(edit: Edit, path: str) -> Perms:
    return lookup(edit, path, READ).perms


def _create(edit: Edit, path: str, value: bytes) -> Node:
    missing = [path]
    p = parent_of(path)
    while (parent := edit.get(p)) is None:
        missing.append(p)
        p = parent_of(p)
    perms = parent.perms
    if not edit.privileged:
        perms = ((edit.actor, perms[0][1]),) + perms[1:]
    for name in reversed(missing):
        if name.startswith("@"):
            raise XsError("EINVAL", "no children below a special node")
        edit.put(p, parent.replace(children=parent.children + (basename(name),)))
        parent, p = Node(value if name == path else b"", perms), name
        edit.put(p, parent)
    return parent


def write(edit: Edit, path: str, value: bytes) -> None:
    try:
        node = lookup(edit, path, WRITE)
    except XsError as err:
        if err.name != "ENOENT":
            raise
        node = _create(edit, path, value)
    else:
        old, node = node, node.replace(value=value)
        edit.put(path, node)
        edit.change(path, False, old, node)
        return
    edit.change(path, False, node)


def mkdir(edit: Edit, path: str) -> None:
    try:
        lookup(edit, path, WRITE)
    except XsError as err:
        if err.name != "ENOENT":
            raise
        edit.change(path, False, _create(edit, path, b""))


def rm(edit: Edit, path: str) -> None:
    try:
        top = lookup(edit, path, WRITE)
    except XsError as err:
        if err.name == "ENOENT" and edit.get(parent_of(path)) is not None:
            return          # already gone, and its parent exists: fine
        raise
    if path == "/" or path.startswith("@"):
        raise XsError("EINVAL", "cannot remove this node")
    parent = edit.get(parent_of(path))
    if parent is None:
        raise XsError("EINVAL", "node without parent")
    # Post-order, as xenstored fires: descendants (exact watches only), then the node.
    order: list[tuple[str, Node]] = []
    stack = [(path, top)]
    while stack:
        p, node = stack.pop()
        order.append((p, node))
        for c in node.children:
            cp = child_path(p, c)
            child = edit.get(cp)
            if child is not None:
                stack.append((cp, child))
    for p, node in reversed(order):
        edit.put(p, None, check_size=False)
        edit.change(p, p != path, node)
    name = basename(path)
    edit.put(parent_of(path), parent.replace(children=tuple(
        c for c in parent.children if c != name)), check_size=False)


def set_perms(edit: Edit, path: str, perms: Perms) -> None:
    if len(perms) > (PRIVILEGED_PERMS_MAX if edit.privileged else edit.quotas.perms):
        raise XsError("ENOSPC", "permission quota")
    node = lookup(edit, path, WRITE | OWNER)
    if not edit.privileged and perms[0][0] != node.owner:
        raise XsError("EPERM", "only the toolstack may change the owner")
    new = node.replace(perms=perms)
    edit.put(path, new)
    edit.change(path, False, node, new)
