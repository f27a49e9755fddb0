"""A writer of cpio "newc" archives, the format Linux unpacks as its initramfs.

Each entry is a 110-byte ASCII header ("070701", then thirteen 8-digit hex fields: ino, mode,
uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize with its
NUL, check), the name and its NUL padded to a multiple of 4, then the data padded to 4. The
archive ends with an entry named "TRAILER!!!". Everything is owned by root with mtime 0, so
the same entries always make the same bytes.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    name: str            # without a leading "/"
    mode: int            # file type and permissions, as st_mode
    data: bytes = b""    # a file's bytes, or a symlink's target
    rdev: tuple[int, int] = (0, 0)


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def chardev(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, e: Entry, nlink: int, namesize: int) -> bytes:
    fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], namesize, 0)
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def newc(entries: list[Entry]) -> bytes:
    """The archive of ``entries`` in order (a directory must come before what it holds)."""
    out = bytearray()
    seen: set[str] = set()
    for ino, e in enumerate([*entries, Entry(TRAILER, 0)], start=1):
        name = e.name.lstrip("/")
        if not name or name in seen:
            raise ValueError(f"cpio entry name {e.name!r} is empty or repeated")
        seen.add(name)
        raw = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        head = _header(ino if e.name != TRAILER else 0, e, nlink if e.name != TRAILER else 1, len(raw))
        out += head + raw + _pad4(len(head) + len(raw))
        out += e.data + _pad4(len(e.data))
    return bytes(out)
