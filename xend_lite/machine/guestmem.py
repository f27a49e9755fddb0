"""Bounds-checked access to guest-physical memory, as the guest sees it (overlays and holes)."""

from __future__ import annotations

import threading

from xend_lite.errors import GuestMemoryError
from xend_lite.machine.backing import on_ram_thread
from xend_lite.machine.memmap import MemoryMap


class GuestMemory:
    """Bounds-checked access to guest-physical memory, honouring overlays and holes.

    Every guest address and length is checked: an access that touches an unbacked byte,
    wraps, or is absurdly long raises GuestMemoryError and changes nothing.
    """

    MAX_ACCESS = 1 << 30

    def __init__(self, memmap: MemoryMap, lock: threading.RLock | None = None):
        self.map = memmap
        # the machine's RAM lock, taken by threads other than the vCPUs and the owner
        self._lock = lock if lock is not None else threading.RLock()

    def _pieces(self, gpa: int, length: int):
        if not isinstance(gpa, int) or not isinstance(length, int):
            raise GuestMemoryError("address and length must be integers", 0, 0)
        if gpa < 0 or length < 0 or length > self.MAX_ACCESS or gpa + length > (1 << 64):
            raise GuestMemoryError(f"bad guest access {gpa:#x}+{length:#x}", gpa, length)
        pieces = []
        pos, end = gpa, gpa + length
        while pos < end:
            seg = self.map.find(pos)
            if seg is None:
                raise GuestMemoryError(f"guest-physical {pos:#x} is not backed", gpa, length)
            n = min(end, seg.end) - pos
            off = seg.offset + pos - seg.gpa
            pieces.append((seg.backing, off, n))
            pos += n
        return pieces

    def read(self, gpa: int, length: int) -> bytes:
        if not on_ram_thread():
            with self._lock:
                return self._read(gpa, length)
        return self._read(gpa, length)

    def _read(self, gpa: int, length: int) -> bytes:
        fast = isinstance(gpa, int) and isinstance(length, int) and 0 < length <= self.MAX_ACCESS
        seg = self.map.find(gpa) if fast else None
        if seg is not None and gpa + length <= seg.end:
            off = seg.offset + gpa - seg.gpa
            return seg.backing.map[off:off + length]
        out = bytearray()
        for backing, off, n in self._pieces(gpa, length):
            out += backing.view[off:off + n]
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        if not on_ram_thread():
            with self._lock:
                return self._write(gpa, data)
        return self._write(gpa, data)

    def _write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        pieces = self._pieces(gpa, length)  # all checked before anything is written
        pos = 0
        for backing, off, n in pieces:
            backing.view[off:off + n] = data[pos:pos + n]
            pos += n

    def read_u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 2), "little")

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u8(self, gpa: int, v: int) -> None:
        self.write(gpa, (v & 0xFF).to_bytes(1, "little"))

    def write_u16(self, gpa: int, v: int) -> None:
        self.write(gpa, (v & 0xFFFF).to_bytes(2, "little"))

    def write_u32(self, gpa: int, v: int) -> None:
        self.write(gpa, (v & 0xFFFFFFFF).to_bytes(4, "little"))

    def write_u64(self, gpa: int, v: int) -> None:
        self.write(gpa, (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def is_backed(self, gpa: int, length: int = 1) -> bool:
        try:
            self._pieces(gpa, length)
        except GuestMemoryError:
            return False
        return True
