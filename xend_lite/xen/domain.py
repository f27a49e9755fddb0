"""Domain: one Xen HVM/PVH guest on KVM, the facade the daemon drives.

It builds the machine (RAM, vCPUs, console), the Xen emulation (CPUID leaves, hypercall
page, dispatch, event channels, timers) and the overlay device (shared_info and grant
frames), loads the guest image, and answers the control plane's questions. Every method
runs on the daemon's VM-owner thread; guest-driven events reach ``emit`` from vCPU threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, NamedTuple

from xend_lite.errors import InvalidArgument, LoaderError, NotFound, NotSupported, StateError
from xend_lite.kvm import CAPABILITIES, Kvm
from xend_lite.machine.console import ConsoleSink
from xend_lite.machine.loader import load_image
from xend_lite.machine.machine import Machine, ShutdownStatus
from xend_lite.xen.emulation import XenEmulation
from xend_lite.xen.overlay import OverlayDevice

log = logging.getLogger("xend_lite.domain")

Emit = Callable[[str, dict], None]
INVALID_GPA = (1 << 64) - 1
DETACH_DELAY = 0.2   # seconds between a restore and moving its RAM off the snapshot file
XEN_VERSION_DEFAULT = "4.16"


class DomainSpec(NamedTuple):
    """What a domain is made of (the daemon's config builds it)."""

    image: str | None = None          # None: the embedded default guest
    initrd: str | None = None         # the first PVH module (Linux's initramfs); None: none
    cmdline: str = ""
    memory_mib: int = 128
    vcpus: int = 1
    xen_version: str = XEN_VERSION_DEFAULT
    domid: int = 1
    backend: str = "auto"             # auto | userspace | kvm-xen
    grant_frames: int = 64
    console_log: str | None = None
    console_stdout: bool = False
    kvm_path: str = "/dev/kvm"
    xen: bool = True                  # False: a plain KVM VM, no Xen ABI, no overlay device

    @classmethod
    def from_config(cls, cfg: Any) -> DomainSpec:
        """Take the fields this class knows from any config object that has them."""
        kw = {f: getattr(cfg, f) for f in cls._fields if hasattr(cfg, f)}
        return cls(**kw)


def read_image(path: str | None, what: str = "guest image") -> bytes:
    if path is None:
        from xend_lite.guests import default_image

        return default_image()
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise LoaderError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise LoaderError(f"{what} {path} cannot be read: {exc.strerror}") from exc


class Domain:
    def __init__(self, config: Any, emit: Emit | None = None):
        spec = config if isinstance(config, DomainSpec) else DomainSpec.from_config(config)
        if spec.memory_mib < 16 or spec.memory_mib > 1 << 20:
            raise InvalidArgument("memory must be between 16 MiB and 1 TiB")
        self.spec = spec
        self._emit = emit or (lambda _e, _d: None)
        self.image = read_image(spec.image)
        self.initrd = read_image(spec.initrd, "initrd") if spec.initrd is not None else None
        self.kvm = Kvm(spec.kvm_path)
        console = ConsoleSink(stdout=spec.console_stdout, log_path=spec.console_log)
        try:
            self.machine = Machine(self.kvm, spec.memory_mib << 20, spec.vcpus, console)
        except BaseException:
            self.kvm.close()
            raise
        self._build_xen()
        self.machine.add_shutdown_listener(self._on_shutdown)
        self.boot = load_image(self.machine, self.image, spec.cmdline, initrd=self.initrd)
        self._closed = False
        self._detach_job: tuple[threading.Thread, threading.Event] | None = None
        self.detached = threading.Event()   # set once restored RAM no longer uses its file

    def _build_xen(self) -> None:
        self.xen: XenEmulation | None = None
        self.overlay: OverlayDevice | None = None
        if not self.spec.xen:
            return
        kvm_xen = bool(self.kvm.check_extension(CAPABILITIES["xen_hvm"])) \
            if "xen_hvm" in CAPABILITIES else False
        self.xen = XenEmulation(self.machine, self.spec)
        self.overlay = OverlayDevice(self.machine, grant_frames=self.spec.grant_frames,
                                     backend=self.spec.backend, kvm_xen_available=kvm_xen)
        self.xen.attach_overlay(self.overlay)
        self.xen.emit = self._emit

    def _xen(self) -> XenEmulation:
        if self.xen is None:
            raise NotSupported("this VM is not in Xen mode: it has no Xen emulation")
        return self.xen

    def _overlay(self) -> OverlayDevice:
        if self.overlay is None:
            raise NotSupported("this VM is not in Xen mode: it has no xen_overlay device")
        return self.overlay

    # -- life cycle ----------------------------------------------------------------------

    def _on_shutdown(self, status: ShutdownStatus) -> None:
        data = {"reason": status.reason, "code": status.code}
        if status.detail:
            data["detail"] = status.detail
        if status.reason in ("internal-error", "crash"):
            self._emit("GUEST_PANICKED", data)
        self._emit("SHUTDOWN", data)

    def start(self, paused: bool = False) -> None:
        self.machine.start(paused=paused)

    def pause(self) -> None:
        self.machine.pause()

    def resume(self) -> None:
        self.machine.resume()

    def reset(self) -> None:
        """A system reset: power-on vCPU state, RAM cleared, Xen soft reset, image reloaded."""
        self._stop_detach()   # the reset rewrites RAM: let no move of it race that
        m = self.machine
        was = m.state
        if was == "stopped":
            m.rearm()
        elif was in ("running", "paused"):
            m.pause()
            m.reset_hardware()
        if self.xen is not None:
            self.xen.reset()
            self.overlay.reset()
        self.boot = load_image(m, self.image, self.spec.cmdline, initrd=self.initrd)
        if was == "stopped":
            m.start(paused=False)
        elif was in ("running", "paused"):
            m.resume()
        self._emit("RESET", {"reason": "host"})

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_detach()
        try:
            self.machine.close()
        finally:
            self.kvm.close()

    def run_state(self) -> str:
        st = self.machine.state
        if st == "stopped" and self.machine.status is not None \
                and self.machine.status.reason == "internal-error":
            return "internal-error"
        return {"stopped": "shutdown"}.get(st, st)

    def shutdown_status(self) -> ShutdownStatus | None:
        return self.machine.status

    # -- queries -------------------------------------------------------------------------

    def query_vcpus(self) -> list[dict]:
        return self.machine.vcpu_info()

    def query_memory_map(self) -> list[dict]:
        return self.machine.memmap.regions()

    def query_console(self, max_bytes: int = 4096) -> str:
        return self.machine.console.tail(max_bytes).decode("utf-8", "replace")

    def query_hypercalls(self) -> dict:
        return self._xen().counters()

    def query_capabilities(self) -> dict:
        caps = {name: self.kvm.check_extension(num) for name, num in sorted(CAPABILITIES.items())}
        return {"kvm": caps, "backend": self.overlay.backend_name if self.overlay else "none",
                "xen_version": self.spec.xen_version, "domid": self.spec.domid}

    def query_xen_overlay(self) -> list[dict]:
        return self._overlay().list()

    # -- overlay control -----------------------------------------------------------------

    def overlay_map(self, page: str, gpa: int) -> dict:
        self._overlay().map(page, gpa)
        entry = self._overlay_entry(page)
        if gpa == INVALID_GPA:
            self._emit("XEN_OVERLAY_UNMAPPED", {"page": page})
        else:
            self._emit("XEN_OVERLAY_MAPPED", {"page": page, "gpa": gpa})
        return entry

    def overlay_unmap(self, page: str) -> dict:
        self._overlay().unmap(page)
        self._emit("XEN_OVERLAY_UNMAPPED", {"page": page})
        return self._overlay_entry(page)

    def _overlay_entry(self, page: str) -> dict:
        for e in self._overlay().list():
            if e["page"] == page:
                return e
        raise NotFound(f"no overlay page named {page!r}")

    # -- snapshots -----------------------------------------------------------------------

    def snapshot_save(self, path: str, progress: Callable[[int, int], None] | None = None) -> dict:
        if self.machine.state not in ("paused", "stopped") and self.machine.pause_depth == 0:
            raise StateError("the VM must be paused to save it", self.run_state(), ("paused",))
        # snapshots are not needed to boot: their code is imported at the first save or load
        from xend_lite.xen.persist import save_domain

        return save_domain(self, path, progress)

    def snapshot_load(self, path: str, verify: bool = True) -> dict:
        """Load a snapshot; RAM then moves off the file in the background (see detached)."""
        self._stop_detach()
        from xend_lite.xen.persist import load_domain

        info = load_domain(self, path, verify)
        fd, offset = info.pop("_detach")
        self.detached.clear()
        stop = threading.Event()
        t = threading.Thread(target=self._detach, args=(fd, offset, stop, path),
                             name="ram-detach", daemon=True)
        self._detach_job = (t, stop)
        t.start()
        return info

    def _detach(self, fd: int, offset: int, stop: threading.Event, path: str) -> None:
        try:
            # let the restored guest get going first; the read lease covers the wait
            if stop.wait(DETACH_DELAY):
                return
            t0 = time.monotonic()
            if self.machine.detach_ram(fd, offset, stop):
                log.info("guest RAM no longer depends on %s (moved in %.3f s)", path,
                         time.monotonic() - t0)
                self.detached.set()
        except Exception:  # noqa: BLE001 - the VM runs on from the file; say why
            log.exception("moving guest RAM off %s failed; the VM keeps using the file", path)
        finally:
            from xend_lite.xen.persist import release_lease

            release_lease(fd)
            os.close(fd)

    def _stop_detach(self) -> None:
        job, self._detach_job = self._detach_job, None
        if job is not None:
            job[1].set()
            job[0].join()

    @staticmethod
    def snapshot_describe(path: str) -> dict:
        from xend_lite.snapshot import describe

        if not os.path.exists(path):
            raise NotFound(f"snapshot {path} does not exist")
        return describe(path)
