"""The temporary files of saves: their names (``.NAME.PID.RAND.tmp``, made by target.py) and
removing those whose writer died. Apart from the writer so that a daemon can clear them at
start without loading the file format and the save path."""

from __future__ import annotations

import fcntl
import os

TMP_SUFFIX = ".tmp"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tmp_prefix(base: str) -> str:
    return f".{base}."


def parse_tmp(name: str) -> tuple[str, int] | None:
    """(the snapshot's name, the writer's pid) of a temporary file's name, else None."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    parts = name[1:-len(TMP_SUFFIX)].rsplit(".", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or len(parts[2]) != 8:
        return None
    return parts[0], int(parts[1])


def remove_stale_temps(dir_fd: int, base: str | None = None) -> list[str]:
    """Remove the temporary files of dead writers in the directory ``dir_fd`` (those for
    ``base`` only, or every snapshot's); return the names removed. A file is stale when its
    writer's pid is gone and nobody holds its lock."""
    removed: list[str] = []
    try:
        names = os.listdir(dir_fd)
    except OSError:
        return removed
    for name in names:
        parsed = parse_tmp(name)
        if parsed is None or (base is not None and parsed[0] != base):
            continue
        pid = parsed[1]
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st, now = os.fstat(fd), os.lstat(name, dir_fd=dir_fd)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(name, dir_fd=dir_fd)
                removed.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
