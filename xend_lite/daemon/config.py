"""The daemon's configuration: one frozen ``DaemonConfig`` built from defaults, an optional
TOML file and command-line options, in that order of precedence.

Every key is declared once in ``KEYS`` (section, name, type, default, check); the TOML file
``config/xend-lite.toml`` documents each of them. An unknown key, a wrong type or a value out
of range is a ``ConfigError`` that names the key (``guest.memory``) or the option
(``--memory``), so the one-line start error tells the user exactly what to change.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any, Callable

from xend_lite.daemon.snapdir import check_config_name
from xend_lite.daemon.tokens import check_token_file
from xend_lite.errors import ConfigError
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

MiB = 1 << 20
BACKENDS = ("auto", "userspace", "kvm-xen")
LOG_LEVELS = ("debug", "info", "warning", "error")
ON_POWEROFF = ("exit", "pause")
ON_REBOOT = ("reset", "exit")


def default_socket_path(uid: int | None = None, env: dict[str, str] | None = None) -> str:
    """/run/xend-lite/xend-lite.sock for root, else under $XDG_RUNTIME_DIR (or /tmp as a
    last resort, in a directory named after the uid so users do not collide)."""
    uid = os.getuid() if uid is None else uid
    env = os.environ if env is None else env
    if uid == 0:
        return "/run/xend-lite/xend-lite.sock"
    runtime = env.get("XDG_RUNTIME_DIR") or f"/tmp/xend-lite-{uid}"
    return os.path.join(runtime, "xend-lite", "xend-lite.sock")


def default_snapshot_dir(uid: int | None = None, env: dict[str, str] | None = None) -> str:
    """/var/lib/xend-lite for root (systemd's StateDirectory), else $XDG_STATE_HOME/xend-lite."""
    uid = os.getuid() if uid is None else uid
    env = os.environ if env is None else env
    if env.get("STATE_DIRECTORY"):
        return env["STATE_DIRECTORY"].split(":")[0]
    if uid == 0:
        return "/var/lib/xend-lite"
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "xend-lite")


class TcpAddress(Frozen):
    __slots__ = ("host", "port")
    host: str
    port: int

    def __init__(self, host: str, port: int):
        _set(self, "host", host)
        _set(self, "port", port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


class DaemonConfig(Frozen):
    """Everything the daemon needs, validated. Field names shared with the Xen layer's
    DomainSpec (image ... kvm_path) feed it directly."""

    __slots__ = ("image", "initrd", "cmdline", "memory_mib", "vcpus", "xen_version", "domid",
                 "backend", "grant_frames", "console_log", "console_stdout", "start_paused",
                 "on_poweroff", "on_reboot", "kvm_path", "socket", "tcp", "token_file",
                 "snapshot_dir", "log_level", "save_on_stop", "restore", "incoming", "debug",
                 "config_file")
    # guest
    image: str | None
    initrd: str | None
    cmdline: str
    memory_mib: int
    vcpus: int
    xen_version: str
    domid: int
    backend: str
    grant_frames: int
    console_log: str | None
    console_stdout: bool
    start_paused: bool
    on_poweroff: str
    on_reboot: str
    kvm_path: str
    # control plane
    socket: str
    tcp: TcpAddress | None
    token_file: str | None
    # daemon
    snapshot_dir: str
    log_level: str
    save_on_stop: str | None
    # command line only
    restore: str | None
    incoming: bool      # build no VM until snapshot-load
    debug: bool
    config_file: str | None

    def __init__(self, image: str | None = None, initrd: str | None = None, cmdline: str = "",
                 memory_mib: int = 128, vcpus: int = 1, xen_version: str = "4.16", domid: int = 1,
                 backend: str = "auto", grant_frames: int = 64, console_log: str | None = None,
                 console_stdout: bool = False, start_paused: bool = False,
                 on_poweroff: str = "exit", on_reboot: str = "reset", kvm_path: str = "/dev/kvm",
                 socket: str = "", tcp: TcpAddress | None = None, token_file: str | None = None,
                 snapshot_dir: str = "", log_level: str = "info", save_on_stop: str | None = None,
                 restore: str | None = None, incoming: bool = False, debug: bool = False,
                 config_file: str | None = None):
        _set(self, "image", image)
        _set(self, "initrd", initrd)
        _set(self, "cmdline", cmdline)
        _set(self, "memory_mib", memory_mib)
        _set(self, "vcpus", vcpus)
        _set(self, "xen_version", xen_version)
        _set(self, "domid", domid)
        _set(self, "backend", backend)
        _set(self, "grant_frames", grant_frames)
        _set(self, "console_log", console_log)
        _set(self, "console_stdout", console_stdout)
        _set(self, "start_paused", start_paused)
        _set(self, "on_poweroff", on_poweroff)
        _set(self, "on_reboot", on_reboot)
        _set(self, "kvm_path", kvm_path)
        _set(self, "socket", socket or default_socket_path())
        _set(self, "tcp", tcp)
        _set(self, "token_file", token_file)
        _set(self, "snapshot_dir", snapshot_dir or default_snapshot_dir())
        _set(self, "log_level", log_level)
        _set(self, "save_on_stop", save_on_stop)
        _set(self, "restore", restore)
        _set(self, "incoming", incoming)
        _set(self, "debug", debug)
        _set(self, "config_file", config_file)
        if self.tcp is not None and not self.token_file:
            raise ConfigError("control.tcp is set but control.token_file is not: TCP needs a bearer "
                              "token (write one to a file and set control.token_file / --token-file)")

    def with_overrides(self, **kw: Any) -> DaemonConfig:
        return self.replace(**kw)


# -- checks: each takes the raw value and returns the normalized one or raises ValueError ---

def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int:
            raise TypeError(f"must be an integer, not {_type_name(v)}")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {v}")
        return v
    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise TypeError(f"must be a string, not {_type_name(v)}")
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {v!r}")
        return v
    return check


def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"must be a string, not {_type_name(v)}")
    if "\0" in v:
        raise ValueError("must not contain a NUL character")
    return v


