"""Debian's PVH GRUB on xend-lite: its output through the console ring, halt, keys typed at
its prompt, the memory map it was given, and its prompt carried across a snapshot into a
fresh domain.

GRUB finds Xen by CPUID, installs the hypercall page, reads the HVM params for the console
and xenstore rings, asks for the memory map, maps the grant table and shared_info, and lists
``device/vbd`` in xenstore before it runs its script. It never uses console_io: everything
it prints goes through the ring.
"""

from __future__ import annotations

import re
import struct

import pytest

from xend_lite.machine.loader import E820_RAM, E820_RESERVED, e820_map
from xend_lite.vmm.domain import Domain
from xend_lite.vmm.spec import DomainSpec
from xend_lite.xen.xenabi import X

from .build import GRUB_MODULES
from .console import wait_text

pytestmark = pytest.mark.kvm

MODULES = GRUB_MODULES + ("lsmmap",)
PROMPT = "grub> "
CONSOLE_OUT_CONS = 3080          # struct xencons_interface: out_cons, out_prod
STORE_REQ_CONS = 2048            # struct xenstore_domain_interface: req_cons .. rsp_prod
MEMORY_MIB = 64


def boot(image, memory_mib: int = MEMORY_MIB) -> Domain:
    d = Domain(DomainSpec(image=str(image), memory_mib=memory_mib))
    d.start()
    return d


def wait_output(d: Domain, text: str, after: int = 0, timeout: float = 20.0) -> int:
    """Wait until ``text`` appears in the console past offset ``after``; its end offset."""
    return wait_text(d, text, timeout, after, every=0.02)


def type_line(d: Domain, line: str) -> None:
    d.xen.console.write_input(line.encode() + b"\r")


def ring_u32s(d: Domain, gpa: int, n: int) -> tuple[int, ...]:
    return struct.unpack(f"<{n}I", d.machine.mem.read(gpa, 4 * n))


@pytest.fixture
def domains():
    made: list[Domain] = []

    def make(image, **kw) -> Domain:
        d = boot(image, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_echo_arrives_through_the_ring_and_halt_powers_off(grub_image, domains):
    """The script's output arrives through the console ring, GRUB's xenstore request is
    answered through the store ring, nothing it asks of us fails, and halt is a poweroff.
    The last command before halt (lsmmap, which never refreshes the terminal) is the
    case that lost its output while the ring was served only on events and a timer."""
    d = domains(grub_image("echo xend-lite says hello\nlsmmap\nhalt\n", MODULES))
    st = d.machine.wait(30)
    assert st is not None and st.reason == "poweroff", st
    out = d.machine.console.text()
    assert "xend-lite says hello" in out
    assert "base_addr = 0x0," in out, f"lsmmap's output was lost: {out[-400:]!r}"
    c = d.xen.counters()
    assert "console_io" not in c["hypercalls"], "GRUB's output must come through the ring"
    assert {k: v["errors"] for k, v in c["hypercalls"].items()} == \
        dict.fromkeys(c["hypercalls"], 0), c
    assert c["internal_errors"] == 0
    console_gpa = d.xen.params[X.HVM_PARAM_CONSOLE_PFN] << 12
    out_cons, out_prod = ring_u32s(d, console_gpa + CONSOLE_OUT_CONS, 2)
    assert out_cons == out_prod and out_cons >= len(out.encode()) - 64
    store_gpa = d.xen.params[X.HVM_PARAM_STORE_PFN] << 12
    req_cons, req_prod, rsp_cons, rsp_prod = ring_u32s(d, store_gpa + STORE_REQ_CONS, 4)
    assert req_cons == req_prod > 0 and rsp_cons == rsp_prod > 0   # asked and answered


def test_keys_typed_at_the_prompt_are_answered(grub_image, domains):
    d = domains(grub_image("echo ready\n", MODULES))
    at = wait_output(d, PROMPT)
    type_line(d, "echo hello")
    at = wait_output(d, "hello\n", at)     # the typed keys echo one by one: this is output
    wait_output(d, PROMPT, at)
    type_line(d, "halt")
    st = d.machine.wait(10)
    assert st is not None and st.reason == "poweroff", st


LSMMAP_LINE = re.compile(r"base_addr = (0x[0-9a-f]+), length = (0x[0-9a-f]+), (.+?)\s*$",
                         re.MULTILINE)
GRUB_TYPES = {"available RAM": E820_RAM, "reserved RAM": E820_RESERVED}


def merged(entries: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Sorted, with touching entries of one type joined, as GRUB keeps its map."""
    out: list[tuple[int, int, int]] = []
    for a, n, t in sorted(entries):
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], out[-1][1] + n, t)
        else:
            out.append((a, n, t))
    return out


@pytest.mark.parametrize("memory_mib", [MEMORY_MIB, 3 * 1024 + 512], ids=["64M", "3.5G"])
def test_the_memory_map_grub_prints_is_ours(grub_image, domains, memory_mib):
    """lsmmap prints the map GRUB got from XENMEM_memory_map; it is our e820 (GRUB joins
    touching entries of one type). 3.5 GiB puts RAM on both sides of the hole below 4 GiB."""
    d = domains(grub_image("lsmmap\nhalt\n", MODULES), memory_mib=memory_mib)
    st = d.machine.wait(30)
    assert st is not None and st.reason == "poweroff", st
    printed = [(int(a, 16), int(n, 16), GRUB_TYPES[kind])
               for a, n, kind in LSMMAP_LINE.findall(d.machine.console.text().replace("\r", ""))]
    ours = e820_map(d.machine)
    assert printed == merged(ours)
    assert sum(n for _a, n, t in printed if t == E820_RAM) == \
        (memory_mib << 20) - sum(n for _a, n, t in ours if t == E820_RESERVED)


def test_a_snapshot_at_the_prompt_answers_keys_in_a_fresh_domain(grub_image, domains,
                                                                tmp_path):
    image = grub_image("echo ready\n", MODULES)
    a = domains(image)
    wait_output(a, PROMPT)
    a.pause()
    a.snapshot_save(tmp_path / "grub.snap")
    a.close()
    b = Domain(DomainSpec(image=str(image), memory_mib=MEMORY_MIB))
    try:
        b.snapshot_load(tmp_path / "grub.snap")
        at = len(b.machine.console.text())      # the restored console shows the old output
        b.start()
        type_line(b, "echo restored")
        at = wait_output(b, "restored\n", at)
        wait_output(b, PROMPT, at)
        type_line(b, "halt")
        st = b.machine.wait(10)
        assert st is not None and st.reason == "poweroff", st
    finally:
        b.close()
