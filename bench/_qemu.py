"""QEMU as the baseline of the side-by-side benchmarks: find (or install) qemu-system-x86_64,
its guest (a 512-byte boot sector that writes a marker to COM1 and spins), a process
wrapper, and a raw-socket QMP client of the same weight as bench._xl.Rpc."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench._harness import Skip, file_tail, stop_process

_INSTALL_TRIED = False


def qemu_binary() -> str:
    """qemu-system-x86_64, installed with apt-get when missing and we are root; else Skip."""
    global _INSTALL_TRIED
    exe = shutil.which("qemu-system-x86_64")
    if exe:
        return exe
    if not _INSTALL_TRIED and os.geteuid() == 0 and shutil.which("apt-get"):
        _INSTALL_TRIED = True
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "qemu-system-x86"], env=env,
                              capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600, check=False)
            subprocess.run(["apt-get", "install", "-y", "-q", "qemu-system-x86"], env=env,
                           capture_output=True, text=True, timeout=900, check=False)
        exe = shutil.which("qemu-system-x86_64")
        if exe:
            return exe
    raise Skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86), so there is "
               "no same-run baseline")


# cli ; mov dx, 0x3f8 ; then '<', 'Q', '>' each by mov al, c ; out dx, al ; then jmp $  (real
# mode, loaded at 0x7c00). Interrupts stay off so no BIOS code runs once it spins (the
# snapshot benchmark fills guest RAM with random bytes under it). SeaBIOS prints its banner
# on COM1 first: '<' (never in SeaBIOS's text) marks the guest's first output.
BOOT_CODE = bytes([0xFA, 0xBA, 0xF8, 0x03, 0xB0, 0x3C, 0xEE, 0xB0, 0x51, 0xEE, 0xB0, 0x3E, 0xEE, 0xEB, 0xFE])
SERIAL_MARKER = b"<"


# mov dx, 0x3f8 ; mov al, '<' ; out dx, al ; sti ; 1: hlt ; jmp 1b : an idle guest, woken
# only by the BIOS's timer interrupt, that marks on COM1 when it got there
IDLE_CODE = bytes([0xBA, 0xF8, 0x03, 0xB0, 0x3C, 0xEE, 0xFB, 0xF4, 0xEB, 0xFD])


def boot_sector(workdir: Path, code: bytes = BOOT_CODE, name: str = "qemu-spin") -> Path:
    path = workdir / f"{name}.img"
    data = code + bytes(510 - len(code)) + b"\x55\xaa"
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    return path


class QmpError(RuntimeError):
    pass


class Qmp:
    """One QMP connection: greeting read, capabilities negotiated by ``handshake``."""

    def __init__(self, path: str, timeout: float = 120.0, handshake: bool = True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events: list[dict] = []
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise QmpError(f"unexpected greeting {self.greeting!r}")
        if handshake:
            self.call("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 1:]
                if line.strip():
                    return json.loads(line)
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError("QEMU closed the QMP connection")
            self.buf += chunk

    def request_bytes(self, command: str, arguments: dict | None = None) -> bytes:
        req: dict = {"execute": command}
        if arguments is not None:
            req["arguments"] = arguments
        return json.dumps(req, separators=(",", ":")).encode() + b"\n"

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> dict:
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def call(self, command: str, arguments: dict | None = None):
        self.sock.sendall(self.request_bytes(command, arguments))
        reply = self.read_reply()
        if "error" in reply:
            raise QmpError(f"{command}: {reply['error'].get('desc')}")
        return reply.get("return")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Qemu:
    """A qemu-system-x86_64 -accel kvm process with a QMP socket in its own temporary
    directory. ``memfd=True`` backs guest RAM with a memfd (so RSS shows it apart, and the
    host can write into it through /proc/PID/fd). ``kernel`` boots that PVH ELF directly on
    the microvm machine (qboot, no SeaBIOS) instead of the boot sector, its port 0xe9
    output going to ``serial``. ``idle`` boots a sector that halts with interrupts on
    instead of spinning."""

    def __init__(self, workdir: Path, memory_mib: int = 128, *, vcpus: int = 1, memfd: bool = False,
                 serial: bool = False, incoming: str | None = None, extra: list[str] | None = None,
                 monitors: int = 1, kernel: str | None = None, idle: bool = False):
        exe = qemu_binary()
        self.dir = tempfile.mkdtemp(prefix="qemu-bench-")
        # A QMP chardev serves one client at a time: one monitor per concurrent connection.
        self.qmp_paths = [os.path.join(self.dir, f"qmp{i}.sock") for i in range(monitors)]
        self.qmp_path = self.qmp_paths[0]
        self.serial = os.path.join(self.dir, "serial.log") if serial else None
        argv = [exe, "-accel", "kvm", "-m", str(memory_mib), "-smp", str(vcpus), "-nographic",
                "-nodefaults", "-display", "none", "-no-user-config",
                *(("-M", "microvm", "-kernel", kernel) if kernel else
                  ("-drive", f"file={boot_sector(workdir, *((IDLE_CODE, 'qemu-idle') if idle else ()))},"
                   "format=raw,if=ide")),
                *(a for p in self.qmp_paths for a in ("-qmp", f"unix:{p},server=on,wait=off"))]
        if memfd:
            argv += ["-object", f"memory-backend-memfd,id=ram0,size={memory_mib}M",
                     "-machine", "memory-backend=ram0"]
        if serial and kernel:  # xend-lite's guests print on the debug port
            argv += ["-chardev", f"file,id=dbg,path={self.serial}", "-device",
                     "isa-debugcon,iobase=0xe9,chardev=dbg"]
        elif serial:
            argv += ["-serial", f"file:{self.serial}"]
        if incoming:
            argv += ["-incoming", incoming]
        argv += extra or []
        self.argv = argv
        self.stderr = open(os.path.join(self.dir, "stderr"), "w+b")
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        return file_tail(self.stderr)

    def wait_qmp(self, timeout: float = 60.0, handshake: bool = True, monitor: int = 0) -> Qmp:
        """Poll until QMP socket number ``monitor`` greets; ``t_greeting`` is when it did."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                q = Qmp(self.qmp_paths[monitor], handshake=False)
                self.t_greeting = time.perf_counter()
                if handshake:
                    q.call("qmp_capabilities")
                return q
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            if self.proc.poll() is not None:  # the baseline cannot run here: not our failure
                raise Skip(f"QEMU exited with status {self.proc.returncode} before its QMP socket "
                           f"answered: {self.stderr_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError("QEMU's QMP socket never answered")
            time.sleep(0.0005)

    def close(self) -> None:
        stop_process(self.proc)
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Qemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
