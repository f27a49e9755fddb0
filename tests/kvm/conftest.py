"""Fixtures for the KVM binding tests: a tiny assembler front end and a raw VM.

Binding tests drive Kvm -> Vm -> Vcpu directly (no machine layer) with snippets of our own
assembly, assembled and linked at the address they run from.
"""

from __future__ import annotations

import hashlib
import mmap
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from xend_lite.guests.build import toolchain_missing
from xend_lite.kvm import Kvm, Regs, Vcpu, Vm

CODE_GPA = 0x1000
RAM_BYTES = 0x10000  # 64 KiB at guest-physical 0; everything above is unbacked


class Assembler:
    """Assembles GNU as snippets into flat binaries linked at a given address (cached)."""

    def __init__(self, cache: Path):
        self.cache = cache

    def __call__(self, source: str, *, org: int = CODE_GPA, bits: int = 16) -> bytes:
        prelude = {16: ".code16\n", 32: ".code32\n", 64: ".code64\n"}[bits]
        text = prelude + source + "\n"
        key = hashlib.sha256(f"{org}:{bits}:{text}".encode()).hexdigest()[:16]
        out = self.cache / f"{key}.bin"
        if out.exists():
            return out.read_bytes()
        src, obj, elf = (self.cache / f"{key}{ext}" for ext in (".S", ".o", ".elf"))
        src.write_text(text)
        arch = "-m64" if bits == 64 else "-m32"
        emul = "elf_x86_64" if bits == 64 else "elf_i386"
        for cmd in (["gcc", arch, "-c", "-x", "assembler-with-cpp", "-o", str(obj), str(src)],
                    ["ld", "-m", emul, "-Ttext", hex(org), "-e", hex(org), "--build-id=none",
                     "-o", str(elf), str(obj)],
                    ["objcopy", "-O", "binary", "-j", ".text", str(elf), str(out)]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cmd[0]} failed: {proc.stderr}")
        return out.read_bytes()


@pytest.fixture(scope="session")
def asm(tmp_path_factory) -> Assembler:
    reason = toolchain_missing()
    if reason:
        pytest.skip(reason)
    return Assembler(tmp_path_factory.mktemp("asm"))


@pytest.fixture(scope="session")
def kvm():
    with Kvm() as k:
        yield k


@dataclass
class RawVm:
    """One VM with RAM_BYTES of RAM at 0 and one vCPU in real mode at CODE_GPA."""

    vm: Vm
    vcpu: Vcpu
    mem: mmap.mmap

    def load(self, code: bytes, gpa: int = CODE_GPA) -> None:
        self.mem[gpa:gpa + len(code)] = code

    def real_mode(self, rip: int = CODE_GPA) -> None:
        s = self.vcpu.get_sregs()
        for seg in (s.cs, s.ds, s.es, s.ss):
            seg.base, seg.selector = 0, 0
        self.vcpu.set_sregs(s)
        self.vcpu.set_regs(Regs(rip=rip, rsp=0x8000, rflags=2))

    def protected_mode(self, rip: int = CODE_GPA) -> None:
        """Flat 32-bit protected mode, paging off (the PVH boot state)."""
        from xend_lite.machine.loader import flat32_sregs

        self.vcpu.set_sregs(flat32_sregs(self.vcpu.get_sregs()))
        self.vcpu.set_regs(Regs(rip=rip, rsp=0x8000, rflags=2))

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()
        self.mem.close()


def make_raw_vm(kvm: Kvm, irqchip: bool = False) -> RawVm:
    from xend_lite.machine.native import buffer_address

    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    if irqchip:
        vm.create_irqchip()
    mem = mmap.mmap(-1, RAM_BYTES, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    vm.set_user_memory_region(0, 0, RAM_BYTES, buffer_address(mem))
    vcpu = vm.create_vcpu(0)
    raw = RawVm(vm, vcpu, mem)
    raw.real_mode()
    return raw


@pytest.fixture
def raw_vm(kvm):
    raw = make_raw_vm(kvm)
    yield raw
    raw.close()
