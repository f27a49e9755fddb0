"""A second vCPU starts the way the guest asks: it waits for INIT/SIPI from the boot vCPU's
local APIC (what Linux does on PVH, whose MADT lists the CPUs), and until then the machine
reports it as not started ("created"), never as running."""

from __future__ import annotations

import threading
import time

import pytest

from xend_lite.machine.console import ConsoleSink
from xend_lite.machine.loader import load_image
from xend_lite.machine.machine import Machine

pytestmark = pytest.mark.kvm
MiB = 1 << 20


def _states(m: Machine) -> list[str]:
    return [v["state"] for v in m.vcpu_info()]


def test_second_vcpu_waits_for_sipi_then_runs(kvm, guest_image):
    m = Machine(kvm, 64 * MiB, 2, ConsoleSink())
    try:
        asked, go, sent, left = threading.Event(), threading.Event(), threading.Event(), []
        m.exits.register_io_in(0x5a0, lambda r, ex: (asked.set(), int(go.is_set()))[1]
                               .to_bytes(4, "little"))
        m.exits.register_io_out(0x5a1, lambda r, ex: sent.set())
        m.exits.register_io_out(0x5a2, lambda r, ex: left.append(int.from_bytes(ex.data, "little")))
        load_image(m, guest_image("machine/guests/sipi32.S", bits=32))
        m.start()
        assert asked.wait(15)
        time.sleep(0.3)                  # vCPU 1 had time to run, if it ran unasked
        assert _states(m)[1] == "created" and m.mem.read_u32(0x9000) == 0
        go.set()
        assert sent.wait(15)
        status = m.wait(15)

        assert status is not None and status.reason == "halted", status
        # the AP ran its real-mode trampoline and saw its own APIC ID (1) in CPUID
        assert left == [0xA9000001]
        deadline = time.monotonic() + 10
        while _states(m)[1] != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _states(m)[1] == "stopped" and m.runners[1].started
    finally:
        m.close()
