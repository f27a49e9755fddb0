"""The hand-written 32-bit layouts against Xen's headers compiled with gcc -m32, the CPUID
leaves, stubs, and the scale a guest uses to turn TSC ticks into nanoseconds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from xend_lite.kvm import CpuidEntry
from xend_lite.xen.xenabi import layout
from xend_lite.xen import abi, cpuid
from xend_lite.xen.hypercall import HYPERCALL_PAGE, HYPERCALL_PORT, stub
from xend_lite.xen.timekeeping import scale_delta, tsc_scale

HEADERS = "stdint.h stddef.h xen/xen.h xen/memory.h xen/sched.h xen/event_channel.h " \
          "xen/grant_table.h xen/version.h xen/vcpu.h xen/hvm/hvm_op.h xen/hvm/params.h".split()


def _compile32(tmp_path: Path, body: str) -> dict[str, int]:
    if shutil.which("gcc") is None or shutil.which("nm") is None:
        pytest.skip("gcc and nm are needed to compile Xen's headers")
    src = tmp_path / "l32.c"
    src.write_text("#define __XEN_INTERFACE_VERSION__ 0x00040e00\n"
                   + "".join(f"#include <{h}>\n" for h in HEADERS) + body)
    obj = tmp_path / "l32.o"
    proc = subprocess.run(["gcc", "-m32", "-ffreestanding", "-c", str(src), "-o", str(obj)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"gcc -m32 cannot compile Xen's headers here: {proc.stderr.strip()[:200]}")
    out = subprocess.run(["nm", "-S", str(obj)], capture_output=True, text=True, check=True).stdout
    sizes = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4:
            sizes[parts[3]] = int(parts[1], 16)
    return sizes


def test_compat_layouts_match_gcc_m32(tmp_path):
    body = []
    for name, fields in abi._COMPAT.items():
        body.append(f"char size__{name}[sizeof(struct {name})];")
        for fname, _t in fields:
            body.append(f"char off__{name}__{fname}[offsetof(struct {name}, {fname}) + 1];")
    for f in ("evtchn_pending", "evtchn_mask", "wc_version", "wc_sec", "wc_nsec", "arch"):
        body.append(f"char off__shared_info__{f}[offsetof(struct shared_info, {f}) + 1];")
    body.append("char off__arch_shared_info__wc_sec_hi[offsetof(struct arch_shared_info, wc_sec_hi) + 1];")
    body.append("char off__vcpu_info__evtchn_pending_sel[offsetof(struct vcpu_info, evtchn_pending_sel) + 1];")
    body.append("char off__vcpu_info__time[offsetof(struct vcpu_info, time) + 1];")
    body.append("char size__vcpu_info[sizeof(struct vcpu_info)];")
    # memory.py reads struct xen_foreign_memory_map's map at the pointer's alignment
    body.append("char off__foreign_map[offsetof(struct xen_foreign_memory_map, map) + 1];")
    got = _compile32(tmp_path, "\n".join(body) + "\n")
    assert got["off__foreign_map"] - 1 == 4
    for name in abi._COMPAT:
        lay = abi.guest_layout(name, False)
        assert lay.size == got[f"size__{name}"], name
        for fname, f in lay.fields.items():
            assert f.offset == got[f"off__{name}__{fname}"] - 1, f"{name}.{fname}"
    s = abi.SHINFO32
    assert s.evtchn_pending == got["off__shared_info__evtchn_pending"] - 1
    assert s.evtchn_mask == got["off__shared_info__evtchn_mask"] - 1
    assert s.wc_version == got["off__shared_info__wc_version"] - 1
    assert s.wc_sec == got["off__shared_info__wc_sec"] - 1
    assert s.wc_nsec == got["off__shared_info__wc_nsec"] - 1
    assert s.wc_sec_hi == got["off__shared_info__arch"] - 1 + got["off__arch_shared_info__wc_sec_hi"] - 1
    assert s.pending_sel == got["off__vcpu_info__evtchn_pending_sel"] - 1
    assert s.time == got["off__vcpu_info__time"] - 1
    assert got["size__vcpu_info"] == s.vcpu_info_size


def test_64bit_foreign_memory_map_puts_the_map_at_8():
    assert layout("xen_foreign_memory_map").offset("map") == 8


def test_64bit_shared_info_offsets_match_the_headers():
    lay = layout("shared_info")
    s = abi.SHINFO64
    assert (s.evtchn_pending, s.evtchn_mask, s.wc_version, s.wc_sec, s.wc_nsec, s.wc_sec_hi) == (
        lay.offset("evtchn_pending"), lay.offset("evtchn_mask"), lay.offset("wc_version"),
        lay.offset("wc_sec"), lay.offset("wc_nsec"), lay.offset("wc_sec_hi"))
    vi = layout("vcpu_info")
    assert (s.pending_sel, s.time) == (vi.offset("evtchn_pending_sel"), vi.offset("time"))


def test_stub_bytes_and_page():
    assert stub(17)[:8] == bytes([0xB8, 17, 0, 0, 0, 0xE6, HYPERCALL_PORT, 0xC3])
    assert len(HYPERCALL_PAGE) == 4096
    assert HYPERCALL_PAGE[32 * 5:32 * 6] == stub(5)


def test_bench_guest_carries_the_same_stub_page(guest_image):
    import subprocess as sp
    import tempfile

    elf = guest_image("../bench/guests/hcloop.S", bits=32)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "g.elf"
        p.write_bytes(elf)
        sp.run(["objcopy", "-O", "binary", str(p), str(p) + ".bin"], check=True)
        flat = Path(str(p) + ".bin").read_bytes()
    assert HYPERCALL_PAGE in flat


def test_cpuid_leaves_replace_kvms():
    kvm = [CpuidEntry(0x40000000, 0, 0, 0x40000001, 1, 2, 3), CpuidEntry(1, 0, 0, 0, 0, 0, 0)]
    cfg = cpuid.XenCpuidConfig(4, 16, 3, 2_000_000)
    out = cpuid.build_cpuid(kvm, cfg, vcpu_id=2)
    base = [e for e in out if e.function == 0x40000000]
    assert len(base) == 1 and (base[0].ebx, base[0].ecx, base[0].edx) == cpuid.SIGNATURE
    assert base[0].eax == 0x40000005
    leaf4 = [e for e in out if e.function == 0x40000004][0]
    assert (leaf4.ebx, leaf4.ecx) == (2, 3) and leaf4.eax & 0x18 == 0x18
    assert [e for e in out if e.function == 1][0].ecx >> 31 == 1
    with pytest.raises(ValueError):
        cpuid.parse_version("4")
    with pytest.raises(ValueError):
        cpuid.parse_version("4.x")


@pytest.mark.parametrize("khz", [1, 100_000, 1_000_000, 2_500_000, 3_700_123, 10_000_000])
def test_tsc_scale_converts_ticks_to_ns(khz):
    mul, shift = tsc_scale(khz)
    assert 0 < mul < 1 << 32 and -31 <= shift <= 31
    ticks = khz * 1000  # one second of ticks
    ns = scale_delta(ticks, mul, shift)
    assert abs(ns - 10**9) <= 10**9 * 1e-6 + 2