def _optional_path(v: Any) -> str | None:
    """An empty string means "not set"."""
    v = _string(v)
    return os.path.expanduser(v) if v else None


def _optional_snapshot_name(v: Any) -> str | None:
    """A name in the snapshot directory (see snapdir.py); empty means "not set"."""
    v = _string(v)
    return check_config_name(v) if v else None


def _path(v: Any) -> str:
    v = _string(v)
    return os.path.expanduser(v) if v else ""


def _boolean(v: Any) -> bool:
    if type(v) is not bool:
        raise TypeError(f"must be true or false, not {_type_name(v)}")
    return v


def _xen_version(v: Any) -> str:
    v = _string(v)
    m = re.fullmatch(r"(\d{1,3})\.(\d{1,3})", v)
    if not m:
        raise ValueError(f"must look like MAJOR.MINOR (for example \"4.16\"), got {v!r}")
    if not 3 <= int(m.group(1)) <= 255:
        raise ValueError(f"major version must be between 3 and 255, got {m.group(1)}")
    return v


def parse_tcp(v: Any) -> TcpAddress | None:
    """"HOST:PORT", "[V6ADDR]:PORT" or ":PORT" (loopback); empty means no TCP listener."""
    v = _string(v).strip()
    if not v:
        return None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", v)
    if not m:
        raise ValueError(f"must be HOST:PORT or [IPV6]:PORT, got {v!r}")
    host = m.group(1) if m.group(1) is not None else (m.group(3) or "127.0.0.1")
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, got {port}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"host must be an IP address or localhost, got {host!r}") from None
    return TcpAddress(host, port)


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


class Key(Frozen):
    __slots__ = ("section", "name", "field", "check", "option")
    section: str
    name: str
    field: str
    check: Callable[[Any], Any]
    option: str  # the command-line option that sets it

    def __init__(self, section: str, name: str, field: str, check: Callable[[Any], Any],
                 option: str):
        _set(self, "section", section)
        _set(self, "name", name)
        _set(self, "field", field)
        _set(self, "check", check)
        _set(self, "option", option)

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"


