"""The controller: the run-state machine, and the bridge from the event loop to the VM owner.

(Longer than most modules: every command is a pair, its upper half on the loop and its
bottom half on the owner, kept side by side so one command reads in one place.)

The event loop never touches the VM. It calls the controller's async methods (the upper
half), which refuse at once when the run state does not allow the command, then submit one
command to the VM's owner thread (machine/owner.py) and await its one reply (settled on
the loop from the owner's concurrent.futures.Future, see below). The command (the bottom half, the
``_``-prefixed methods) checks the state again where it runs, calls the VM (vmm.api.VmApi)
and moves the state machine. Building and closing the VM run on a worker thread.

Events from the Domain arrive on vCPU threads (or on the owner thread); they are stamped
where they happen and handed to the loop in order, through one queue (``_to_loop``) that
wakes the loop once for whatever is in it when it turns. A command's reply goes back through
the same queue, and what the command itself sends (its events, the run state) waits there
for the reply: a stop wakes the loop once for STOP, the new state and its reply, not three
times. (A long command, a save or a load, sends its events as they happen.) A guest
shutdown also moves the state and asks the loop to apply the poweroff/reboot policy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from xend_lite.daemon.console_stream import ConsoleHub
from xend_lite.daemon.runstate import ALL_STATES, RunState, check_state, requires
from xend_lite.daemon.snapdir import SnapshotDir
from xend_lite.errors import InvalidArgument, SnapshotError, StateError
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

if TYPE_CHECKING:
    from xend_lite.daemon.early import EarlyStart
    from xend_lite.daemon.jobs import SnapshotJob   # loaded by the first save or load
    from xend_lite.vmm.api import VmApi, VmFactory  # only named in annotations here

log = logging.getLogger("xend_lite.controller")

R = RunState

# The Domain's read-only methods the control plane may call.
QUERIES = frozenset({"query_vcpus", "query_memory_map", "query_console", "query_hypercalls",
                     "query_capabilities", "query_xen_overlay", "xen_event_list"})

# Reasons a guest run ends that the reboot policy handles; every other reason but "stopped"
# (the daemon's own stop) goes to the poweroff policy.
REBOOT_REASONS = ("reboot",)


def streams(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a long command (a save, a load): its events reach the loop as they happen
    (progress, STOP at its start), not held for its reply."""
    fn.streams = True  # type: ignore[attr-defined]
    return fn


class GuestStop(Frozen):
    """What the loop is told when the guest ends its run."""

    __slots__ = ("reason", "code")
    reason: str
    code: int

    def __init__(self, reason: str, code: int):
        _set(self, "reason", reason)
        _set(self, "code", code)


def exit_status_for(stop: GuestStop) -> int:
    """The daemon's exit status when a guest stop ends it: the guest's code for a poweroff
    (0 for a clean one), at least 1 for any other way of stopping."""
    code = stop.code if 0 <= stop.code <= 255 else 1
    if stop.reason == "poweroff":
        return code
    if stop.reason in REBOOT_REASONS:
        return 0
    return code or 1


