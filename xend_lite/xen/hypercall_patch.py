"""Linux's direct Xen hypercalls, rewritten so that they reach xend-lite.

Since the XSA-466 fix (6.1.120 and later), Linux has no hypercall page. Every hypercall is
``mov $nr, %eax`` and a call through a static call that first leads to xen_hypercall_hvm,
which asks __xen_hypercall_setfunc for the vendor's routine (AMD and Hygon: vmmcall, others:
vmcall), points the static call at it and jumps there. The routines, from
arch/x86/xen/xen-head.S, each start on a 16-byte boundary:

    xen_hypercall_amd:    [endbr] 0f 01 d9 (vmmcall)  then a return
    xen_hypercall_intel:  [endbr] 0f 01 c1 (vmcall)   then a return

where a return is ``c3`` (ret, followed by int3 under SLS) or ``e9 rel32``, a jump to the
return thunk, which itself starts with ret. xen_hypercall_hvm sits just before them and jumps
to both (``jz amd; jmp intel``). On a KVM without KVM_CAP_XEN_HVM the kernel answers vmcall
itself, so those hypercalls never reach the daemon.

``patch_xen_hypercalls`` finds exactly that shape in an ELF image's executable segments and
rewrites each instruction into ``out %al, $HYPERCALL_PORT; nop`` (e6 e4 90): three bytes like
the original, with the number already in EAX as the hypercall page's stubs leave it, so the
call reaches the daemon's hypercall port and the return that follows stays untouched. Every
other vmcall/vmmcall byte sequence (KVM's kvm_hypercall* inline in C functions, VMware's
backdoor, SEV's vmgexit = f3 0f 01 d9, alternative replacements, bytes inside data) is left
as it is and reported with the reason. A shape that looks like the routines but does not
check out in full (two of a kind, no dispatcher jumping to them) is refused: nothing is
rewritten and HypercallPatchError says why.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xend_lite.errors import LoaderError
from xend_lite.machine.loader import PT_LOAD, parse_elf
from xend_lite.xen.hypercall import HYPERCALL_PORT

PF_X = 1
VMCALL = b"\x0f\x01\xc1"
VMMCALL = b"\x0f\x01\xd9"
INSTRUCTIONS = {VMCALL: "vmcall", VMMCALL: "vmmcall"}
ROUTINES = {"vmcall": "xen_hypercall_intel", "vmmcall": "xen_hypercall_amd"}
ENDBR = (b"\xf3\x0f\x1e\xfa", b"\xf3\x0f\x1e\xfb")   # endbr64, endbr32
RET, JMP32 = 0xC3, 0xE9
ROUTINE_ALIGN = 16
DISPATCH_WINDOW = 256     # xen_hypercall_hvm lies within this many bytes before the routines
ROUTINES_APART = 64       # the two routines lie this close to each other


class HypercallPatchError(LoaderError):
    """The image has what looks like Linux's hypercall routines, but not in full."""


def replacement(port: int = HYPERCALL_PORT) -> bytes:
    """``out %al, $port; nop``: three bytes, like vmcall and vmmcall."""
    return bytes([0xE6, port, 0x90])


@dataclass(frozen=True)
class Site:
    """One vmcall or vmmcall byte sequence in an executable segment."""

    offset: int          # in the ELF file
    gpa: int             # guest-physical, where the loader puts it
    vaddr: int           # the address the code runs at (the kernel's virtual address)
    instruction: str     # "vmcall" or "vmmcall"
    before: bytes        # up to 8 bytes before it
    after: bytes         # up to 8 bytes after it


@dataclass(frozen=True)
class Patched:
    site: Site
    routine: str         # xen_hypercall_intel or xen_hypercall_amd
    original: bytes
    new: bytes
    why: str


@dataclass(frozen=True)
class Skipped:
    site: Site
    reason: str


@dataclass(frozen=True)
class HypercallPatch:
    image: bytes                      # the ELF with the routines rewritten
    patched: tuple[Patched, ...]      # empty: no direct-hypercall routines (a hypercall page kernel)
    skipped: tuple[Skipped, ...]      # every other vmcall/vmmcall, and why it stays


@dataclass(frozen=True)
class _Seg:
    offset: int
    paddr: int
    vaddr: int
    size: int

    def holds(self, vaddr: int, n: int = 1) -> bool:
        return self.vaddr <= vaddr and vaddr + n <= self.vaddr + self.size


class _Code:
    """The executable segments' file bytes, addressed by virtual address."""

    def __init__(self, image: bytes, segs: list[_Seg]):
        self.image = image
        self.segs = segs

    def read(self, vaddr: int, n: int) -> bytes | None:
        for s in self.segs:
            if s.holds(vaddr, n):
                off = s.offset + vaddr - s.vaddr
                return self.image[off:off + n]
        return None


def _exec_segments(image: bytes) -> list[_Seg]:
    _bits, _entry, phdrs = parse_elf(image)
    return [_Seg(p.offset, p.paddr, p.vaddr, p.filesz) for p in phdrs
            if p.type == PT_LOAD and p.flags & PF_X and p.filesz]


def _find_sites(image: bytes, segs: list[_Seg]) -> list[Site]:
    sites = []
    for s in segs:
        body = image[s.offset:s.offset + s.size]
        for pattern, name in INSTRUCTIONS.items():
            pos = body.find(pattern)
            while pos >= 0:
                sites.append(Site(s.offset + pos, s.paddr + pos, s.vaddr + pos, name,
                                  body[max(0, pos - 8):pos], body[pos + 3:pos + 11]))
                pos = body.find(pattern, pos + 1)
    return sorted(sites, key=lambda x: x.offset)


