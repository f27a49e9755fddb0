"""Host memory that backs guest-physical pages, and the guest's physical address constants."""

from __future__ import annotations

import mmap
import os
import threading

from xend_lite.errors import InvalidArgument
from xend_lite.machine.native import buffer_address, punch_hole

PAGE_SIZE = 4096
PAGE_SHIFT = 12
INVALID_GPA = (1 << 64) - 1
# Low RAM ends here; RAM beyond it continues at 4 GiB (the hole holds the TSS and the
# identity-map page KVM needs, and is where a PC keeps its MMIO).
LOW_RAM_TOP = 0xC000_0000
HIGH_RAM_BASE = 0x1_0000_0000

_thread = threading.local()


def mark_ram_thread() -> None:
    """Called by each vCPU thread and by the VM owner: RAM is only ever replaced by the owner
    with every vCPU parked, so these threads' guest-memory accesses never race a swap and take
    no lock. Every other thread takes the machine's RAM lock around its accesses."""
    _thread.ram = True


def on_ram_thread() -> bool:
    return getattr(_thread, "ram", False)


class Backing:
    """Page-aligned host memory that can back guest-physical pages.

    ``anonymous`` memory is a memfd mapped MAP_SHARED (so untouched pages stay holes and a
    snapshot can find the data cheaply); ``from_file`` maps a file MAP_PRIVATE, so a restored
    guest never writes into its snapshot.
    """

    def __init__(self, name: str, fd: int, size: int, offset: int = 0, private: bool = False,
                 owns_fd: bool = True):
        if size <= 0 or size % PAGE_SIZE or offset % mmap.PAGESIZE:
            raise InvalidArgument(f"backing {name}: size and offset must be page multiples")
        self.name = name
        self.fd = fd
        self.size = size
        self.offset = offset
        self.private = private
        self._owns_fd = owns_fd
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        self.map = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self.view = memoryview(self.map)
        self.addr = buffer_address(self.map)

    @classmethod
    def anonymous(cls, name: str, size: int) -> Backing:
        fd = os.memfd_create(f"xend-lite:{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(name, fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_file(cls, name: str, fd: int, offset: int, size: int) -> Backing:
        return cls(name, fd, size, offset=offset, private=True, owns_fd=False)

    def zero(self, offset: int = 0, length: int | None = None) -> None:
        """Zero a range; for memfd backings the pages are released (they read back as zero)."""
        length = self.size - offset if length is None else length
        if not self.private:
            try:
                punch_hole(self.fd, self.offset + offset, length)
                return
            except OSError:
                pass
        self.view[offset:offset + length] = bytes(length)

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
            self.map.close()
            if self._owns_fd:
                os.close(self.fd)