class Controller:
    def __init__(self, factory: VmFactory, spec: Any, *, snapshot_dir: str = ".",
                 publish: Callable[[str, dict, float], None] | None = None,
                 on_guest_stop: Callable[[GuestStop], None] | None = None,
                 on_state: Callable[[RunState], None] | None = None,
                 incoming: Callable[[Any], Any] | None = None):
        self._factory = factory
        self._spec = spec
        # --incoming: what makes the standby VM and restores into it (vmm/incoming.py)
        self._make_incoming = incoming or _incoming
        self._incoming: Any = None
        self.snapshot_dir = snapshot_dir
        self.snapshots = SnapshotDir(snapshot_dir)
        self._publish = publish or (lambda _n, _d, _t: None)
        self._on_guest_stop = on_guest_stop or (lambda _s: None)
        self._on_state = on_state or (lambda _s: None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()     # the run state, set on the owner and the loop
        self._state = R.INCOMING if getattr(spec, "incoming", False) else R.CREATED
        self.transitions: list[tuple[RunState, RunState]] = []
        self.domain: VmApi | None = None
        self._closing = False
        self.console = ConsoleHub()       # console output to attached clients (loop only)
        self.stop_reason: str | None = None     # why the guest last stopped by itself
        self.job: SnapshotJob | None = None      # the save or load running now
        # calls for the loop, in order (_to_loop), and whether a wake for them is pending
        self._out: list[tuple[Callable[..., Any], tuple]] = []
        self._out_lock = threading.Lock()
        self._out_armed = False
        self._holder: int | None = None   # the owner thread while a command holds its calls

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> RunState:
        return self._state

    def _set_state(self, new: RunState) -> None:
        with self._lock:
            old = self._state
            if old == new:
                return
            self._state = new
            self.transitions.append((old, new))
        log.info("run state %s -> %s", old.value, new.value)
        self._to_loop(self._on_state, new)

    def _sync_state(self) -> RunState:
        """Take the state from the Domain after a command (the guest may have stopped while
        the command ran, so the Domain, not the command, has the last word)."""
        self._set_state(RunState.from_domain(self.domain.run_state()))
        return self._state

    # -- the VM owner ---------------------------------------------------------------------

    def attach_loop(self) -> None:
        self._loop = asyncio.get_running_loop()

    @property
    def busy(self) -> str | None:
        """What the VM owner is doing now, for diagnostics."""
        return None if self.domain is None else self.domain.owner.busy

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Submit one command to the VM owner and await its reply. Refuses up front when
        the command's allowed states exclude the current one."""
        allowed = getattr(fn, "allowed_states", None)
        if allowed is not None:
            check_state(self._state, allowed, fn.action)
        if self.domain is None or not self.domain.owner.alive:
            raise StateError("the VM is not running: it was not built or is closed", self._state.value)
        if self._loop is None:
            self.attach_loop()
        reply = self._loop.create_future()
        done = self.domain.owner.submit(fn if getattr(fn, "streams", False) else self._holding(fn), *args)
        # on the owner, once the command has run (or at once, here, if it already has)
        done.add_done_callback(lambda f: self._to_loop(_settle, reply, f))
        try:
            return await reply
        except asyncio.CancelledError:
            done.cancel()       # not run yet: it never will be
            raise

    def _holding(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` as a command whose calls for the loop wait for its reply."""
        def command(*args: Any) -> Any:
            self._holder = threading.get_ident()
            try:
                return fn(*args)
            finally:
                self._holder = None
        command.__name__ = getattr(fn, "__name__", "command")   # the owner's busy name
        return command

    # -- reaching the loop from any thread -----------------------------------------------

    def _to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` on the loop, after every call asked for before it. The loop is
        woken once for the calls queued until it takes them; a command that holds its calls
        (``_holding``) does not wake it: its reply will."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._out_lock:
            self._out.append((fn, args))
            if self._out_armed or self._holder == threading.get_ident():
                return
            self._out_armed = True
        try:
            loop.call_soon_threadsafe(self._run_out)
        except RuntimeError:  # the loop closed in between
            pass

    def _run_out(self) -> None:
        """On the loop: the calls queued by _to_loop, in order; the run state's listener
        (the service manager's STATUS=) a turn later, once a reply settled here has gone
        out: the client waits for that reply, and nobody for the status line."""
        with self._out_lock:
            calls, self._out = self._out, []
            self._out_armed = False
        states = []
        for fn, args in calls:
            if fn is self._on_state:
                states.append(args)
                continue
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - one failing call must not lose the others
                log.exception("a call from the VM to the event loop failed")
        for args in states:
            self._loop.call_soon(self._on_state, *args)

    def emit(self, name: str, data: dict | None = None) -> None:
        """Publish an event from any thread, stamped now, in order with the others."""
        self._to_loop(self._publish, name, dict(data or {}), time.time())

    def _domain_event(self, name: str, data: dict) -> None:
        """The Domain's emit: called on vCPU threads and on the owner thread."""
        data = dict(data or {})
        if name == "SHUTDOWN":
            reason = str(data.get("reason", "poweroff"))
            by_guest = reason != "stopped"
            data = {"guest": by_guest, **data}
            if by_guest and not self._closing:
                self.stop_reason = reason
                self._set_state(R.INTERNAL_ERROR if reason == "internal-error" else R.SHUTDOWN)
                self.emit(name, data)
                code = data.get("code", 0)
                self._to_loop(self._on_guest_stop, GuestStop(reason, code if isinstance(code, int) else 0))
                return
        self.emit(name, data)

    # -- upper half: called on the event loop -------------------------------------------

    async def build(self, early: EarlyStart | None = None) -> None:
        """Build the VM on a worker thread (the loop never blocks), or take over the one
        ``early`` is building."""
        check_state(self._state, (R.CREATED,), "build")
        if self.domain is None:
            self.attach_loop()
            if early is not None:
                early.attach(self._domain_event)
                self.domain = await asyncio.wrap_future(early.domain)
            else:
                self.domain = await asyncio.to_thread(self._factory, self._spec, self._domain_event)
            self.domain.add_console_listener(
                lambda data: self._to_loop(self.console.publish, bytes(data)))

    async def restore_at_start(self, path: str) -> dict:
        """Load ``path`` before boot: the operator's --restore path as it is, or a
        ConfinedPath from ``snapshots``."""
        return await self._call(self._restore_at_start, path)

    async def boot(self, paused: bool) -> RunState:
        return await self._call(self._boot, paused)

    async def stop(self) -> None:
        await self._call(self._stop)

    async def cont(self) -> None:
        await self._call(self._cont)

    async def system_reset(self) -> None:
        await self._call(self._system_reset)

    async def query(self, what: str, *args: Any) -> Any:
        return await self._call(self._query, what, *args)

    async def overlay_map(self, page: str, gpa: int, force: bool = False) -> Any:
        return await self._call(self._overlay_map, page, gpa, force)

    async def overlay_unmap(self, page: str, force: bool = False) -> Any:
        return await self._call(self._overlay_unmap, page, force)

    async def query_registers(self) -> list[dict]:
        return await self._call(self._query_registers)

    async def xen_event_inject(self, port: int) -> None:
        await self._call(self._xen_event_inject, port)

    async def read_memory(self, addr: int, size: int, cpu: int | None) -> bytes:
        return await self._call(self._read_memory, addr, size, cpu)

    async def write_memory(self, gpa: int, data: bytes) -> None:
        await self._call(self._write_memory, gpa, data)

    async def memory_dump(self, filename: str, addr: int, size: int, cpu: int | None) -> dict:
        path = self.snapshots.name(filename)
        self.snapshots.ensure()
        return await self._call(self._memory_dump, path, addr, size, cpu)

    async def snapshot_save(self, path: str, paused: bool = False) -> dict:
        return await self._call(self._snapshot_save, self.snapshots.for_save(path), paused)

    async def snapshot_load(self, path: str, verify: bool = True) -> dict:
        if self._state == R.INCOMING and self.domain is None:
            return await self._load_incoming(self.snapshots.for_load(path), verify)
        return await self._call(self._snapshot_load, self.snapshots.for_load(path), verify)

    async def warm_up(self) -> None:
        """--incoming, before the daemon reports ready (on a worker thread): load the code a
        restore runs for the first time (the VM stack, the snapshot reader, the guest
        image) and make the standby VM, so snapshot-load pays only for what the file
        decides."""
        self._incoming = await asyncio.to_thread(_warm_up, self._spec, self._make_incoming)

    async def _load_incoming(self, path: Any, verify: bool) -> dict:
        """--incoming: build the VM the snapshot describes, load it and run it, in one
        command on the standby VM's owner. Any failure closes what was built and leaves the
        daemon waiting, as before, for another file (with a new standby if it was spent).
        The reply says how long each step took (``phases``, in ms: ``queue`` to reach the
        owner, then ``open``, ``build``, ``load``, ``start``, and ``reply`` back to the loop)."""
        self._set_state(R.RESTORING)      # on the loop: a second load is refused from now
        t0 = time.monotonic()
        if self._incoming is None:
            self._incoming = await asyncio.to_thread(self._make_incoming, self._spec)
        incoming = self._incoming
        phases: dict[str, float] = {}
        try:
            domain, info = await asyncio.wrap_future(
                incoming.submit(self._restore_and_start, incoming, path, verify, phases,
                                time.perf_counter()))
        except BaseException:
            self._set_state(R.INCOMING)
            if not self._closing:
                await asyncio.to_thread(incoming.prepare)
            raise
        phases["reply"] = round((time.perf_counter() - phases.pop("_done")) * 1e3, 3)
        self.domain = domain
        self._sync_state()
        seconds = round(time.monotonic() - t0, 6)
        log.info("snapshot %s loaded into a new %d MiB VM in %.3f s (ms: %s)", path,
                 info["memory_mib"], seconds, ", ".join(f"{k} {v:g}" for k, v in phases.items()))
        self.emit("SNAPSHOT_LOADED", {"path": path, "seconds": seconds})
        self.emit("RESUME")
        return {"path": path, "seconds": seconds, "memory_mib": info["memory_mib"],
                "vcpus": info["vcpus"], "phases": phases}

    def _restore_and_start(self, incoming: Any, path: Any, verify: bool, phases: dict[str, float],
                           queued: float) -> tuple[VmApi, dict]:
        """Where the restore runs: build and load the VM, then run it."""
        phases["queue"] = round((time.perf_counter() - queued) * 1e3, 3)
        domain, info = incoming.restore(self._domain_event, path, verify, phases)
        t = time.perf_counter()
        try:
            domain.add_console_listener(lambda data: self._to_loop(self.console.publish, bytes(data)))
            domain.start(paused=False)
        except BaseException:
            domain.close()
            raise
        phases["_done"] = time.perf_counter()
        phases["start"] = round((phases["_done"] - t) * 1e3, 3)
        return domain, info

    async def snapshot_describe(self, path: str) -> dict:
        return await self._call(self._snapshot_describe, self.snapshots.for_load(path))

    async def console_write(self, data: bytes) -> dict:
        return await self._call(self._console_write, data)

    async def xenstore(self, op: str, *args: Any) -> Any:
        fn = self._xenstore_read if op in ("read", "ls") else self._xenstore_change
        return await self._call(fn, op, *args)

    async def system_powerdown(self) -> None:
        await self._call(self._system_powerdown)
    def snapshot_job(self) -> dict:
        """The save or load running now (answered on the loop: the owner is busy with it)."""
        job = self.job
        if job is None:
            from xend_lite.daemon.jobs import IDLE

            return dict(IDLE)
        return job.describe()

    async def close(self) -> None:
        """Stop the vCPUs and release the VM (console flushed); its owner thread ends."""
        self._closing = True
        if self._incoming is not None:
            await asyncio.to_thread(self._incoming.close)
        if self.domain is not None:
            try:
                await asyncio.to_thread(self.domain.close)
            except Exception:  # noqa: BLE001 - closing goes on whatever failed
                log.exception("closing the VM failed")
        self._set_state(R.SHUTDOWN)
        self.console.close()

    # -- bottom half: runs on the VM owner thread ----------------------------------------

    @streams
    @requires(R.CREATED)
    def _restore_at_start(self, path: str) -> dict:
        self._set_state(R.RESTORING)
        try:
            t0 = time.monotonic()
            info = self.domain.snapshot_load(path) or {}
            seconds = round(time.monotonic() - t0, 6)
        finally:
            self._set_state(R.CREATED)
        self.emit("SNAPSHOT_LOADED", {"path": path, "seconds": seconds})
        return dict(info, path=path, seconds=seconds)

    @requires(R.CREATED)
    def _boot(self, paused: bool) -> RunState:
        self.domain.start(paused=paused)
        return self._sync_state()

    @requires(R.RUNNING, R.PAUSED)
    def _stop(self) -> None:
        """Pause; on a paused VM nothing happens (as QMP's stop)."""
        if self._state == R.PAUSED:
            return
        self.domain.pause()
        if self._sync_state() == R.PAUSED:
            self.emit("STOP")

    @requires(R.PAUSED, R.RUNNING)
    def _cont(self) -> None:
        """Resume; on a running VM nothing happens (as QMP's cont)."""
        if self._state == R.RUNNING:
            return
        self.domain.resume()
        if self._sync_state() == R.RUNNING:
            self.emit("RESUME")

    @requires(R.RUNNING, R.PAUSED, R.SHUTDOWN, R.INTERNAL_ERROR)
    def _system_reset(self) -> None:
        self.domain.reset()
        self._sync_state()

    @requires(*ALL_STATES)
    def _query(self, what: str, *args: Any) -> Any:
        if what not in QUERIES:
            raise InvalidArgument(f"no query named {what}")
        return getattr(self.domain, what)(*args)

    @property
    def owner_alive(self) -> bool:
        """The VM owner lives (or, waiting for an incoming snapshot, there is none yet)."""
        if self.domain is None:
            return self._state in (R.INCOMING, R.RESTORING)
        return self.domain.owner.alive

    @requires(R.RUNNING, R.PAUSED)
    def _overlay_map(self, page: str, gpa: int, force: bool) -> Any:
        return self.domain.overlay_map(page, gpa, force)

    @requires(R.RUNNING, R.PAUSED)
    def _overlay_unmap(self, page: str, force: bool) -> Any:
        return self.domain.overlay_unmap(page, force)

    @requires(R.RUNNING, R.PAUSED)
    def _console_write(self, data: bytes) -> dict:
        return self.domain.console_write(data)

    @requires(*ALL_STATES)
    def _xenstore_read(self, op: str, *args: Any) -> Any:
        return self.domain.xenstore(op, *args)

    @requires(R.RUNNING, R.PAUSED)
    def _xenstore_change(self, op: str, *args: Any) -> Any:
        return self.domain.xenstore(op, *args)

    @requires(R.RUNNING, R.PAUSED)
    def _system_powerdown(self) -> None:
        self.domain.system_powerdown()
        self.emit("POWERDOWN")
    def _query_registers(self) -> list[dict]:
        return self.domain.query_registers()

    @requires(R.RUNNING, R.PAUSED)
    def _xen_event_inject(self, port: int) -> None:
        self.domain.xen_event_inject(port)

    @requires(R.RUNNING, R.PAUSED, R.SHUTDOWN, R.CREATED)
    def _read_memory(self, addr: int, size: int, cpu: int | None) -> bytes:
        if cpu is not None:
            check_state(self._state, (R.RUNNING, R.PAUSED), "a guest-virtual read")
        return self.domain.read_memory(addr, size, cpu)

    @requires(R.PAUSED)
    def _write_memory(self, gpa: int, data: bytes) -> None:
        """Only while paused: no vCPU is in the middle of reading what changes."""
        self.domain.write_memory(gpa, data)

    @requires(R.RUNNING, R.PAUSED, R.SHUTDOWN, R.CREATED)
    def _memory_dump(self, path: Any, addr: int, size: int, cpu: int | None) -> dict:
        if cpu is not None:
            check_state(self._state, (R.RUNNING, R.PAUSED), "a guest-virtual dump")
        return self.domain.memory_dump(path, addr, size, cpu)

    def _pause_for(self) -> bool:
        """Pause a running VM for a save or a load; True if it was running."""
        if self._state != R.RUNNING:
            return False
        self.domain.pause()
        if RunState.from_domain(self.domain.run_state()) != R.PAUSED:
            self._sync_state()
            check_state(self._state, (R.PAUSED,), "pausing the VM")
        self._set_state(R.PAUSED)
        self.emit("STOP")
        return True

    def _back_from(self, was_running: bool, stay_paused: bool) -> None:
        self._set_state(R.PAUSED)
        if was_running and not stay_paused:
            self.domain.resume()
            if self._sync_state() == R.RUNNING:
                self.emit("RESUME")
        else:
            self._sync_state()

    @streams
    @requires(R.RUNNING, R.PAUSED)
    def _snapshot_save(self, path: str, paused: bool) -> dict:
        from xend_lite.daemon.jobs import SnapshotJob

        was_running = self._pause_for()
        self._set_state(R.SAVING)
        t0 = time.monotonic()
        self.job = progress = SnapshotJob("save", str(path), self.emit)
        try:
            info = self.domain.snapshot_save(path, progress) or {}
        except BaseException:
            self._back_from(was_running, stay_paused=False)
            raise
        finally:
            self.job = None
        seconds = round(time.monotonic() - t0, 6)
        size = _file_size(path, info)
        log.info("snapshot saved to %s: %d bytes in %.2f s", path, size, seconds)
        self._back_from(was_running, stay_paused=paused)
        result = {"path": path, "size": size, "seconds": seconds}
        self.emit("SNAPSHOT_SAVED", result)
        return result

    @streams
    @requires(R.RUNNING, R.PAUSED)
    def _snapshot_load(self, path: str, verify: bool = True) -> dict:
        from xend_lite.daemon.jobs import SnapshotJob, memory_size

        was_running = self._pause_for()
        self._set_state(R.RESTORING)
        t0 = time.monotonic()
        self.job = job = SnapshotJob("load", str(path), self.emit)
        size = memory_size(self.domain, path)
        job(0, size)
        try:
            if verify:
                self.domain.snapshot_load(path)
            else:
                self.domain.snapshot_load(path, verify=False)
            job.finish()
        except BaseException:
            self._back_from(was_running, stay_paused=False)
            raise
        finally:
            self.job = None
        seconds = round(time.monotonic() - t0, 6)
        log.info("snapshot %s loaded in %.2f s", path, seconds)
        self._back_from(was_running, stay_paused=False)
        result = {"path": path, "seconds": seconds}
        self.emit("SNAPSHOT_LOADED", result)
        return result

    @requires(*ALL_STATES)
    def _snapshot_describe(self, path: str) -> dict:
        return type(self.domain).snapshot_describe(path)


def _settle(reply: asyncio.Future, done: concurrent.futures.Future) -> None:
    """On the loop: a command's outcome into the future its caller awaits."""
    if reply.cancelled():
        return
    if done.cancelled():
        reply.cancel()
        return
    exc = done.exception()
    if exc is not None:
        reply.set_exception(exc)
    else:
        reply.set_result(done.result())


def _warm_up(spec: Any, make_incoming: Callable[[Any], Any]) -> Any:
    import xend_lite.vmm.domain  # noqa: F401 - imported for its cost only
    from xend_lite.snapshot import reader
    from xend_lite.snapshot.state import check_state_class
    from xend_lite.vmm.persist import CLASSES

    for cls in CLASSES:          # their codecs are compiled once, at first use
        check_state_class(cls)
    reader.warm_up()
    incoming = make_incoming(spec)        # its prepare reads the guest image
    incoming.prepare()
    return incoming


def _incoming(spec: Any) -> Any:
    """The --incoming restorer (vmm/incoming.py), imported when first asked."""
    from xend_lite.vmm.incoming import Incoming

    return Incoming(spec)


def _file_size(path: str, info: Any) -> int:
    """The saved file's size as the save reported it (a stat by path is the fallback only:
    it would follow whatever a path leads to by now)."""
    for attr in ("logical_size", "size"):
        v = info.get(attr) if isinstance(info, dict) else getattr(info, attr, None)
        if isinstance(v, int):
            return v
    try:
        return os.stat(path).st_size
    except OSError:
        return 0

