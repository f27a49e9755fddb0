"""Where a save lands: temporary files beside the target, what a save may replace, and
freeing the file a save replaced.

A save writes ``.NAME.PID.RAND.tmp`` in the target's directory (locked with flock while it
is written) and renames it over the target. A temporary file whose writer died is stale and
removed by the next save to the same name, or by ``remove_stale_temps`` (temps.py, which a
daemon runs at start). Only a snapshot, or nothing, is ever replaced. The replaced file is
first kept under a temporary name and unlinked on a background thread, so a save does not
wait for the file system to free a large file.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import threading
import time

from xend_lite.errors import NotFound
from xend_lite.snapshot import fileformat as ff
from xend_lite.snapshot.confine import open_parent
from xend_lite.snapshot.errors import SnapshotWriteError, TargetRefused
from xend_lite.snapshot.temps import TMP_SUFFIX, remove_stale_temps, tmp_prefix

__all__ = ["check_target", "cleanup_stale_temps", "remove_stale_temps", "wait_reclaimed"]


def _tmp_name(base: str) -> str:
    return f"{tmp_prefix(base)}{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def cleanup_stale_temps(path: str) -> list[str]:
    """Remove temporary files of dead writers for ``path``; return the names removed."""
    try:
        dir_fd, base = open_parent(path)
    except OSError:
        return []
    try:
        return remove_stale_temps(dir_fd, base)
    finally:
        os.close(dir_fd)


def _check_replaceable(dir_fd: int, base: str, shown: str) -> None:
    """Refuse to replace anything but a snapshot (or nothing): a save is no way to overwrite
    another file, a directory, a device or a symlink."""
    try:
        fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise TargetRefused(f"{shown} is a symbolic link: a save does not replace it "
                                "(choose another name)", err.errno) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TargetRefused(f"{shown} exists and is not a regular file: a save does not "
                                "replace it (choose another name)", errno.EEXIST)
        if os.pread(fd, len(ff.MAGIC), 0) != ff.MAGIC:
            raise TargetRefused(f"{shown} exists and is not a snapshot: a save does not "
                                "replace it (remove it, or choose another name)", errno.EEXIST)
    finally:
        os.close(fd)


def check_target(path: str | os.PathLike[str]) -> None:
    """What a save to ``path`` would refuse before writing anything, checked now: a name
    leading out of its directory (InvalidArgument), a missing directory (NotFound), a file
    there that is not a snapshot (TargetRefused)."""
    path = os.fspath(path)
    try:
        dir_fd, base = open_parent(path)
    except FileNotFoundError:
        raise NotFound(f"the directory of snapshot {path} does not exist") from None
    except OSError as err:
        raise SnapshotWriteError(f"cannot save to {path}: {os.strerror(err.errno)}",
                                 err.errno) from None
    try:
        _check_replaceable(dir_fd, base, path)
    except TargetRefused:
        raise
    except OSError as err:
        raise SnapshotWriteError(f"cannot save to {path}: {os.strerror(err.errno)}",
                                 err.errno) from None
    finally:
        os.close(dir_fd)


def _keep_old(dir_fd: int, base: str) -> str | None:
    old = _tmp_name(base)
    try:
        os.link(base, old, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None          # nothing there yet, or links are not possible: rename frees it
    return old


_reclaims: set[threading.Thread] = set()
_reclaims_lock = threading.Lock()


def _reclaim(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
        with _reclaims_lock:
            _reclaims.discard(threading.current_thread())


def _start_reclaim(dir_fd: int, name: str) -> None:
    t = threading.Thread(target=_reclaim, args=(os.dup(dir_fd), name), name="snapshot-reclaim",
                         daemon=True)
    with _reclaims_lock:
        _reclaims.add(t)
    t.start()


def wait_reclaimed(timeout: float | None = None) -> bool:
    """Wait until the files replaced by this process's saves are freed; True when none is
    left. A process that exits first leaves them under temporary names, which the next save
    to the same path removes: call this before exiting to leave a clean directory."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _reclaims_lock:
            pending = list(_reclaims)
        if not pending:
            return True
        for t in pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(left)
            if t.is_alive():
                return False
