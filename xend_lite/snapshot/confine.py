"""Snapshot files confined to one directory.

A client names a snapshot; it does not choose where on the host it lands. A
:class:`ConfinedPath` is such a name (``vm.xls``, ``nightly/vm.xls``) inside a root
directory. The writer and the reader never open it by its full path: they open the root and
resolve the name beneath it with openat2(2) and ``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS``,
so a symlink, an absolute symlink target or a ``..`` that would lead out is refused by the
kernel at the moment of use (EXDEV), whatever was swapped in since the name was checked. The
temporary file, the rename and the directory fsync then all happen relative to the directory
fd that resolution gave.

Names are checked first, without touching the file system: relative, no ``.`` or ``..``
component, no empty component, no NUL, and no final component starting with a dot (those are
the writer's temporary files). So a refusal never depends on, nor tells, what exists outside.

Where openat2 is missing (Linux before 5.6) or filtered, the name is walked one component at
a time with O_NOFOLLOW: stricter (no symlink at all), equally unable to leave the root.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from typing import Any

from xend_lite.errors import InvalidArgument

__all__ = ["ConfinedPath", "check_name", "open_beneath", "open_parent", "open_snapshot_file",
           "RESOLVE_BENEATH", "RESOLVE_NO_MAGICLINKS"]

# <linux/openat2.h>; tests/snapshot/test_confine.py compiles a program against the header
# and compares these values and the size of struct open_how.
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
#: openat2's number is the same in every architecture's table (it came after the tables
#: were unified, at 437).
SYS_OPENAT2 = 437
MAX_NAME = 1024          # bytes: a snapshot name, not an arbitrary path
MAX_COMPONENT = 255


_have_openat2: bool | None = None      # unknown until first tried


@functools.cache
@functools.cache
def _binding() -> tuple[Any, Any, Any]:
    """(ctypes, struct open_how, syscall): ctypes is loaded at the first open, not at
    import (a daemon that never saves or loads never needs it), and once: loading it costs
    about 2 ms. ``warm_up`` loads it ahead."""
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64)]

    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long
    return ctypes, OpenHow, syscall


def warm_up() -> None:
    """Load what a confined open needs, for a caller that wants its first open fast (a
    daemon waiting for a snapshot to load)."""
    _binding()


def check_name(name: object) -> str:
    """``name`` if it is a valid snapshot name, else InvalidArgument saying why. Looks at
    the string only."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("a snapshot path must be a non-empty string")
    if "\0" in name:
        raise InvalidArgument("a snapshot path must not contain a NUL character")
    if name.startswith("/"):
        raise InvalidArgument(f"snapshot path {name!r} is absolute: snapshot paths are names "
                              "inside the snapshot directory (for example vm1.xls)")
    parts = name.split("/")
    if ".." in parts or "." in parts:
        raise InvalidArgument(f"snapshot path {name!r} has a '.' or '..' component: snapshot "
                              "paths are names inside the snapshot directory")
    if "" in parts:
        raise InvalidArgument(f"snapshot path {name!r} has an empty component (a doubled or "
                              "trailing '/')")
    if parts[-1].startswith("."):
        raise InvalidArgument(f"snapshot path {name!r}: names starting with '.' are kept for "
                              "temporary files")
    raw = os.fsencode(name)
    if len(raw) > MAX_NAME or any(len(os.fsencode(p)) > MAX_COMPONENT for p in parts):
        raise InvalidArgument(f"snapshot path is too long ({len(raw)} bytes; at most "
                              f"{MAX_NAME}, {MAX_COMPONENT} per component)")
    return name


