"""Boot loader: ELF32/ELF64 images (PVH entry note honoured), bzImages (opened to their ELF
vmlinux by ``kernel``), flat binaries, and an initrd beside them.

Every image starts as the PVH boot ABI says: flat 32-bit protected mode, paging off,
CS/DS/ES/SS 4 GiB flat, EIP at the entry and, for a PVH entry, EBX pointing at an
hvm_start_info that describes the command line, the memory map and the modules (the initrd:
Linux takes the first module as its initramfs).
"""

from __future__ import annotations

import struct

from xend_lite.errors import LoaderError
from xend_lite.kvm import Regs, Segment, Sregs
from xend_lite.machine.kernel import unpack_kernel
from xend_lite.machine.machine import BootCpu, Machine
from xend_lite.machine.backing import PAGE_SIZE
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

PT_LOAD, PT_NOTE = 1, 4
EM_386, EM_X86_64 = 3, 62
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
E820_RAM, E820_RESERVED = 1, 2

START_INFO_GPA = 0x1000
MODLIST_GPA = 0x1040       # in the start_info page, after the 56-byte struct
CMDLINE_GPA = 0x2000
MEMMAP_GPA = 0x3000
LOW_RESERVED_END = 0x4000  # images may not load below here: the boot structures live there
MAX_CMDLINE = PAGE_SIZE - 1
INITRD_LIMIT = 1 << 32     # Linux's PVH entry reads the module's address into 32 bits

# struct hvm_start_info (version 1) and struct hvm_memmap_table_entry, from
# xen/arch-x86/hvm/start_info.h; a test compiles the header and checks these.
START_INFO = struct.Struct("<IIIIQQQQII")
MEMMAP_ENTRY = struct.Struct("<QQII")
MODLIST_ENTRY = struct.Struct("<QQQQ")   # struct hvm_modlist_entry: paddr, size, cmdline_paddr


# Frozen records (record.py), not named tuples: each named tuple class took 0.1-0.2 ms to
# make when this module was imported, at every start.

class LoadSegment(Frozen):
    __slots__ = ("gpa", "filesz", "memsz")
    gpa: int
    filesz: int
    memsz: int

    def __init__(self, gpa: int, filesz: int, memsz: int):
        _set(self, "gpa", gpa)
        _set(self, "filesz", filesz)
        _set(self, "memsz", memsz)


class BootInfo(Frozen):
    __slots__ = ("entry", "pvh", "start_info", "elf_class", "segments", "initrd")
    entry: int
    pvh: bool
    start_info: int | None
    elf_class: int | None  # 32, 64 or None for a flat binary
    segments: tuple[LoadSegment, ...]
    initrd: LoadSegment | None

    def __init__(self, entry: int, pvh: bool, start_info: int | None, elf_class: int | None,
                 segments: tuple[LoadSegment, ...] = (), initrd: LoadSegment | None = None):
        _set(self, "entry", entry)
        _set(self, "pvh", pvh)
        _set(self, "start_info", start_info)
        _set(self, "elf_class", elf_class)
        _set(self, "segments", segments)
        _set(self, "initrd", initrd)

    @property
    def image_end(self) -> int:
        return max((s.gpa + s.memsz for s in self.segments), default=0)


def _err(msg: str) -> LoaderError:
    return LoaderError(f"guest image: {msg}")


class _Phdr(Frozen):
    __slots__ = ("type", "offset", "paddr", "filesz", "memsz", "vaddr", "flags")
    type: int
    offset: int
    paddr: int
    filesz: int
    memsz: int
    vaddr: int
    flags: int   # PF_X 1, PF_W 2, PF_R 4

    def __init__(self, type: int, offset: int, paddr: int, filesz: int, memsz: int,  # noqa: A002
                 vaddr: int = 0, flags: int = 0):
        _set(self, "type", type)
        _set(self, "offset", offset)
        _set(self, "paddr", paddr)
        _set(self, "filesz", filesz)
        _set(self, "memsz", memsz)
        _set(self, "vaddr", vaddr)
        _set(self, "flags", flags)