KEYS: tuple[Key, ...] = (
    Key("guest", "image", "image", _optional_path, "--image"),
    Key("guest", "initrd", "initrd", _optional_path, "--initrd"),
    Key("guest", "cmdline", "cmdline", _string, "--cmdline"),
    Key("guest", "memory", "memory_mib", _int_in(16, 1 << 20), "--memory"),
    Key("guest", "vcpus", "vcpus", _int_in(1, 64), "--vcpus"),
    Key("guest", "xen_version", "xen_version", _xen_version, "--xen-version"),
    Key("guest", "domid", "domid", _int_in(1, 0x7FEF), "--domid"),
    Key("guest", "backend", "backend", _one_of(BACKENDS), "--backend"),
    Key("guest", "grant_frames", "grant_frames", _int_in(1, 1024), "--grant-frames"),
    Key("guest", "console_log", "console_log", _optional_path, "--console-log"),
    Key("guest", "console_stdout", "console_stdout", _boolean, "--console-stdout"),
    Key("guest", "start_paused", "start_paused", _boolean, "--paused"),
    Key("guest", "on_poweroff", "on_poweroff", _one_of(ON_POWEROFF), "--on-poweroff"),
    Key("guest", "on_reboot", "on_reboot", _one_of(ON_REBOOT), "--on-reboot"),
    Key("guest", "kvm_path", "kvm_path", _path, "--kvm"),
    Key("control", "socket", "socket", _path, "--socket"),
    Key("control", "tcp", "tcp", parse_tcp, "--tcp"),
    Key("control", "token_file", "token_file", _optional_path, "--token-file"),
    Key("daemon", "snapshot_dir", "snapshot_dir", _path, "--snapshot-dir"),
    Key("daemon", "log_level", "log_level", _one_of(LOG_LEVELS), "--log-level"),
    Key("daemon", "save_on_stop", "save_on_stop", _optional_snapshot_name, "--save-on-stop"),
)
KEYS_BY_FIELD = {k.field: k for k in KEYS}
SECTIONS = tuple(dict.fromkeys(k.section for k in KEYS))


def _check(key: Key, value: Any, where: str) -> Any:
    try:
        return key.check(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def read_toml(path: str) -> dict[str, Any]:
    """Validated field values from a TOML file. Errors name the file and the key."""
    import tomllib  # only a --config start reads TOML

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: check --config") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    known = {(k.section, k.name): k for k in KEYS}
    for section, table in doc.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}] (known: "
                              f"{', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}]), not {_type_name(table)}")
        for name, value in table.items():
            key = known.get((section, name))
            if key is None:
                names = ", ".join(k.name for k in KEYS if k.section == section)
                raise ConfigError(f"{path}: unknown key {section}.{name} (known in [{section}]: {names})")
            out[key.field] = _check(key, value, f"{path}: {key.dotted}")
    return out


def build_config(file_values: dict[str, Any] | None = None,
                 option_values: dict[str, Any] | None = None, **extra: Any) -> DaemonConfig:
    """Defaults, then the file's values, then command-line options (raw values, checked
    here and named by their option)."""
    values: dict[str, Any] = dict(file_values or {})
    for name, raw in (option_values or {}).items():
        key = KEYS_BY_FIELD[name]
        values[name] = _check(key, raw, key.option)
    for name, raw in extra.items():
        key = KEYS_BY_FIELD.get(name)
        values[name] = raw if key is None or (name == "tcp" and isinstance(raw, TcpAddress)) \
            else _check(key, raw, key.dotted)
    allowed = set(DaemonConfig.__slots__)
    unknown = set(values) - allowed
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    return DaemonConfig(**values)


def load_config(path: str | None = None, option_values: dict[str, Any] | None = None,
                **extra: Any) -> DaemonConfig:
    file_values = read_toml(path) if path else {}
    return build_config(file_values, option_values, config_file=path, **extra)


def read_token(path: str) -> str:
    """The bearer token: the file's content without surrounding white space. The file must
    be private to the daemon's user (tokens.py)."""
    try:
        with open(path, encoding="utf-8") as f:
            check_token_file(path, os.fstat(f.fileno()))
            token = f.read().strip()
    except FileNotFoundError:
        raise ConfigError(f"token file {path} does not exist: create it (for example "
                          f"`head -c 32 /dev/urandom | base64 > {path}; chmod 600 {path}`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token file {path} cannot be read: {exc}") from None
    if len(token) < 16:
        raise ConfigError(f"token file {path} holds a token shorter than 16 characters: "
                          "write a longer random token")
    if any(c.isspace() for c in token):
        raise ConfigError(f"token file {path} holds a token with white space inside: "
                          "write one token on one line")
    return token
