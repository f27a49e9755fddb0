"""Restoring into a daemon that waits for its state (``xend-lite --incoming``).

While the daemon waits, a standby VM is made from its settings (machine/prepared.py: the
KVM VM with its irqchip and PIT, in Xen mode the MSRs the platform traps, the vCPUs the
settings name, the VM owner thread): what no snapshot decides, and what costs most to make
(several of those KVM calls wait for grace periods). A load then runs on the standby's owner
thread: it reads and checks the snapshot once, builds the domain the snapshot describes on
the standby with the snapshot's memory mapped copy-on-write as guest RAM from the start (no
zeroed RAM first, no guest image loaded into it), and applies the saved states.

A snapshot the standby cannot serve (fewer vCPUs than it has made) gets a VM built anew, as
does every load when no standby could be made. A load that reached the standby spends it,
whether it succeeded or not: after a failure the caller makes another with ``prepare``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable

from xend_lite.errors import LoaderError, SnapshotError
from xend_lite.kvm import Kvm
from xend_lite.machine.prepared import PreparedVm
from xend_lite.vmm.domain import Domain, Emit
from xend_lite.vmm.persist import open_snapshot, ram_backing, shape_of
from xend_lite.vmm.spec import DomainSpec, GuestImages
from xend_lite.xen.platform import TRAPPED_MSRS

log = logging.getLogger("xend_lite.incoming")

# What a restore takes from the snapshot to build the VM it fits (the rest of the domain's
# settings are the daemon's, and the load checks the snapshot against them).
SHAPE = ("memory_mib", "vcpus", "grant_frames")


class Incoming:
    def __init__(self, spec: Any):
        self.spec = spec if isinstance(spec, DomainSpec) else DomainSpec.from_config(spec)
        self._standby: PreparedVm | None = None
        self._lock = threading.Lock()       # the standby, between prepare, a load and close
        self._images: GuestImages | None = None     # read ahead; again at a load if it failed

    @property
    def standby(self) -> PreparedVm | None:
        return self._standby

    def prepare(self) -> None:
        """Make the standby VM, unless there is one. A failure is logged: loads then build
        their VM anew, and report the reason if that fails too."""
        if self._images is None:
            try:
                self._images = GuestImages.read(self.spec)
            except LoaderError as exc:          # a load reports it, if it is still so
                log.warning("%s", exc)
        with self._lock:
            if self._standby is not None:
                return
        try:
            kvm = Kvm(self.spec.kvm_path)
        except OSError as exc:
            log.warning("no standby VM (%s): a load will build its VM", exc)
            return
        try:
            # a thread for each vCPU and one for the Xen platform's timers
            p = PreparedVm.make(kvm, self.spec.vcpus, park_threads=self.spec.vcpus + 1)
            try:
                if self.spec.xen:
                    p.trap_msrs(list(TRAPPED_MSRS))
            except BaseException:
                p.close()
                raise
        except Exception as exc:  # noqa: BLE001 - a load builds anew and reports its own error
            kvm.close()
            log.warning("no standby VM (%s): a load will build its VM", exc)
            return
        with self._lock:
            self._standby, spare = p, self._standby
        if spare is not None:        # made by a racing prepare: keep one
            _release(spare)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` where a restore runs: on the standby's owner thread (which the
        domain built on it keeps), or on a thread of its own when there is no standby."""
        with self._lock:
            p = self._standby
            if p is not None and p.owner.alive:
                return p.owner.submit(fn, *args)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        threading.Thread(target=_complete, args=(fut, fn, args), name="vm-build", daemon=True).start()
        return fut

    def restore(self, emit: Emit | None, path: Any, verify: bool = True,
                phases: dict[str, float] | None = None) -> tuple[Domain, dict]:
        """Build the domain the snapshot at ``path`` describes and load it (not started). On
        any fault nothing is left built and the error is the snapshot's or the build's.
        ``phases`` gets the milliseconds each step took (open, build, load)."""
        phases = {} if phases is None else phases
        t0 = time.perf_counter()
        snap = open_snapshot(path, verify)
        try:
            shape = shape_of(snap, path)
            if not shape["xen"]:
                raise SnapshotError(f"snapshot {path} is of a plain KVM VM, not a Xen domain")
            spec = self.spec.replace(**{k: shape[k] for k in SHAPE if k in shape})
            t1 = time.perf_counter()
            ram = ram_backing(snap)
            domain = Domain(spec, emit, prepared=self._take(spec), ram=ram, images=self._images)
            t2 = time.perf_counter()
            try:
                info = domain.restore_in_place(snap, path)
            except BaseException:
                domain.close()
                ram.close()        # the guest never ran on it: nothing reads it any more
                raise
        finally:
            snap.close()
        t3 = time.perf_counter()
        phases.update(open=_ms(t1 - t0), build=_ms(t2 - t1), load=_ms(t3 - t2))
        return domain, dict(info, memory_mib=spec.memory_mib, vcpus=spec.vcpus)

    def _take(self, spec: DomainSpec) -> PreparedVm | None:
        """The standby when it can serve ``spec`` (it is spent from now on), else None."""
        with self._lock:
            p, self._standby = self._standby, None
        if p is None:
            return None
        why = p.unfit(spec.vcpus)
        if why is None:
            return p
        log.info("the standby VM cannot take this snapshot (%s): building a new VM", why)
        _release(p)
        return None

    def close(self) -> None:
        with self._lock:
            p, self._standby = self._standby, None
        if p is not None:
            _release(p)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _release(p: PreparedVm) -> None:
    p.close()
    p.kvm.close()


def _complete(fut: concurrent.futures.Future, fn: Callable[..., Any], args: tuple) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
        fut.set_exception(exc)
