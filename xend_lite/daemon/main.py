"""`xend-lite`: parse options and the config file, check what can be checked before any
work, then run the daemon. Start errors print one line (what, and how to fix it) and exit
with the status ExitCode gives them; tracebacks only with --debug or --log-level debug."""

from __future__ import annotations

import gc
import sys


def _import_web_stack() -> None:
    """Import asyncio and aiohttp.web without TLS. The daemon serves plain HTTP (on its Unix
    socket, and on TCP behind a bearer token) and makes no outgoing connections: it never
    uses TLS. Yet asyncio and aiohttp import ssl when they can, and aiohttp.web cannot be
    imported without aiohttp's client, which then builds two client TLS contexts, each
    loading the system CA bundle: about 45 ms and 4 MiB of the start, for nothing.

    So ssl is hidden while they are imported (they run as on a Python built without ssl:
    asyncio refuses TLS with a clear error) and given back at once for any other code. Where
    asyncio or ssl is already imported (tests, embedding), aiohttp is imported with OpenSSL
    pointed at no CA store instead, the environment restored right after."""
    if "aiohttp" in sys.modules:
        return
    if "asyncio" not in sys.modules and "ssl" not in sys.modules:
        sys.modules["ssl"] = None  # type: ignore[assignment] - import ssl now raises ImportError
        try:
            import aiohttp.web  # asyncio comes with it
        finally:
            del sys.modules["ssl"]
        return
    import os

    names = ("SSL_CERT_FILE", "SSL_CERT_DIR")
    saved = {name: os.environ.get(name) for name in names}
    try:
        for name in names:
            os.environ[name] = os.devnull
        import aiohttp.web  # noqa: F401
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_import_web_stack()

import argparse
import asyncio
import logging
import os
from typing import Any

from xend_lite.daemon.config import KEYS, load_config
from xend_lite.daemon.early import DomainFactory, EarlyStart, real_domain_factory
from xend_lite.daemon.exitcodes import ExitCode, StartError
from xend_lite.daemon.systemd import setup_logging
from xend_lite.errors import ConfigError

log = logging.getLogger("xend_lite.daemon")

INT_FIELDS = {"memory_mib", "vcpus", "domid", "grant_frames"}