def parse_elf(image: bytes) -> tuple[int, int, list[_Phdr]]:
    """Validate an x86 ELF executable; returns (class bits, e_entry, program headers)."""
    if len(image) < 52 or image[:4] != b"\x7fELF":
        raise _err("not an ELF file (bad magic)")
    ei_class, ei_data = image[4], image[5]
    if ei_data != 1:
        raise _err("not a little-endian ELF")
    if ei_class == 1:
        if len(image) < 52:
            raise _err("truncated ELF header")
        (e_type, e_machine, _v, e_entry, e_phoff, _sh, _fl, _eh, e_phentsize, e_phnum) = \
            struct.unpack_from("<HHIIIIIHHH", image, 16)
        want_machine, ph_fmt = EM_386, "<IIIIIIII"
    elif ei_class == 2:
        if len(image) < 64:
            raise _err("truncated ELF header")
        (e_type, e_machine, _v, e_entry, e_phoff, _sh, _fl, _eh, e_phentsize, e_phnum) = \
            struct.unpack_from("<HHIQQQIHHH", image, 16)
        want_machine, ph_fmt = EM_X86_64, "<IIQQQQQQ"
    else:
        raise _err(f"unknown ELF class {ei_class}")
    if e_machine not in (EM_386, EM_X86_64):
        raise _err(f"not an x86 image (e_machine {e_machine})")
    if e_type != 2:
        raise _err(f"not an executable (e_type {e_type})")
    if e_phentsize != struct.calcsize(ph_fmt) or e_phnum == 0 or e_phnum > 256:
        raise _err("bad program header table")
    if e_phoff + e_phnum * e_phentsize > len(image):
        raise _err("program header table runs past the end of the file")
    del want_machine
    phdrs = []
    for i in range(e_phnum):
        f = struct.unpack_from(ph_fmt, image, e_phoff + i * e_phentsize)
        if ei_class == 1:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags = f[:7]
        else:
            p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = f[:7]
        if p_type in (PT_LOAD, PT_NOTE):
            if p_offset + p_filesz > len(image):
                raise _err(f"segment {i} runs past the end of the file")
            if p_filesz > p_memsz and p_type == PT_LOAD:
                raise _err(f"segment {i} has filesz > memsz")
        phdrs.append(_Phdr(p_type, p_offset, p_paddr, p_filesz, p_memsz, p_vaddr, p_flags))
    return ei_class * 32, e_entry, phdrs


