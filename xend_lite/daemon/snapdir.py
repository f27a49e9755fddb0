"""The snapshot directory: where every snapshot a client or the configuration names lives.

A client gives a name (``vm1.xls``, ``nightly/vm1.xls``), never a host path: absolute paths,
``.`` and ``..`` are refused as strings (InvalidArgument, before any file-system call, so a
refusal tells nothing about what exists outside), and the name becomes a ConfinedPath that the
snapshot writer and reader resolve beneath this directory at the moment of use (openat2 with
RESOLVE_BENEATH): a symlink out of it is refused too. The checks made here, before the VM is
paused, give the early, clear error; the writer and reader enforce the same rules where the
file is really opened.

The directory is created 0700 at the first save; the temporary files of saves that were
killed are removed at start. ``--restore FILE`` is the operator's own path and does not come
through here.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from xend_lite.errors import InvalidArgument, NotFound, SnapshotError
from xend_lite.snapshot.confine import ConfinedPath, check_name, open_parent, open_snapshot_file

log = logging.getLogger("xend_lite.snapshots")

__all__ = ["SnapshotDir", "check_config_name"]


def check_config_name(value: str) -> str:
    """A snapshot name from the configuration (save_on_stop): ValueError when it is not
    one, for the config's own error that names the key."""
    try:
        return check_name(value)
    except InvalidArgument as exc:
        raise ValueError(str(exc)) from None


class SnapshotDir:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def name(self, name: str) -> ConfinedPath:
        """The ConfinedPath for a client's name; InvalidArgument if it is not a name."""
        if isinstance(name, ConfinedPath) and name.root == self.path:
            return name
        return ConfinedPath(self.path, name)

    def ensure(self) -> None:
        """Create the directory (0700; missing parents too) if it does not exist."""
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SnapshotError(f"cannot create the snapshot directory {self.path}: "
                                f"{exc.strerror} (choose another with --snapshot-dir)") from None

    def for_save(self, name: str) -> ConfinedPath:
        """The target of a save, checked now: a name, beneath the directory, in a directory
        that exists, and replacing nothing but a snapshot."""
        from xend_lite.snapshot.target import check_target

        path = self.name(name)
        self.ensure()
        check_target(path)
        return path

    def for_load(self, name: str) -> ConfinedPath:
        """A snapshot to read: a name beneath the directory that exists (NotFound)."""
        path = self.name(name)
        try:
            os.close(open_snapshot_file(path, os.O_PATH))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"snapshot {path.name} does not exist in the snapshot directory "
                           f"{self.path}") from None
        except OSError as exc:
            raise SnapshotError(f"cannot open snapshot {path}: {exc.strerror}") from None
        return path

    def exists(self, path: ConfinedPath) -> bool:
        """Whether the name is there (a name leading out of the directory is not)."""
        try:
            os.close(open_snapshot_file(path, os.O_PATH))
        except (FileNotFoundError, NotADirectoryError, InvalidArgument):
            return False
        return True

    def remove(self, path: ConfinedPath) -> None:
        """Unlink the snapshot (a missing one is fine)."""
        dir_fd, base = open_parent(path)
        try:
            os.unlink(base, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(dir_fd)

    def move_aside(self, path: ConfinedPath, suffix: str) -> ConfinedPath:
        """Rename the snapshot to NAME+suffix beside it; return the new path."""
        dir_fd, base = open_parent(path)
        try:
            os.rename(base, base + suffix, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        return self.name(path.name + suffix)

    def prepare(self) -> int:
        """At start: warn if others may write to the directory, and remove the temporary
        files that killed saves left anywhere under it (symlinks are not followed).
        Returns how many were removed."""
        if not os.path.isdir(self.path):
            return 0
        self._warn_if_shared()
        from xend_lite.snapshot.temps import remove_stale_temps

        removed = 0
        try:
            for top, _dirs, _files, dir_fd in os.fwalk(self.path, follow_symlinks=False):
                for name in remove_stale_temps(dir_fd):
                    log.info("removed %s, left by a save that did not finish",
                             os.path.join(top, name))
                    removed += 1
        except OSError as exc:
            log.warning("could not look for unfinished saves in %s: %s", self.path,
                        os.strerror(exc.errno or errno.EIO))
        return removed

    def _warn_if_shared(self) -> None:
        """Others who may write to the directory can replace or plant snapshots in it
        (though not lead a save or a load out of it): say so."""
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning("the snapshot directory %s is writable by other users: they can replace "
                        "or plant snapshots there (chmod 700 it)", self.path)
