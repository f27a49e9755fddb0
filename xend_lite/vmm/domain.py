"""Domain: one Xen HVM/PVH guest on KVM, built from a DomainSpec, and the operations the
daemon drives (it depends on them through api.VmApi).

This is where the parts are put together: the machine (RAM, vCPUs, console, VM owner), the
Xen platform (CPUID leaves, hypercalls, event channels, overlay device, console ring,
xenstore) and the guest image (Linux's direct hypercalls rewritten to reach the platform).
Every operation below runs on the VM owner: called from another thread it is handed there
and waited for. Guest-driven events reach ``emit`` from vCPU threads and the owner.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Callable

from xend_lite.errors import InvalidArgument, NotFound, NotSupported, StateError
from xend_lite.kvm import CAPABILITIES, Kvm
from xend_lite.machine.acpi import install as install_acpi
from xend_lite.machine.acpi import reserve as reserve_acpi
from xend_lite.machine.backing import INVALID_GPA, Backing
from xend_lite.machine.console import ConsoleSink
from xend_lite.machine.kernel import unpack_kernel
from xend_lite.machine.loader import BootInfo, load_image
from xend_lite.machine.machine import Machine, ShutdownStatus
from xend_lite.machine.owner import VmOwner
from xend_lite.machine.prepared import PreparedVm
from xend_lite.vmm.spec import DomainSpec, GuestImages
from xend_lite.xen.overlay import OverlayDevice
from xend_lite.xen.platform import OverlayChange, XenConfig, XenPlatform

if TYPE_CHECKING:
    from xend_lite.vmm.detach import RamDetach

log = logging.getLogger("xend_lite.domain")

Emit = Callable[[str, dict], None]


# vmcall and vmmcall: an image holding neither has nothing for hypercall_patch to rewrite
DIRECT_HYPERCALLS = (b"\x0f\x01\xc1", b"\x0f\x01\xd9")

#: set to 0 in the daemon's environment to serve every hypercall in Python (the switch for a
#: daemon whose configuration does not carry DomainSpec.native_hypercalls)
NATIVE_ENV = "XEND_LITE_NATIVE_HYPERCALLS"


def native_hypercalls_allowed() -> bool:
    return os.environ.get(NATIVE_ENV, "1").strip() not in ("0", "no", "off", "false")


class Domain:
    def __init__(self, config: Any, emit: Emit | None = None, *, prepared: PreparedVm | None = None,
                 ram: Backing | None = None, images: GuestImages | None = None):
        """``prepared``: a VM made ahead to build on (machine/prepared.py; its Kvm becomes
        this domain's). ``ram``: guest RAM that holds a guest already (a snapshot's mapping,
        see vmm/incoming.py): the image is then loaded only by a reset. The domain owns both
        from here on, whether it is built or not. ``images``: the spec's image and initrd,
        read already."""
        try:
            spec = config if isinstance(config, DomainSpec) else DomainSpec.from_config(config)
            if spec.memory_mib < 16 or spec.memory_mib > 1 << 20:
                raise InvalidArgument("memory must be between 16 MiB and 1 TiB")
            self.spec = spec
            self._emit = emit or (lambda _e, _d: None)
            images = images or GuestImages.read(spec)
            self.image, self.initrd = images.image, images.initrd
            self.kvm = prepared.kvm if prepared is not None else Kvm(spec.kvm_path)
        except BaseException:
            if prepared is not None:
                prepared.close()
                prepared.kvm.close()
            if ram is not None:
                ram.close()
            raise
        console = ConsoleSink(stdout=spec.console_stdout, log_path=spec.console_log)
        try:
            self.machine = Machine(self.kvm, spec.memory_mib << 20, spec.vcpus, console,
                                   prepared=prepared, ram=ram)
        except BaseException:
            if prepared is not None:
                prepared.close()     # when the machine did not take it
            if ram is not None:
                ram.close()
            self.kvm.close()
            raise
        self._closed = False
        self._detach_job: RamDetach | None = None
        self.detached = threading.Event()   # set once restored RAM no longer uses its file
        try:
            self.xen: XenPlatform | None = self._build_xen(store_tree=ram is None) \
                if spec.xen else None
            self.machine.add_shutdown_listener(self._on_shutdown)
            self.boot: BootInfo | None = None
            if ram is None:
                self.boot = self._load()
            elif self.xen is not None:
                reserve_acpi(self.machine)   # the tables are in the restored RAM
        except BaseException:
            self.close()
            raise

    def _build_xen(self, store_tree: bool = True) -> XenPlatform:
        s = self.spec
        kvm_xen = bool(self.kvm.check_extension(CAPABILITIES["xen_hvm"])) \
            if "xen_hvm" in CAPABILITIES else False
        cfg = XenConfig(xen_version=s.xen_version, domid=s.domid, grant_frames=s.grant_frames,
                        backend=s.backend, kvm_xen_available=kvm_xen, name=s.name,
                        native_hypercalls=s.native_hypercalls and native_hypercalls_allowed())
        return XenPlatform(self.machine, cfg, self._emit, store_tree=store_tree)

    def _load(self) -> BootInfo:
        """Load the image (and initrd); in Xen mode Linux's direct vmcall/vmmcall hypercalls
        are rewritten first so they reach the platform (logged once per image)."""
        image = self.image
        if self.xen is not None and self.spec.rewrite_hypercalls:
            image = self._rewrite_hypercalls(image)
        if self.xen is not None:
            install_acpi(self.machine)     # the tables a PVH guest finds its vCPUs in
        return load_image(self.machine, image, self.spec.cmdline, initrd=self.initrd)

    def _rewrite_hypercalls(self, image: bytes) -> bytes:
        elf = unpack_kernel(image).elf
        if not any(insn in elf for insn in DIRECT_HYPERCALLS):
            # no site at all (the embedded guest, a hypercall-page kernel): the patcher would
            # rewrite nothing and report nothing, so it is not even loaded
            return image
        from xend_lite.xen.hypercall_patch import patch_xen_hypercalls

        patched = patch_xen_hypercalls(elf)
        if not patched.patched:
            return image
        if not getattr(self, "_patch_logged", False):
            log.info("guest image calls Xen directly: rewrote %s so the calls reach xend-lite",
                     ", ".join(f"{p.routine} ({p.site.instruction})" for p in patched.patched))
            self._patch_logged = True
        return patched.image

    @property
    def owner(self) -> VmOwner:
        return self.machine.owner

    @property
    def overlay(self) -> OverlayDevice | None:
        return None if self.xen is None else self.xen.overlay

    def _xen(self) -> XenPlatform:
        if self.xen is None:
            raise NotSupported("this VM is not in Xen mode: it has no Xen emulation")
        return self.xen

    def _on_owner(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.machine.owner.run(fn, *args)

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
        """A system reset: power-on vCPU state, RAM cleared, Xen reset, image reloaded."""
        self._on_owner(self._reset)

    def _reset(self) -> None:
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
        self.boot = self._load()
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
        xen = getattr(self, "xen", None)
        try:
            if xen is not None:
                xen.close()
            self.machine.close()
            if xen is not None:
                xen.overlay.close()     # its pages, once no vCPU can reach them
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
        return self._xen().overlay.list()

    # -- the guest's console and xenstore, for the operator --------------------------------

    def add_console_listener(self, fn: Callable[[bytes], None]) -> None:
        """fn(bytes) gets every chunk of console output, on the thread that wrote it."""
        self.machine.console.add_listener(fn)

    def console_write(self, data: bytes) -> dict:
        """Operator input into the console ring's ``in`` (and an event to the guest): what
        the bounded input queue took of ``data``."""
        console = self._xen().console
        return {"taken": console.write_input(bytes(data)), "pending": console.pending_input()}

    def xenstore(self, op: str, *args: Any) -> Any:
        """A store operation as domain 0 (read, write, rm, ls), firing the guest's watches."""
        if op not in ("read", "write", "rm", "ls"):
            raise InvalidArgument(f"no xenstore operation named {op}")
        return self._xen().xenstore.call(op, *args)

    def system_powerdown(self) -> None:
        """Ask the guest to power off as a toolstack does: "poweroff" in control/shutdown."""
        self._xen().xenstore.call("write", "control/shutdown", b"poweroff")

    def query_counters(self) -> dict:
        """Exit counts per vCPU and the Xen counters, read without the owner (plain counters
        the vCPUs keep; a scrape sees each as it is at that moment)."""
        out: dict = {"exits": [dict(r.exit_counts) for r in self.machine.runners]}
        if self.xen is not None:
            out["hypercalls"] = self.xen.counters()
        return out

    # the inspection and event-channel tools are loaded when first used, not at start

    def query_registers(self) -> list[dict]:
        from xend_lite.vmm import inspect

        return inspect.registers(self.machine)

    def xen_event_list(self) -> list[dict]:
        from xend_lite.xen import evtchn_admin

        return evtchn_admin.event_list(self._xen().evtchn)

    def xen_event_inject(self, port: int) -> None:
        from xend_lite.xen import evtchn_admin

        evtchn_admin.event_inject(self._xen().evtchn, port)

    def read_memory(self, addr: int, size: int, cpu: int | None = None) -> bytes:
        """Guest-physical bytes, or guest-virtual ones in vCPU ``cpu``'s paging."""
        from xend_lite.vmm import inspect

        if cpu is None:
            return inspect.read_physical(self.machine, addr, size)
        return inspect.read_virtual(self.machine, cpu, addr, size)

    def write_memory(self, gpa: int, data: bytes) -> None:
        from xend_lite.vmm import inspect

        inspect.write_physical(self.machine, gpa, data)

    def memory_dump(self, path: Any, addr: int, size: int, cpu: int | None = None) -> dict:
        from xend_lite.vmm import inspect

        return inspect.dump(self.machine, path, addr, size, cpu)

    # -- overlay control -----------------------------------------------------------------

    def overlay_map(self, page: str, gpa: int, force: bool = False) -> dict:
        """The operator maps, moves or (at INVALID_GPA) unmaps an overlay page."""
        xen = self._xen()
        return self._on_owner(xen.change_overlay, OverlayChange(page, gpa, "operator", force))

    def overlay_unmap(self, page: str, force: bool = False) -> dict:
        return self.overlay_map(page, INVALID_GPA, force)

    # -- snapshots -----------------------------------------------------------------------

    def snapshot_save(self, path: Any, progress: Callable[[int, int], None] | None = None) -> dict:
        return self._on_owner(self._snapshot_save, path, progress)

    def _snapshot_save(self, path: Any, progress: Callable[[int, int], None] | None) -> dict:
        if self.machine.state not in ("paused", "stopped") and self.machine.pause_depth == 0:
            raise StateError("the VM must be paused to save it", self.run_state(), ("paused",))
        # snapshots are not needed to boot: their code is imported at the first save or load
        from xend_lite.vmm.persist import save_domain

        return save_domain(self, path, progress)

    def snapshot_load(self, path: Any, verify: bool = True) -> dict:
        """Load a snapshot; RAM then moves off the file in the background (see detached)."""
        return self._on_owner(self._snapshot_load, path, verify)

    def _snapshot_load(self, path: Any, verify: bool) -> dict:
        # a vCPU in KVM_RUN holds its vCPU fd: loading its registers would wait for ever
        if self.machine.state == "running" and self.machine.pause_depth == 0:
            raise StateError("the VM must be paused to load a snapshot into it", self.run_state(),
                             ("paused", "created", "stopped"))
        self._stop_detach()
        from xend_lite.vmm.persist import load_domain

        return self._detach_later(load_domain(self, path, verify), path)

    def restore_in_place(self, snap: Any, path: Any) -> dict:
        """Apply an open, validated snapshot to a domain built on its RAM (``ram`` from
        persist.ram_backing): vmm/incoming.py's restore."""
        return self._on_owner(self._restore_in_place, snap, path)

    def _restore_in_place(self, snap: Any, path: Any) -> dict:
        from xend_lite.vmm.persist import apply_snapshot

        return self._detach_later(apply_snapshot(self, snap, path, ram_in_place=True), path)

    def _detach_later(self, info: dict, path: Any) -> dict:
        """RAM restored from a file moves off it in the background (see ``detached``)."""
        from xend_lite.vmm.detach import RamDetach   # only a restore moves RAM off its file

        fd, offset = info.pop("_detach")
        self.detached.clear()
        self._detach_job = RamDetach(self.machine, fd, offset, os.fspath(path), self.detached)
        self._detach_job.schedule()
        return info

    def _stop_detach(self) -> None:
        job, self._detach_job = self._detach_job, None
        if job is not None:
            job.stop()

    @staticmethod
    def snapshot_describe(path: Any) -> dict:
        from xend_lite.snapshot import describe

        if not os.path.exists(path):
            raise NotFound(f"snapshot {os.fspath(path)} does not exist")
        return describe(path)
