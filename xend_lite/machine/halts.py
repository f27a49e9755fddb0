"""Noticing a guest that halted with interrupts off: with the in-kernel irqchip a HLT never
exits to user space, so the machine would wait for ever. Runs on the VM owner."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xend_lite.kvm import const as K
from xend_lite.machine.vcpu import VcpuRunner, VcpuState

if TYPE_CHECKING:
    from xend_lite.machine.machine import Machine

RFLAGS_IF = 1 << 9
HALT_CHECK_EVERY = 0.25     # seconds
QUIET_CHECKS = 2            # checks without an exit before a vCPU is looked at
LOOK_AGAIN = 8              # checks to wait after looking


class HaltWatch:
    """A vCPU that makes no exits for a while is paused and looked at; halted with IF clear
    means the guest is dead."""

    def __init__(self, machine: Machine):
        self.m = machine
        self._quiet: dict[int, tuple[int, int]] = {}   # vcpu -> (exits seen, quiet checks)

    def check(self) -> None:
        m = self.m
        if m.state != "running" or m.pause_depth:
            return
        for r in m.runners:
            last, quiet = self._quiet.get(r.index, (-1, 0))
            if r.state != VcpuState.RUNNING or r.exits_total != last:
                self._quiet[r.index] = (r.exits_total, 0)
                continue
            self._quiet[r.index] = (last, quiet + 1)
            if quiet + 1 >= QUIET_CHECKS:
                self._quiet[r.index] = (last, -LOOK_AGAIN)
                self._look(r)

    def _look(self, r: VcpuRunner) -> None:
        m = self.m
        r.request_pause()
        try:
            m.wait_runners(lambda x: x is not r or x.state in (VcpuState.PAUSED, VcpuState.STOPPED), 2.0)
            if r.state != VcpuState.PAUSED:
                return
            v = r.vcpu
            if v.get_mp_state() == K.KVM_MP_STATE_HALTED and not v.get_regs().rflags & RFLAGS_IF:
                m.request_shutdown("halted", 0, f"vcpu{r.index} halted with interrupts disabled")
        finally:
            r.release()
            r.exits_total += 1
