"""Replacing the RAM behind a running machine: a restore maps a snapshot's pages in, and RAM
restored from a file later moves into memory of its own. Both swaps run on the VM owner with
every vCPU paused and ``ram_lock`` held, so no vCPU and no other thread touches RAM meanwhile.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING

from xend_lite.errors import InvalidArgument
from xend_lite.machine.backing import PAGE_SIZE, Backing
from xend_lite.machine.memmap import RamRegion
from xend_lite.machine.native import written_runs

if TYPE_CHECKING:
    from xend_lite.machine.machine import Machine

COPY_CHUNK = 16 << 20


def replace_ram(m: Machine, backing: Backing, overlays: dict[str, tuple[int, Backing]] | None = None,
                ballooned: list[int] | None = None) -> None:
    """Back guest RAM with ``backing`` (same size; e.g. a snapshot's copy-on-write mapping),
    and with the given overlays and ballooned frames, in one change of the memory map. The old
    backing is closed. Given the RAM it has, only the overlays and ballooned frames change
    (KVM's slots only where they do)."""
    if backing.size != m.memory_bytes:
        raise InvalidArgument(f"RAM backing is {backing.size} bytes, the guest has {m.memory_bytes}")

    def swap() -> None:
        with m.paused(), m.ram_lock:
            _swap(m, backing, overlays, ballooned)
    m.owner.run(swap)


def _swap(m: Machine, backing: Backing, overlays=None, ballooned=None) -> None:
    mm = m.memmap
    old = m.ram
    if backing is old:
        mm.replace(overlays=overlays, ballooned=ballooned)
        return
    mm.forget_remaps()
    mm.replace(ram=[RamRegion(r.gpa, r.size, backing, r.offset) for r in mm.ram],
               overlays=overlays, ballooned=ballooned)
    m.ram = backing
    old.close()


def detach_ram(m: Machine, src_fd: int, src_offset: int, stop: threading.Event | None = None) -> bool:
    """Move RAM restored from a file (a private mapping of it) into a memfd of its own, so
    the VM no longer depends on the file: the file's data is copied while the guest runs
    (holes stay holes; on the calling thread), then, on the owner with the vCPUs paused, the
    pages written since the restore are copied from the mapping and the new memfd takes its
    place. Returns False when there was nothing to do or ``stop`` was set."""
    old = m.ram
    if not old.private:
        return False
    size = old.size
    new = Backing.anonymous("ram", size)
    stopped = (lambda: False) if stop is None else stop.is_set
    try:
        if not _copy_data(src_fd, src_offset, new, stopped):
            new.close()
            return False

        def swap() -> bool:
            with m.paused(), m.ram_lock:
                if m.ram is not old or stopped():
                    return False
                for first, count in written_runs(old.addr, size // PAGE_SIZE):
                    a, b = first * PAGE_SIZE, (first + count) * PAGE_SIZE
                    new.view[a:b] = old.view[a:b]
                _swap(m, new)
                return True
        if not m.owner.request(swap):   # ahead of queued commands: one may wait for this thread
            new.close()
            return False
        return True
    except BaseException:
        if m.ram is not new:
            new.close()
        raise


def _copy_data(src_fd: int, src_offset: int, new: Backing, stopped) -> bool:
    """Copy the file's data extents into ``new`` (one copy, straight into it); False if
    stopped on the way."""
    size = new.size
    pos = 0
    while pos < size:
        if stopped():
            return False
        try:
            start = os.lseek(src_fd, src_offset + pos, os.SEEK_DATA) - src_offset
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if start >= size:
            break
        end = min(size, os.lseek(src_fd, src_offset + start, os.SEEK_HOLE) - src_offset)
        off = start
        while off < end:
            if stopped():
                return False
            n = os.preadv(src_fd, [new.view[off:min(end, off + COPY_CHUNK)]], src_offset + off)
            if n <= 0:
                raise OSError(errno.EIO, "snapshot file ended early")
            off += n
        pos = end
    return True