def find_pvh_entry(image: bytes, phdrs: list[_Phdr]) -> int | None:
    for ph in phdrs:
        if ph.type != PT_NOTE:
            continue
        pos, end = ph.offset, ph.offset + ph.filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", image, pos)
            name_off = pos + 12
            desc_off = name_off + ((namesz + 3) & ~3)
            nxt = desc_off + ((descsz + 3) & ~3)
            if nxt > end or namesz > 256 or descsz > 4096:
                raise _err("malformed ELF note")
            name = image[name_off:name_off + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                if descsz not in (4, 8):
                    raise _err("PVH entry note has a bad size")
                return int.from_bytes(image[desc_off:desc_off + 4], "little")
            pos = nxt
    return None


def load_elf(machine: Machine, image: bytes, cmdline: str = "", initrd: bytes | None = None) -> BootInfo:
    bits, e_entry, phdrs = parse_elf(image)
    pvh_entry = find_pvh_entry(image, phdrs)
    loads = [p for p in phdrs if p.type == PT_LOAD and p.memsz]
    if not loads:
        raise _err("no loadable segments")
    for p in loads:
        if p.paddr < LOW_RESERVED_END or p.paddr + p.memsz > machine.memory_bytes \
                or not machine.mem.is_backed(p.paddr, p.memsz):
            raise _err(f"segment at {p.paddr:#x}+{p.memsz:#x} does not fit in guest RAM "
                       f"({LOW_RESERVED_END:#x}..{machine.memory_bytes:#x})")
        for g, n, name in machine.memmap.reserved:
            if p.paddr < g + n and g < p.paddr + p.memsz:
                raise _err(f"segment at {p.paddr:#x}+{p.memsz:#x} covers the {name} page at "
                           f"{g:#x}")
    entry = pvh_entry if pvh_entry is not None else e_entry
    if entry >= 1 << 32:
        raise _err(f"entry point {entry:#x} is not reachable from 32-bit protected mode")
    if initrd is not None and pvh_entry is None:
        raise _err("an initrd needs a PVH entry (the image has no PVH note to hand it over)")
    segs = tuple(LoadSegment(p.paddr, p.filesz, p.memsz) for p in loads)
    module = place_initrd(machine, len(initrd), _end(segs)) if initrd is not None else None
    for p in loads:
        machine.mem.write(p.paddr, image[p.offset:p.offset + p.filesz])
        if p.memsz > p.filesz:
            machine.mem.write(p.paddr + p.filesz, bytes(p.memsz - p.filesz))
    start_info = None
    if pvh_entry is not None:
        start_info = write_start_info(machine, cmdline, _write_initrd(machine, module, initrd))
    return BootInfo(entry, pvh_entry is not None, start_info, bits, segs, module)


def load_flat(machine: Machine, image: bytes, gpa: int, cmdline: str = "",
              initrd: bytes | None = None) -> BootInfo:
    if not image:
        raise _err("empty image")
    if gpa < LOW_RESERVED_END or not machine.mem.is_backed(gpa, len(image)):
        raise _err(f"flat image at {gpa:#x}+{len(image):#x} does not fit in guest RAM")
    segs = (LoadSegment(gpa, len(image), len(image)),)
    module = place_initrd(machine, len(initrd), _end(segs)) if initrd is not None else None
    machine.mem.write(gpa, image)
    start_info = write_start_info(machine, cmdline, _write_initrd(machine, module, initrd))
    return BootInfo(gpa, True, start_info, None, segs, module)


def _end(segs: tuple[LoadSegment, ...]) -> int:
    return max(s.gpa + s.memsz for s in segs)


def place_initrd(machine: Machine, size: int, after: int) -> LoadSegment:
    """Where an initrd of ``size`` bytes goes: the lowest page-aligned address at or above
    ``after`` (the image's end) inside one RAM entry of the e820 map (so never over a
    reserved page) and below 4 GiB."""
    if size == 0:
        raise _err("the initrd is empty")
    start = max(after, LOW_RESERVED_END)
    for addr, length, kind in e820_map(machine):
        if kind != E820_RAM:
            continue
        gpa = _page_up(max(start, addr))
        end = gpa + size
        if end <= addr + length and end <= INITRD_LIMIT and machine.mem.is_backed(gpa, size):
            return LoadSegment(gpa, size, size)
    raise _err(f"the initrd ({size} bytes) does not fit in guest RAM below 4 GiB after the "
               f"image (which ends at {after:#x}): give the guest more memory")


def _page_up(gpa: int) -> int:
    return (gpa + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def _write_initrd(machine: Machine, module: LoadSegment | None,
                  data: bytes | None) -> tuple[LoadSegment, ...]:
    if module is None or data is None:
        return ()
    machine.mem.write(module.gpa, data)
    return (module,)


def e820_map(machine: Machine) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: RAM regions with reserved ranges cut out and listed."""
    reserved = sorted((g, n) for g, n, _ in machine.memmap.reserved)
    out: list[tuple[int, int, int]] = []
    for r in machine.memmap.ram:
        pos = r.gpa
        for g, n in reserved:
            if g >= r.end or g + n <= pos:
                continue
            if g > pos:
                out.append((pos, g - pos, E820_RAM))
            pos = max(pos, g + n)
        if pos < r.end:
            out.append((pos, r.end - pos, E820_RAM))
    out += [(g, n, E820_RESERVED) for g, n in reserved]
    return sorted(out)


def write_start_info(machine: Machine, cmdline: str, modules: tuple[LoadSegment, ...] = ()) -> int:
    raw = cmdline.encode()
    if len(raw) > MAX_CMDLINE or b"\0" in raw:
        raise _err(f"command line longer than {MAX_CMDLINE} bytes or containing NUL")
    if MODLIST_GPA + len(modules) * MODLIST_ENTRY.size > START_INFO_GPA + PAGE_SIZE:
        raise _err("too many modules")
    mem = machine.mem
    mem.write(CMDLINE_GPA, raw + b"\0")
    entries = e820_map(machine)
    if len(entries) * MEMMAP_ENTRY.size > PAGE_SIZE:
        raise _err("memory map too large")
    mem.write(MEMMAP_GPA, b"".join(MEMMAP_ENTRY.pack(a, s, t, 0) for a, s, t in entries))
    mem.write(MODLIST_GPA, b"".join(MODLIST_ENTRY.pack(m.gpa, m.filesz, 0, 0) for m in modules))
    mem.write(START_INFO_GPA, START_INFO.pack(HVM_START_MAGIC, 1, 0, len(modules),
                                              MODLIST_GPA if modules else 0, CMDLINE_GPA,
                                              machine.acpi_rsdp, MEMMAP_GPA, len(entries), 0))
    return START_INFO_GPA


def flat32_sregs(base: Sregs | None = None) -> Sregs:
    """Flat 32-bit protected mode with paging off (the PVH boot state)."""
    s = base or Sregs()
    code = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=0xB, present=1, dpl=0, db=1, s=1, g=1)
    data = Segment(base=0, limit=0xFFFFFFFF, selector=0x18, type=0x3, present=1, dpl=0, db=1, s=1, g=1)
    s.cs = code
    s.ds, s.es, s.fs, s.gs, s.ss = (Segment(**{f: getattr(data, f) for f in data.__slots__})
                                    for _ in range(5))
    s.tr = Segment(base=0, limit=0x67, selector=0x20, type=0xB, present=1, s=0)
    s.ldt = Segment(base=0, limit=0xFFFF, selector=0, type=0x2, present=1, s=0)
    s.cr0 = 0x11  # PE | ET
    s.cr3 = 0
    s.cr4 = 0
    s.efer = 0
    return s


def boot_cpu(machine: Machine, info: BootInfo, index: int = 0) -> BootCpu:
    sregs = flat32_sregs(machine.runners[index].vcpu.get_sregs())
    regs = Regs(rip=info.entry, rflags=0x2, rbx=info.start_info or 0)
    return BootCpu(regs, sregs)


def load_image(machine: Machine, image: bytes, cmdline: str = "", flat_gpa: int | None = None,
               initrd: bytes | None = None) -> BootInfo:
    """Load an ELF or a bzImage (or, with ``flat_gpa``, a flat binary), and ``initrd`` after
    it as the first PVH module, and set vCPU 0 to start it."""
    if flat_gpa is not None:
        info = load_flat(machine, image, flat_gpa, cmdline, initrd)
    else:
        info = load_elf(machine, unpack_kernel(image).elf, cmdline, initrd)
    machine.set_boot_cpu(0, boot_cpu(machine, info))
    return info
