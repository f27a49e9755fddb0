"""Register sets as plain Python values: what KVM_GET_REGS / KVM_GET_SREGS return, and what the
synced copy in kvm_run holds. ``*_from_c`` / ``*_to_c`` are the only places these meet cffi."""

from __future__ import annotations

from xend_lite.record import Frozen, Record
from xend_lite.record import set_field as _set

# Records (xend_lite/record.py), not dataclasses: every daemon start imports these.


class Regs(Record):
    __slots__ = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                 "r11", "r12", "r13", "r14", "r15", "rip", "rflags")

    def __init__(self, rax: int = 0, rbx: int = 0, rcx: int = 0, rdx: int = 0, rsi: int = 0,
                 rdi: int = 0, rsp: int = 0, rbp: int = 0, r8: int = 0, r9: int = 0,
                 r10: int = 0, r11: int = 0, r12: int = 0, r13: int = 0, r14: int = 0,
                 r15: int = 0, rip: int = 0, rflags: int = 2):
        self.rax = rax
        self.rbx = rbx
        self.rcx = rcx
        self.rdx = rdx
        self.rsi = rsi
        self.rdi = rdi
        self.rsp = rsp
        self.rbp = rbp
        self.r8 = r8
        self.r9 = r9
        self.r10 = r10
        self.r11 = r11
        self.r12 = r12
        self.r13 = r13
        self.r14 = r14
        self.r15 = r15
        self.rip = rip
        self.rflags = rflags


REG_NAMES = Regs.__slots__


def regs_from_c(c) -> Regs:
    return Regs(*(getattr(c, n) for n in REG_NAMES))


def regs_to_c(regs: Regs, c) -> None:
    for n in REG_NAMES:
        setattr(c, n, getattr(regs, n) & 0xFFFFFFFFFFFFFFFF)


class Segment(Record):
    __slots__ = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
                 "avl", "unusable")

    # the kernel's field names, "type" and "l" among them
    def __init__(self, base: int = 0, limit: int = 0xFFFF, selector: int = 0,
                 type: int = 0, present: int = 1, dpl: int = 0, db: int = 0,  # noqa: A002
                 s: int = 1, l: int = 0, g: int = 0, avl: int = 0, unusable: int = 0):  # noqa: E741
        self.base = base
        self.limit = limit
        self.selector = selector
        self.type = type
        self.present = present
        self.dpl = dpl
        self.db = db
        self.s = s
        self.l = l  # noqa: E741
        self.g = g
        self.avl = avl
        self.unusable = unusable


SEG_FIELDS = Segment.__slots__
SEG_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class Dtable(Record):
    __slots__ = ("base", "limit")

    def __init__(self, base: int = 0, limit: int = 0):
        self.base = base
        self.limit = limit


class Sregs(Record):
    __slots__ = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt", "gdt", "idt", "cr0", "cr2",
                 "cr3", "cr4", "cr8", "efer", "apic_base", "interrupt_bitmap")

    def __init__(self, cs: Segment | None = None, ds: Segment | None = None,
                 es: Segment | None = None, fs: Segment | None = None, gs: Segment | None = None,
                 ss: Segment | None = None, tr: Segment | None = None, ldt: Segment | None = None,
                 gdt: Dtable | None = None, idt: Dtable | None = None, cr0: int = 0,
                 cr2: int = 0, cr3: int = 0, cr4: int = 0, cr8: int = 0, efer: int = 0,
                 apic_base: int = 0, interrupt_bitmap: tuple[int, ...] = (0, 0, 0, 0)):
        # a segment or table not given is a fresh default one, as each Sregs has its own
        self.cs = Segment() if cs is None else cs
        self.ds = Segment() if ds is None else ds
        self.es = Segment() if es is None else es
        self.fs = Segment() if fs is None else fs
        self.gs = Segment() if gs is None else gs
        self.ss = Segment() if ss is None else ss
        self.tr = Segment() if tr is None else tr
        self.ldt = Segment() if ldt is None else ldt
        self.gdt = Dtable() if gdt is None else gdt
        self.idt = Dtable() if idt is None else idt
        self.cr0 = cr0
        self.cr2 = cr2
        self.cr3 = cr3
        self.cr4 = cr4
        self.cr8 = cr8
        self.efer = efer
        self.apic_base = apic_base
        self.interrupt_bitmap = interrupt_bitmap


def sregs_from_c(c) -> Sregs:
    s = Sregs()
    for name in SEG_NAMES:
        cs = getattr(c, name)
        setattr(s, name, Segment(*(getattr(cs, f) for f in SEG_FIELDS)))
    s.gdt = Dtable(c.gdt.base, c.gdt.limit)
    s.idt = Dtable(c.idt.base, c.idt.limit)
    s.cr0, s.cr2, s.cr3, s.cr4, s.cr8 = c.cr0, c.cr2, c.cr3, c.cr4, c.cr8
    s.efer, s.apic_base = c.efer, c.apic_base
    s.interrupt_bitmap = tuple(c.interrupt_bitmap)
    return s


def sregs_to_c(s: Sregs, c) -> None:
    for name in SEG_NAMES:
        seg = getattr(s, name)
        cs = getattr(c, name)
        for f in SEG_FIELDS:
            setattr(cs, f, getattr(seg, f))
    c.gdt.base, c.gdt.limit = s.gdt.base, s.gdt.limit
    c.idt.base, c.idt.limit = s.idt.base, s.idt.limit
    c.cr0, c.cr2, c.cr3, c.cr4, c.cr8 = s.cr0, s.cr2, s.cr3, s.cr4, s.cr8
    c.efer, c.apic_base = s.efer, s.apic_base
    for i, v in enumerate(s.interrupt_bitmap):
        c.interrupt_bitmap[i] = v


class Translation(Frozen):
    __slots__ = ("physical_address", "valid", "writeable", "usermode")
    physical_address: int
    valid: bool
    writeable: bool
    usermode: bool

    def __init__(self, physical_address: int, valid: bool, writeable: bool, usermode: bool):
        _set(self, "physical_address", physical_address)
        _set(self, "valid", valid)
        _set(self, "writeable", writeable)
        _set(self, "usermode", usermode)