class ConfinedPath(str):
    """A snapshot name inside ``root``. As a string it is ``root/name`` (what messages and
    replies show); the writer and reader resolve ``name`` beneath ``root`` instead of
    opening that string. Code between the daemon and the snapshot package passes it on as
    it is (``os.fspath`` keeps it; ``str()`` would not)."""

    root: str
    name: str

    def __new__(cls, root: str, name: str) -> ConfinedPath:
        check_name(name)
        self = super().__new__(cls, os.path.join(root, name))
        self.root = root
        self.name = name
        return self

    def outside(self) -> InvalidArgument:
        return InvalidArgument(f"snapshot path {self.name!r} leads out of the snapshot "
                               f"directory {self.root} (through a symbolic link)")


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0,
            resolve: int = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) -> int:
    """openat2(2): an fd for ``path`` resolved from ``dir_fd`` under ``resolve``; OSError
    with the errno otherwise (EXDEV: the path leads out; ENOSYS: no openat2 here)."""
    ctypes, open_how, syscall = _binding()
    how = open_how(flags, mode, resolve)
    raw = os.fsencode(path)
    while True:
        fd = syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(raw),
                     ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        # EAGAIN: a concurrent rename made the kernel unsure a '..' stayed beneath; our
        # names have no '..', so only a symlink's target could: try again, it is rare
        if err == errno.EAGAIN:
            continue
        raise OSError(err, os.strerror(err), path)


def _walk(dir_fd: int, path: str, flags: int, mode: int) -> int:
    """The fallback: each component opened with O_NOFOLLOW; a symlink anywhere is ELOOP."""
    parts = path.split("/")
    cur = dir_fd
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            how = (flags if last else os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) | os.O_NOFOLLOW
            try:
                nxt = os.open(part, how, mode, dir_fd=cur)
            except OSError as err:
                # O_NOFOLLOW with O_DIRECTORY meets a symlink as ENOTDIR
                if err.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(cur, part):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
                raise
            if last:
                return nxt
            if cur != dir_fd:
                os.close(cur)
            cur = nxt
        raise AssertionError("unreachable")
    finally:
        if cur != dir_fd:
            os.close(cur)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def open_beneath(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """``path`` (a checked name) opened beneath ``dir_fd``; OSError EXDEV or ELOOP when it
    leads out of it."""
    global _have_openat2
    flags |= os.O_CLOEXEC
    if _have_openat2 is not False:
        try:
            fd = openat2(dir_fd, path, flags, mode)
            _have_openat2 = True
            return fd
        except OSError as err:
            if err.errno not in (errno.ENOSYS, errno.EPERM) or _have_openat2:
                raise
            _have_openat2 = False          # a kernel without openat2, or a seccomp filter
    return _walk(dir_fd, path, flags, mode)


def _open_root(path: ConfinedPath) -> int:
    return os.open(path.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _confined(path: ConfinedPath, fn, *args) -> int:
    """Run open_beneath from the root; EXDEV/ELOOP become InvalidArgument."""
    root = _open_root(path)
    try:
        return fn(root, *args)
    except OSError as err:
        if err.errno in (errno.EXDEV, errno.ELOOP):
            raise path.outside() from None
        raise
    finally:
        os.close(root)


def open_snapshot_file(path: str, flags: int, mode: int = 0) -> int:
    """An fd for the file at ``path``: resolved beneath its root for a ConfinedPath, opened
    as given otherwise (an operator's own path)."""
    if isinstance(path, ConfinedPath):
        return _confined(path, open_beneath, path.name, flags, mode)
    return os.open(path, flags | os.O_CLOEXEC, mode)


def open_parent(path: str) -> tuple[int, str]:
    """(an O_DIRECTORY fd of the directory ``path`` lies in, its last component). For a
    ConfinedPath the directory is resolved beneath the root; the caller then works only
    relative to the fd."""
    if isinstance(path, ConfinedPath):
        head, _, base = path.name.rpartition("/")
        if not head:
            return _open_root(path), base
        flags = os.O_RDONLY | os.O_DIRECTORY
        return _confined(path, open_beneath, head, flags), base
    d, base = os.path.split(os.path.abspath(path))
    return os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), base