def _routine_start(site: Site) -> int | None:
    """The routine's address if the instruction opens a 16-byte aligned routine."""
    if site.vaddr % ROUTINE_ALIGN == 0:
        return site.vaddr
    if site.vaddr % ROUTINE_ALIGN == 4 and site.before[-4:] in ENDBR:
        return site.vaddr - 4
    return None


def _returns(code: _Code, site: Site) -> str | None:
    """How the routine returns right after the instruction, or None if it does not."""
    nxt = code.read(site.vaddr + 3, 5)
    if not nxt:
        return None
    if nxt[0] == RET:
        return "ret"
    if nxt[0] == JMP32 and len(nxt) == 5:
        target = site.vaddr + 8 + struct.unpack("<i", nxt[1:5])[0]
        if code.read(target, 1) == bytes([RET]):
            return f"jmp to a return thunk at {target:#x}"
    return None


def _shape(code: _Code, site: Site) -> tuple[int, str] | str:
    """(routine start, how it returns) for a routine-shaped site, else the reason it is not."""
    if site.instruction == "vmmcall" and site.before[-1:] == b"\xf3":
        return "rep vmmcall (SEV-ES vmgexit) or inline code"
    start = _routine_start(site)
    if start is None:
        return "inline in other code, not at the start of a 16-byte aligned routine"
    how = _returns(code, site)
    if how is None:
        return "not followed by a return"
    return start, how


_BRANCH8 = {0xEB} | set(range(0x70, 0x80))                  # jmp rel8, jcc rel8
_BRANCH32 = {b"\xe9", b"\xe8"} | {bytes([0x0F, c]) for c in range(0x80, 0x90)}


def _reaches(code: _Code, lo: int, hi: int, target: int) -> bool:
    """Whether a jump, call or RIP-relative lea in [lo, hi) names ``target``."""
    for at in range(lo, hi):
        b = code.read(at, 7)
        if not b:
            continue
        if b[0] in _BRANCH8 and len(b) >= 2 and at + 2 + struct.unpack("<b", b[1:2])[0] == target:
            return True
        for op in _BRANCH32:
            n = len(op)
            if b.startswith(op) and len(b) >= n + 4 and \
                    at + n + 4 + struct.unpack("<i", b[n:n + 4])[0] == target:
                return True
        # lea rel32(%rip), %reg (REX.W 8d, ModRM mod 00 rm 101): xen_hypercall_hvm's compare
        if b[0] in (0x48, 0x4C) and b[1] == 0x8D and b[2] & 0xC7 == 0x05 and \
                at + 7 + struct.unpack("<i", b[3:7])[0] == target:
            return True
        # lea abs32, %reg (8d, ModRM mod 00 rm 101 without REX): the 32-bit kernel's compare
        if b[0] == 0x8D and b[1] & 0xC7 == 0x05 and struct.unpack("<I", b[2:6])[0] == target:
            return True
    return False


def patch_xen_hypercalls(image: bytes, port: int = HYPERCALL_PORT) -> HypercallPatch:
    """Rewrite Linux's xen_hypercall_intel/amd in an ELF ``image`` (a vmlinux, e.g. from
    ``xend_lite.machine.kernel.unpack_kernel``) to exit to the hypercall ``port``.

    Returns the new image with what was rewritten and every vmcall/vmmcall left alone;
    raises HypercallPatchError when routine-shaped sites do not make exactly one intel and
    one amd routine next to each other with a dispatcher jumping to both."""
    segs = _exec_segments(image)
    code = _Code(image, segs)
    skipped: list[Skipped] = []
    found: dict[str, list[tuple[Site, int, str]]] = {"vmcall": [], "vmmcall": []}
    for site in _find_sites(image, segs):
        shape = _shape(code, site)
        if isinstance(shape, str):
            skipped.append(Skipped(site, shape))
        else:
            found[site.instruction].append((site, *shape))
    if not found["vmcall"] and not found["vmmcall"]:
        return HypercallPatch(image, (), tuple(skipped))
    counts = {k: len(v) for k, v in found.items()}
    if counts != {"vmcall": 1, "vmmcall": 1}:
        raise HypercallPatchError(
            f"guest image: expected one vmcall and one vmmcall hypercall routine, found "
            f"{counts['vmcall']} and {counts['vmmcall']}: not rewriting hypercalls")
    (intel, intel_start, intel_ret), = found["vmcall"]
    (amd, amd_start, amd_ret), = found["vmmcall"]
    if abs(intel_start - amd_start) > ROUTINES_APART:
        raise HypercallPatchError(
            f"guest image: the vmcall routine at {intel_start:#x} and the vmmcall routine at "
            f"{amd_start:#x} are not side by side: not rewriting hypercalls")
    first = min(intel_start, amd_start)
    for name, start in (("xen_hypercall_intel", intel_start), ("xen_hypercall_amd", amd_start)):
        if not _reaches(code, first - DISPATCH_WINDOW, first, start):
            raise HypercallPatchError(
                f"guest image: nothing in the {DISPATCH_WINDOW} bytes before the routines "
                f"jumps to the {name}-shaped routine at {start:#x} (no xen_hypercall_hvm): "
                "not rewriting hypercalls")
    new = replacement(port)
    out = bytearray(image)
    patched = []
    for site, start, how in ((intel, intel_start, intel_ret), (amd, amd_start, amd_ret)):
        out[site.offset:site.offset + 3] = new
        patched.append(Patched(site, ROUTINES[site.instruction], image[site.offset:site.offset + 3],
                               new, f"opens the 16-byte aligned routine at {start:#x}, followed "
                                    f"by {how}, reached from the dispatcher before it"))
    return HypercallPatch(bytes(out), tuple(patched), tuple(skipped))
