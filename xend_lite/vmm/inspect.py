"""Looking inside a running guest: its registers and its memory, guest-physical (as the
guest sees it, overlays included) or guest-virtual (through a vCPU's own page tables).

Registers are read on the VM owner with the vCPUs briefly held out of the guest (KVM reads
a vCPU's registers only while it does not run); guest-physical reads need no pause. A dump to
a file goes to a new file in the snapshot directory, never over an existing one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from xend_lite.errors import InvalidArgument, NotFound
from xend_lite.snapshot.confine import open_snapshot_file
from xend_lite.vmm.pagewalk import PAGE, Paging, translate

if TYPE_CHECKING:
    from xend_lite.machine.machine import Machine

MAX_INLINE = 4096            # an inline read returns at most this many bytes
MAX_DUMP = 1 << 40           # a dump is bounded by guest memory, and by this
CHUNK = 1 << 20

SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


def _runner(machine: Machine, index: int):
    if not isinstance(index, int) or not 0 <= index < len(machine.runners):
        raise NotFound(f"no vCPU {index} (this VM has {len(machine.runners)})")
    r = machine.runners[index]
    if r.vcpu.fd < 0:
        raise NotFound(f"vCPU {index} is closed")
    return r


def _held(machine: Machine, fn: Callable[[], object]) -> object:
    """Run ``fn`` on the owner with every vCPU out of the guest."""
    def work() -> object:
        with machine.paused():
            return fn()
    return machine.owner.run(work)


def _read_state(machine: Machine, index: int):
    vcpu = _runner(machine, index).vcpu
    vcpu.flush_dirty_regs()
    return vcpu.get_regs(), vcpu.get_sregs()


def registers(machine: Machine) -> list[dict]:
    """General, segment, descriptor-table and control registers of every vCPU."""
    def read() -> list[dict]:
        out = []
        for i in range(len(machine.runners)):
            regs, s = _read_state(machine, i)
            d: dict = {"general": regs.as_dict()}
            d["segments"] = {n: getattr(s, n).as_dict() for n in SEGMENTS}
            d["tables"] = {"gdt": s.gdt.as_dict(), "idt": s.idt.as_dict()}
            d["control"] = {n: getattr(s, n) for n in CONTROL}
            out.append(d)
        return out
    return _held(machine, read)  # type: ignore[return-value]


def paging_of(machine: Machine, index: int) -> Paging:
    def read() -> Paging:
        _regs, s = _read_state(machine, index)
        return Paging(s.cr0, s.cr3, s.cr4, s.efer)
    return _held(machine, read)  # type: ignore[return-value]


def check_size(size: int, limit: int) -> None:
    if not isinstance(size, int) or not 0 < size <= limit:
        raise InvalidArgument(f"size must be in 1..{limit}")


def read_physical(machine: Machine, gpa: int, size: int) -> bytes:
    check_size(size, MAX_INLINE)
    return machine.mem.read(gpa, size)


def write_physical(machine: Machine, gpa: int, data: bytes) -> None:
    check_size(len(data), MAX_INLINE)
    machine.mem.write(gpa, data)


def read_virtual(machine: Machine, index: int, gva: int, size: int, limit: int = MAX_INLINE) -> bytes:
    """``size`` bytes at ``gva`` in vCPU ``index``'s paging, page by page."""
    check_size(size, limit)
    paging = paging_of(machine, index)
    out = bytearray()
    for pos, n in _pages(gva, size):
        out += machine.mem.read(translate(machine.mem, paging, pos), n)
    return bytes(out)


def _pages(start: int, size: int):
    pos, end = start, start + size
    while pos < end:
        n = min(end, (pos & ~(PAGE - 1)) + PAGE) - pos
        yield pos, n
        pos += n


def dump(machine: Machine, path: str, addr: int, size: int, cpu: int | None) -> dict:
    """Write ``size`` bytes from ``addr`` (guest-physical when ``cpu`` is None, else
    guest-virtual in that vCPU) to a new file at ``path`` (a ConfinedPath)."""
    check_size(size, MAX_DUMP)
    if cpu is None:
        ranges = [(addr, size)]
        if addr + size > 1 << 64:
            raise InvalidArgument("the range runs past the end of the address space")
    else:
        paging = paging_of(machine, cpu)
        ranges = [(translate(machine.mem, paging, p), n) for p, n in _pages(addr, size)]
    try:
        fd = open_snapshot_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidArgument(f"{path.name if hasattr(path, 'name') else path} exists: "
                              "a dump never replaces a file") from None
    ok = False
    try:
        for gpa, n in ranges:
            for off in range(0, n, CHUNK):
                data = machine.mem.read(gpa + off, min(CHUNK, n - off))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
        ok = True
    finally:
        os.close(fd)
        if not ok:
            _unlink(path)
    return {"filename": getattr(path, "name", str(path)), "size": size}


def _unlink(path: str) -> None:
    from xend_lite.snapshot.confine import open_parent

    try:
        dir_fd, base = open_parent(path)
    except (OSError, InvalidArgument):
        return
    try:
        os.unlink(base, dir_fd=dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
