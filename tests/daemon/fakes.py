"""A stand-in for xend_lite.vmm.domain.Domain with the same methods and run states, so the
daemon can be tested anywhere and fast.

It records which thread called it (every call must come from the VM-owner thread) and
emits events the way Domain does. Its guest is scripted by the command line: ``poweroff:3``,
``reboot`` or ``crash`` ends the run that many milliseconds after start when followed by
``@MS`` (``poweroff:3@200``), from a thread of its own, as a vCPU would.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from xend_lite.errors import InvalidArgument, NotFound, NotSupported, SnapshotError, StateError
from xend_lite.machine.owner import VmOwner

INVALID_GPA = (1 << 64) - 1
PAGES = ("shared_info", "grant0", "grant1")
MAGIC = "fake-xend-lite-snapshot"
FILE_MAGIC = b"XLSNAP\r\n"


@dataclass
class Status:
    reason: str
    code: int = 0
    detail: str = ""


class FakeDomain:
    instances: list[FakeDomain] = []

    def __init__(self, config: Any, emit: Callable[[str, dict], None] | None = None):
        self.config = config
        self._emit = emit or (lambda _e, _d: None)
        self.image = getattr(config, "image", None)
        if self.image is not None and not os.path.exists(self.image):
            from xend_lite.errors import LoaderError

            raise LoaderError(f"guest image {self.image} does not exist")
        self.state = "created"
        self.status: Status | None = None
        self.overlays: dict[str, int | None] = {p: None for p in PAGES}
        self.console = bytearray()
        self.hypercalls = {"xen_version": 0, "memory_op": 0}
        self.calls: list[tuple[str, str]] = []  # (method, thread name)
        self.closed = False
        self.slow_save = float(os.environ.get("FAKE_DOMAIN_SAVE_SECONDS", "0"))
        self.slow_close = float(os.environ.get("FAKE_DOMAIN_CLOSE_SECONDS", "0"))
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.owner = VmOwner()         # the real owner: the daemon submits its commands here
        FakeDomain.instances.append(self)

    def _call(self, name: str) -> None:
        self.calls.append((name, threading.current_thread().name))

    # -- life cycle ---------------------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        self._call("start")
        if self.state != "created":
            raise StateError(f"machine is {self.state}, not created", self.state, ("created",))
        self.state = "paused" if paused else "running"
        self.console += b"fake guest: booted\n"
        self.hypercalls["xen_version"] += 1
        self._arm_script()

    def _arm_script(self) -> None:
        script = getattr(self.config, "cmdline", "") or ""
        for word in script.split():
            what, _, when = word.partition("@")
            reason, _, code = what.partition(":")
            if reason in ("poweroff", "reboot", "crash", "watchdog", "internal-error"):
                delay = int(when or "0") / 1000
                self._timer = threading.Timer(delay, self.guest_shutdown, (reason, int(code or 0)))
                self._timer.name = "vcpu0"
                self._timer.daemon = True
                self._timer.start()
                return

    def guest_shutdown(self, reason: str, code: int = 0) -> None:
        """What a vCPU thread does when the guest shuts down."""
        with self._lock:
            if self.status is not None:
                return
            self.status = Status(reason, code)
            self.state = "stopped"
        self.console += f"fake guest: {reason}\n".encode()
        data = {"reason": reason, "code": code}
        if reason in ("internal-error", "crash"):
            self._emit("GUEST_PANICKED", data)
        self._emit("SHUTDOWN", data)

    def pause(self) -> None:
        self._call("pause")
        if self.state == "running":
            self.state = "paused"

    def resume(self) -> None:
        self._call("resume")
        if self.state == "paused":
            self.state = "running"

    def reset(self) -> None:
        self._call("reset")
        was = self.state
        for p in self.overlays:
            self.overlays[p] = None
        if was == "stopped":
            self.status = None
            self.state = "running"
        self.console += b"fake guest: reset\n"
        self._emit("RESET", {"reason": "host"})

    def close(self) -> None:
        self._call("close")
        self.owner.close()
        if self.slow_close:
            time.sleep(self.slow_close)  # vCPUs that take their time to stop
        if self._timer is not None:
            self._timer.cancel()
        if not self.closed:
            self.closed = True
            with self._lock:
                first = self.status is None
                if first:
                    self.status = Status("stopped")
                self.state = "stopped"
            if first:
                self._emit("SHUTDOWN", {"reason": "stopped", "code": 0})

    def run_state(self) -> str:
        if self.state == "stopped":
            return "internal-error" if self.status and self.status.reason == "internal-error" else "shutdown"
        return self.state

    def shutdown_status(self) -> Status | None:
        return self.status

    # -- queries ------------------------------------------------------------------------

    def query_vcpus(self) -> list[dict]:
        self._call("query_vcpus")
        n = getattr(self.config, "vcpus", 1)
        return [{"cpu": i, "state": self.state, "rip": 0x100000 + i} for i in range(n)]

    def query_memory_map(self) -> list[dict]:
        self._call("query_memory_map")
        mem = getattr(self.config, "memory_mib", 128) << 20
        regions = [{"kind": "ram", "gpa": 0, "size": mem}]
        for page, gpa in self.overlays.items():
            if gpa is not None:
                regions.append({"kind": "overlay", "name": page, "gpa": gpa, "size": 4096})
        return regions

    def query_console(self, max_bytes: int = 4096) -> str:
        self._call("query_console")
        return bytes(self.console[-max_bytes:] if max_bytes else b"").decode("utf-8", "replace")

    def add_console_listener(self, fn: Callable[[bytes], None]) -> None:
        self.console_listeners = getattr(self, "console_listeners", []) + [fn]

    def console_write(self, data: bytes) -> dict:
        raise NotSupported("this VM is not in Xen mode: it has no Xen emulation")

    def xenstore(self, op: str, *args: Any) -> Any:
        raise NotSupported("this VM is not in Xen mode: it has no Xen emulation")

    def system_powerdown(self) -> None:
        raise NotSupported("this VM is not in Xen mode: it has no Xen emulation")

    def query_hypercalls(self) -> dict:
        self._call("query_hypercalls")
        return dict(self.hypercalls)

    def query_capabilities(self) -> dict:
        self._call("query_capabilities")
        return {"kvm": {"sync_regs": 7}, "backend": "fake", "xen_version": self.config.xen_version,
                "domid": self.config.domid}

    def query_xen_overlay(self) -> list[dict]:
        self._call("query_xen_overlay")
        return [{"page": p, "gpa": g} for p, g in self.overlays.items()]

    # -- overlay ------------------------------------------------------------------------

    def overlay_map(self, page: str, gpa: int, force: bool = False) -> dict:
        self._call("overlay_map")
        if page not in self.overlays:
            raise NotFound(f"no overlay page named {page!r}")
        if gpa == INVALID_GPA:
            return self.overlay_unmap(page)
        if gpa % 4096:
            raise InvalidArgument(f"gpa {gpa:#x} is not page aligned")
        self.overlays[page] = gpa
        self._emit("XEN_OVERLAY_MAPPED", {"page": page, "gpa": gpa})
        return {"page": page, "gpa": gpa}

    def overlay_unmap(self, page: str, force: bool = False) -> dict:
        self._call("overlay_unmap")
        if page not in self.overlays:
            raise NotFound(f"no overlay page named {page!r}")
        self.overlays[page] = None
        self._emit("XEN_OVERLAY_UNMAPPED", {"page": page})
        return {"page": page, "gpa": None}

    # -- snapshots ----------------------------------------------------------------------

    def snapshot_save(self, path: str, progress: Callable[[int, int], None] | None = None) -> dict:
        self._call("snapshot_save")
        if self.state != "paused":
            raise StateError("the VM must be paused to save it", self.run_state(), ("paused",))
        total = 4
        for i in range(total):
            if self.slow_save:
                time.sleep(self.slow_save / total)
            if progress:
                progress(i + 1, total)
        doc = {"magic": MAGIC, "overlays": self.overlays, "console": self.console.decode()}
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "wb") as f:     # the real file magic first: the daemon replaces
                f.write(FILE_MAGIC + json.dumps(doc).encode())   # only snapshots

            os.replace(tmp, path)
        except OSError as exc:
            raise SnapshotError(f"cannot write {path}: {exc.strerror}") from exc
        return {"path": path, "logical_size": os.path.getsize(path)}

    def snapshot_load(self, path: str, verify: bool = True) -> dict:
        self._call("snapshot_load")
        doc = self._read(path)
        self.overlays = dict(doc["overlays"])
        self.console = bytearray(doc["console"].encode())
        return {"path": path}

    @staticmethod
    def _read(path: str) -> dict:
        try:
            with open(path, "rb") as f:
                raw = f.read()
            doc = json.loads(raw[len(FILE_MAGIC):]) if raw.startswith(FILE_MAGIC) else None
        except FileNotFoundError:
            raise NotFound(f"snapshot {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{path} is not a snapshot: {exc}") from None
        if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
            raise SnapshotError(f"{path} is not a snapshot (bad magic)")
        return doc

    @staticmethod
    def snapshot_describe(path: str) -> dict:
        doc = FakeDomain._read(path)
        return {"path": path, "format": "fake", "pages": sorted(doc["overlays"])}
