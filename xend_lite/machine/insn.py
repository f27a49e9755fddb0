"""Just enough x86-64 decoding for the quirks: legacy prefixes, REX, a two-byte (0F) opcode
and a ModRM memory operand with its SIB and displacement (Intel SDM vol. 2, ch. 2). 64-bit
mode only; anything outside that shape is refused with the reason."""

from __future__ import annotations

from xend_lite.kvm import Regs
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

U64 = (1 << 64) - 1
GPR = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
       "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
OTHER_PREFIXES = {0xF0, 0xF2, 0xF3, 0x66, 0x67}
MAX_LENGTH = 15


class Undecodable(Exception):
    """Not an instruction of the shape this module decodes."""


class MemOperand(Frozen):
    """A decoded 0F-opcode instruction with a memory operand, in 64-bit mode."""

    __slots__ = ("prefixes", "rex", "opcode", "reg", "segment", "address", "length")
    prefixes: bytes       # the legacy prefixes, in order (segment overrides included)
    rex: int              # 0 when absent
    opcode: bytes         # 0F xx
    reg: int              # ModRM.reg (the /digit of a group opcode; REX.R not applied)
    segment: str | None   # "fs" or "gs" when overridden (the others have base 0 in 64-bit mode)
    address: int          # the effective address (before any segment base)
    length: int           # the whole instruction, in bytes

    def __init__(self, prefixes: bytes, rex: int, opcode: bytes, reg: int, segment: str | None,
                 address: int, length: int):
        _set(self, "prefixes", prefixes)
        _set(self, "rex", rex)
        _set(self, "opcode", opcode)
        _set(self, "reg", reg)
        _set(self, "segment", segment)
        _set(self, "address", address)
        _set(self, "length", length)


def decode_0f_mem(insn: bytes, regs: Regs, rip: int) -> MemOperand:
    """Decode ``insn`` (the bytes at ``rip``) as prefixes, REX, 0F xx, ModRM with a memory
    operand; the effective address uses ``regs`` (and ``rip`` for RIP-relative forms)."""
    pos = 0
    prefixes = bytearray()
    segment = None
    while pos < len(insn) and (insn[pos] in SEGMENT_PREFIXES or insn[pos] in OTHER_PREFIXES):
        b = insn[pos]
        prefixes.append(b)
        if b in SEGMENT_PREFIXES and SEGMENT_PREFIXES[b] in ("fs", "gs"):
            segment = SEGMENT_PREFIXES[b]
        pos += 1
    rex = 0
    if pos < len(insn) and 0x40 <= insn[pos] <= 0x4F:
        rex = insn[pos]
        pos += 1
    if insn[pos:pos + 1] != b"\x0f" or pos + 3 > len(insn):
        raise Undecodable("not a two-byte (0F) opcode")
    opcode = insn[pos:pos + 2]
    modrm = insn[pos + 2]
    pos += 3
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3:
        raise Undecodable("a register operand, not memory")
    addr32 = 0x67 in prefixes
    value = lambda n: getattr(regs, GPR[n]) & (0xFFFFFFFF if addr32 else U64)  # noqa: E731
    ea = 0
    disp_size = {0: 0, 1: 1, 2: 4}[mod]
    rip_relative = False
    if rm == 4:
        if pos >= len(insn):
            raise Undecodable("truncated SIB")
        sib = insn[pos]
        pos += 1
        scale, index, base = sib >> 6, ((sib >> 3) & 7) | (rex & 2) << 2, (sib & 7) | (rex & 1) << 3
        if index != 4:
            ea += value(index) << scale
        if (sib & 7) == 5 and mod == 0:
            disp_size = 4
        else:
            ea += value(base)
    elif rm == 5 and mod == 0:
        disp_size, rip_relative = 4, True
    else:
        ea += value(rm | (rex & 1) << 3)
    if pos + disp_size > len(insn):
        raise Undecodable("truncated displacement")
    disp = int.from_bytes(insn[pos:pos + disp_size], "little", signed=True) if disp_size else 0
    pos += disp_size
    if pos > MAX_LENGTH:
        raise Undecodable("longer than 15 bytes")
    if rip_relative:
        ea = rip + pos + disp
    else:
        ea += disp
    ea &= 0xFFFFFFFF if addr32 else U64
    return MemOperand(bytes(prefixes), rex, bytes(opcode), reg, segment, ea, pos)
