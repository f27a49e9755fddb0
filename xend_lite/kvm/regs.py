"""Register sets as plain Python values: what KVM_GET_REGS / KVM_GET_SREGS return, and what the
synced copy in kvm_run holds. ``*_from_c`` / ``*_to_c`` are the only places these meet cffi."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class Regs:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 2


REG_NAMES = tuple(f.name for f in fields(Regs))


def regs_from_c(c) -> Regs:
    return Regs(*(getattr(c, n) for n in REG_NAMES))


def regs_to_c(regs: Regs, c) -> None:
    for n in REG_NAMES:
        setattr(c, n, getattr(regs, n) & 0xFFFFFFFFFFFFFFFF)


@dataclass(slots=True)
class Segment:
    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the kernel's name
    g: int = 0
    avl: int = 0
    unusable: int = 0


SEG_FIELDS = tuple(f.name for f in fields(Segment))
SEG_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass(slots=True)
class Dtable:
    base: int = 0
    limit: int = 0


@dataclass(slots=True)
class Sregs:
    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: Dtable = field(default_factory=Dtable)
    idt: Dtable = field(default_factory=Dtable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, ...] = (0, 0, 0, 0)


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


@dataclass(frozen=True, slots=True)
class Translation:
    physical_address: int
    valid: bool
    writeable: bool
    usermode: bool