EPILOG = """\
exit status:
  0   stopped by SIGTERM/SIGINT/quit, or the guest powered off cleanly (or rebooted with
      --on-reboot exit); a guest poweroff with a code exits with that code
  1   failure after start, or the guest crashed / stopped with an error
  2   unknown option            65  --restore snapshot missing or not loadable
  66  guest image missing/bad   69  /dev/kvm missing, not accessible or lacking features
  70  internal start error      73  control socket or TCP address in use
  78  invalid configuration (file or option values)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xend-lite", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Run one Xen HVM/PVH guest on KVM, controlled over JSON-RPC (POST /rpc) with "
                    "events at GET /events. Without options: the embedded default guest on the "
                    "default socket.")
    S = argparse.SUPPRESS  # noqa: N806 - options not given stay out of the namespace
    p.add_argument("--config", metavar="FILE", default=None, help="TOML config file (see "
                   "config/xend-lite.toml); options override it")
    g = p.add_argument_group("guest")
    g.add_argument("--image", dest="image", default=S, help="guest kernel image (default: the embedded guest)")
    g.add_argument("--initrd", dest="initrd", metavar="FILE", default=S,
                   help="initial ramdisk, the guest's first PVH module (default: none)")
    g.add_argument("--cmdline", dest="cmdline", default=S, help="guest command line")
    g.add_argument("--memory", "-m", dest="memory_mib", metavar="MIB", default=S, help="guest RAM in MiB (128)")
    g.add_argument("--vcpus", dest="vcpus", metavar="N", default=S, help="vCPUs (1)")
    g.add_argument("--xen-version", dest="xen_version", metavar="X.Y", default=S, help="Xen version shown (4.16)")
    g.add_argument("--domid", dest="domid", metavar="N", default=S, help="domain id (1)")
    g.add_argument("--backend", dest="backend", metavar="auto|userspace", default=S,
                   help="Xen emulation backend (auto = userspace; kvm-xen is not driven yet)")
    g.add_argument("--grant-frames", dest="grant_frames", metavar="N", default=S, help="grant frames (64)")
    g.add_argument("--console-log", dest="console_log", metavar="FILE", default=S, help="append the console here")
    g.add_argument("--console-stdout", dest="console_stdout", action=argparse.BooleanOptionalAction,
                   default=S, help="copy the console to stdout")
    g.add_argument("-S", "--paused", dest="start_paused", action="store_const", const=True, default=S,
                   help="create the VM paused (cont starts it)")
    g.add_argument("--on-poweroff", dest="on_poweroff", metavar="exit|pause", default=S,
                   help="when the guest powers off: exit (default) or stay up paused")
    g.add_argument("--on-reboot", dest="on_reboot", metavar="reset|exit", default=S,
                   help="when the guest reboots: reset it (default) or exit")
    g.add_argument("--kvm", dest="kvm_path", metavar="DEV", default=S, help="KVM device (/dev/kvm)")
    g.add_argument("--restore", metavar="PATH", default=None, help="load this snapshot file (any "
                   "path) before starting")
    g.add_argument("--incoming", action="store_true", help="build no VM: wait for snapshot-load, "
                   "which creates the VM the snapshot describes and runs it")
    c = p.add_argument_group("control plane")
    c.add_argument("--socket", dest="socket", metavar="PATH", default=S, help="Unix socket path")
    c.add_argument("--tcp", dest="tcp", metavar="HOST:PORT", default=S, help="also listen on TCP (needs --token-file)")
    c.add_argument("--token-file", dest="token_file", metavar="FILE", default=S, help="bearer token for TCP")
    d = p.add_argument_group("daemon")
    d.add_argument("--snapshot-dir", dest="snapshot_dir", metavar="DIR", default=S,
                   help="the directory snapshots live in (RPC paths are names inside it)")
    d.add_argument("--log-level", dest="log_level", metavar="LEVEL", default=S,
                   help="debug, info, warning or error (info)")
    d.add_argument("--save-on-stop", dest="save_on_stop", metavar="PATH", default=S,
                   help="save the VM to this name in the snapshot directory when the daemon is "
                        "stopped, and restore it at the next start")
    d.add_argument("--debug", action="store_true", help="debug logging and tracebacks of start errors")
    d.add_argument("--check", action="store_true", help="report what this host offers, then exit")
    d.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def options_from(ns: argparse.Namespace) -> dict[str, Any]:
    """Config field values from the options given, ints converted (a bad number is a
    ConfigError naming the option)."""
    option_of = {k.field: k.option for k in KEYS}
    out: dict[str, Any] = {}
    for key in KEYS:
        if not hasattr(ns, key.field):
            continue
        v = getattr(ns, key.field)
        if key.field in INT_FIELDS:
            try:
                v = int(v, 0)
            except ValueError:
                raise ConfigError(f"{option_of[key.field]}: must be an integer, got {v!r}") from None
        out[key.field] = v
    return out


def main(argv: list[str] | None = None, *, domain_factory: DomainFactory | None = None,
         collecting: bool | None = None) -> int:
    """The `xend-lite` entry point. ``domain_factory`` replaces the real Domain (tests).
    ``collecting``: the garbage collector was on before the caller turned it off
    (cli/daemon.py), for the early start to turn it on again at READY=1; None: it is as
    the caller left it."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.version:
        from xend_lite.daemon.methods import xend_lite_version

        print(f"xend-lite {xend_lite_version()}")
        return ExitCode.OK
    debug = ns.debug
    try:
        extra: dict[str, Any] = {"debug": debug}
        if ns.restore:
            extra["restore"] = os.path.abspath(ns.restore)
        if ns.incoming:
            if ns.restore:
                raise ConfigError("--incoming and --restore exclude each other: --incoming waits "
                                  "for snapshot-load, --restore loads the file at start")
            extra["incoming"] = True
        if debug:
            extra["log_level"] = "debug"
        options = options_from(ns)
        cfg = load_config(ns.config, options, **extra)
        # the real Domain's snapshots hold the VM's shape (a stand-in's have their own format)
        if cfg.restore is not None and domain_factory is None and os.path.isfile(cfg.restore):
            cfg = shape_from_snapshot(cfg, ns.config, options)
    except ConfigError as exc:
        return _start_failed(StartError(ExitCode.CONFIG, str(exc)), debug)
    except StartError as exc:
        return _start_failed(exc, debug)
    debug = debug or cfg.log_level == "debug"
    setup_logging(cfg.log_level)
    if ns.check:
        return run_check(cfg)
    real = domain_factory is None
    try:
        preflight(cfg, check_kvm=real)
        factory = domain_factory or real_domain_factory
        # sockets bound and the VM building (early.py) while the rest of the daemon loads
        early = None if cfg.incoming else EarlyStart(cfg, factory, collecting=collecting)
        if early is None and collecting:
            gc.enable()     # --incoming: no early start to give the collector back
        try:
            from xend_lite.daemon.service import Daemon

            daemon = Daemon(cfg, factory, early=early)
        except BaseException:
            if early is not None:
                early.abandon()
            raise
        return asyncio.run(daemon.run())
    except StartError as exc:
        return _start_failed(exc, debug)
    except KeyboardInterrupt:
        return ExitCode.OK


def shape_from_snapshot(cfg: Any, config_file: str | None, options: dict[str, Any]) -> Any:
    """The configuration with the --restore snapshot's VM shape (restoreshape.py)."""
    from xend_lite.daemon.config import read_toml
    from xend_lite.daemon.restoreshape import with_shape
    from xend_lite.errors import SnapshotError
    from xend_lite.vmm.persist import snapshot_shape

    explicit = set(options) | set(read_toml(config_file) if config_file else ())
    try:
        shape = snapshot_shape(cfg.restore)
    except (SnapshotError, OSError) as exc:
        raise StartError(ExitCode.SNAPSHOT, f"snapshot {cfg.restore} cannot be loaded: {exc}: "
                                            "check the path given with --restore") from exc
    return with_shape(cfg, shape, explicit)


def _start_failed(exc: StartError, debug: bool) -> int:
    if debug:
        logging.getLogger("xend_lite.daemon").error("start failed", exc_info=exc)
    print(f"xend-lite: {exc}", file=sys.stderr)
    return int(exc.code)


def preflight(cfg: Any, check_kvm: bool = True) -> None:
    """The checks that need no VM: KVM access, the image and the snapshot exist."""
    if check_kvm:
        if not os.path.exists(cfg.kvm_path):
            raise StartError(ExitCode.KVM, f"{cfg.kvm_path} does not exist: load the kvm module "
                                           "(modprobe kvm_intel or kvm_amd) and enable virtualization "
                                           "in the firmware")
        if not os.access(cfg.kvm_path, os.R_OK | os.W_OK):
            raise StartError(ExitCode.KVM, f"no permission to use {cfg.kvm_path} as uid {os.getuid()}: "
                                           "run as root or add the user to the kvm group")
    for what, path, key in (("guest image", cfg.image, "image"),
                            ("initrd", getattr(cfg, "initrd", None), "initrd")):
        if path is None:
            continue
        if not os.path.exists(path):
            raise StartError(ExitCode.IMAGE, f"{what} {path} does not exist: check --{key} "
                                             f"(or guest.{key} in the config)")
        if not os.access(path, os.R_OK) or os.path.isdir(path):
            raise StartError(ExitCode.IMAGE, f"{what} {path} is not a readable file: check "
                                             "its path and permissions")
    if cfg.restore is not None and not os.path.isfile(cfg.restore):
        raise StartError(ExitCode.SNAPSHOT, f"snapshot {cfg.restore} does not exist: check --restore")


def usable_backend(report: Any, requested: str) -> None:
    """Name in ``report`` the backend the daemon will really use, as the Domain chooses it;
    one it would refuse is a problem, not a usable backend."""
    from xend_lite.errors import XendLiteError
    from xend_lite.xen.overlay import choose_backend

    if not report.ok and report.backend is None:
        return
    try:
        report.backend = choose_backend(requested, report.capabilities.get("xen_hvm", 0) > 0)
    except XendLiteError as exc:
        report.backend = None
        report.problems.append(str(exc))
        report.ok = False


def run_check(cfg: Any) -> int:
    import json

    from xend_lite.machine.hostcheck import check_host

    report = check_host(cfg.kvm_path, cfg.backend)
    usable_backend(report, cfg.backend)
    d = report.as_dict()
    print(f"kvm device: {d['kvm']}")
    print(f"backend:    {d['backend'] or '-'}")
    if d["capabilities"]:
        print("capabilities: " + json.dumps(d["capabilities"], sort_keys=True))
    for problem in d["problems"]:
        print(f"problem: {problem}")
    print(report.quirks_line())
    print(report.limits_line())
    print(report.speed_line())
    print("ok: this host can run xend-lite" if report.ok else "not ok: fix the problems above")
    return ExitCode.OK if report.ok else ExitCode.KVM


if __name__ == "__main__":
    sys.exit(main())
