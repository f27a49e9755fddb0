"""Configuration: defaults, the documented TOML file, errors that name the key or option."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xend_lite.daemon import config as C
from xend_lite.daemon.main import build_parser, options_from
from xend_lite.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "config", "xend-lite.toml")


def write(tmp_path, text: str) -> str:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_example_file_holds_the_defaults():
    assert C.load_config(EXAMPLE) == C.build_config().with_overrides(config_file=EXAMPLE)


def test_example_file_documents_every_key():
    text = open(EXAMPLE).read()
    sections = re.findall(r"^\[(\w+)\]", text, re.M)
    assert sections == list(C.SECTIONS)
    for key in C.KEYS:
        assert re.search(rf"^{key.name} = ", text, re.M), key.dotted
        assert f"({key.option}" in text, f"{key.dotted} does not name its option {key.option}"


def test_every_key_has_an_option():
    parser = build_parser()
    options = {s for a in parser._actions for s in a.option_strings}
    for key in C.KEYS:
        assert key.option in options, key.option


def test_defaults():
    cfg = C.build_config()
    assert (cfg.image, cfg.memory_mib, cfg.vcpus, cfg.xen_version, cfg.domid) == (None, 128, 1, "4.16", 1)
    assert (cfg.backend, cfg.grant_frames, cfg.on_poweroff, cfg.on_reboot) == ("auto", 64, "exit", "reset")
    assert cfg.tcp is None and cfg.start_paused is False


def test_default_socket_paths():
    assert C.default_socket_path(0, {}) == "/run/xend-lite/xend-lite.sock"
    assert C.default_socket_path(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == \
        "/run/user/1000/xend-lite/xend-lite.sock"
    assert C.default_socket_path(1000, {}).startswith("/tmp/xend-lite-1000/")
    assert C.default_snapshot_dir(0, {}) == "/var/lib/xend-lite"
    assert C.default_snapshot_dir(0, {"STATE_DIRECTORY": "/var/lib/xend-lite/a"}) == "/var/lib/xend-lite/a"


def test_file_values_are_read(tmp_path):
    path = write(tmp_path, '[guest]\nmemory = 256\nvcpus = 2\ncmdline = "console=hvc0"\n'
                           'image = "/boot/guest"\n[control]\ntcp = ":8405"\ntoken_file = "/t"\n'
                           '[daemon]\nlog_level = "debug"\n')
    cfg = C.load_config(path)
    assert (cfg.memory_mib, cfg.vcpus, cfg.cmdline, cfg.image) == (256, 2, "console=hvc0", "/boot/guest")
    assert cfg.tcp == C.TcpAddress("127.0.0.1", 8405) and cfg.log_level == "debug"


def test_options_override_the_file(tmp_path):
    path = write(tmp_path, "[guest]\nmemory = 256\n")
    ns = build_parser().parse_args(["--memory", "512", "--config", path, "-S", "--socket", "/x.sock"])
    cfg = C.load_config(ns.config, options_from(ns))
    assert cfg.memory_mib == 512 and cfg.start_paused and cfg.socket == "/x.sock"
    ns = build_parser().parse_args(["--memory", "0x100"])
    assert options_from(ns)["memory_mib"] == 256


@pytest.mark.parametrize("text,needle", [
    ("[guest]\nmemroy = 1\n", "guest.memroy"),
    ("[gest]\nmemory = 1\n", "[gest]"),
    ("[guest]\nmemory = \"128\"\n", "guest.memory: must be an integer"),
    ("[guest]\nmemory = true\n", "guest.memory: must be an integer"),
    ("[guest]\nmemory = 1.5\n", "guest.memory: must be an integer"),
    ("[guest]\nmemory = 8\n", "guest.memory: must be between 16"),
    ("[guest]\nvcpus = 0\n", "guest.vcpus"),
    ("[guest]\nbackend = \"xen\"\n", "guest.backend: must be one of auto, userspace, kvm-xen"),
    ("[guest]\nxen_version = \"4\"\n", "guest.xen_version"),
    ("[guest]\nxen_version = 4.16\n", "guest.xen_version: must be a string"),
    ("[guest]\nstart_paused = \"yes\"\n", "guest.start_paused: must be true or false"),
    ("[guest]\non_poweroff = \"reset\"\n", "guest.on_poweroff"),
    ("[guest]\non_reboot = \"pause\"\n", "guest.on_reboot"),
    ("[guest]\ndomid = 0\n", "guest.domid"),
    ("[control]\ntcp = \"localhost\"\n", "control.tcp"),
    ("[control]\ntcp = \"example.com:80\"\n", "control.tcp"),
    ("[control]\ntcp = \"127.0.0.1:70000\"\n", "control.tcp"),
    ("[control]\ntcp = \"127.0.0.1:8405\"\n", "token_file"),
    ("[daemon]\nlog_level = \"loud\"\n", "daemon.log_level"),
    ("[daemon]\nsave_on_stop = \"/etc/shadow\"\n", "daemon.save_on_stop"),
    ("[daemon]\nsave_on_stop = \"../vm.xls\"\n", "daemon.save_on_stop"),
    ("guest = 3\n", "guest must be a table"),
    ("[guest\n", "not valid TOML"),
])
def test_bad_files_name_the_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        C.load_config(path)
    assert needle in str(e.value)


def test_save_on_stop_is_a_name_in_the_snapshot_directory(tmp_path):
    for name in ("vm.xls", "nightly/vm.xls"):
        assert C.load_config(write(tmp_path, f'[daemon]\nsave_on_stop = "{name}"\n')).save_on_stop == name
    assert C.load_config(write(tmp_path, '[daemon]\nsave_on_stop = ""\n')).save_on_stop is None


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        C.load_config("/nonexistent/x.toml")


@pytest.mark.parametrize("argv,needle", [
    (["--memory", "lots"], "--memory"),
    (["--memory", "4"], "--memory"),
    (["--backend", "qemu"], "--backend"),
    (["--tcp", "nowhere"], "--tcp"),
    (["--log-level", "verbose"], "--log-level"),
    (["--save-on-stop", "/var/lib/other/vm.xls"], "--save-on-stop"),
    (["--save-on-stop", "a/../../vm.xls"], "--save-on-stop"),
])
def test_bad_options_name_the_option(argv, needle):
    ns = build_parser().parse_args(argv)
    with pytest.raises(ConfigError) as e:
        C.load_config(None, options_from(ns))
    assert needle in str(e.value)


@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:8405", C.TcpAddress("127.0.0.1", 8405)),
    (":9", C.TcpAddress("127.0.0.1", 9)),
    ("[::1]:80", C.TcpAddress("::1", 80)),
    ("localhost:1", C.TcpAddress("localhost", 1)),
    ("0.0.0.0:1", C.TcpAddress("0.0.0.0", 1)),
    ("", None),
])
def test_parse_tcp(text, want):
    assert C.parse_tcp(text) == want


def test_loopback():
    assert C.TcpAddress("127.0.0.2", 1).is_loopback and C.TcpAddress("::1", 1).is_loopback
    assert not C.TcpAddress("0.0.0.0", 1).is_loopback


def test_read_token(tmp_path):
    p = tmp_path / "t"
    p.write_text("  abcdefghijklmnopqrstuvwxyz \n")
    p.chmod(0o600)
    assert C.read_token(str(p)) == "abcdefghijklmnopqrstuvwxyz"
    p.write_text("abc def ghi jkl mno pqr\n")
    with pytest.raises(ConfigError, match="white space"):
        C.read_token(str(p))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([k.name for k in C.KEYS] + ["bogus"]),
                       st.one_of(st.integers(-5, 1 << 21), st.booleans(), st.text(max_size=12),
                                 st.floats(allow_nan=False), st.lists(st.integers(), max_size=2))))
def test_any_guest_table_is_accepted_or_refused_by_name(tmp_path_factory, table):
    """Whatever a [guest] table holds, loading either works or names a key in its error."""
    import tomllib  # noqa: F401 - the writer below produces what tomllib reads

    lines = ["[guest]"]
    for k, v in table.items():
        lines.append(f"{k} = {_toml_value(v)}")
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text("\n".join(lines) + "\n")
    try:
        C.load_config(str(path))
    except ConfigError as exc:
        assert re.search(r"guest\.\w+", str(exc)), str(exc)


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if v == v and v not in (float("inf"), float("-inf")) else "0.5"
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v) + "]"
    if isinstance(v, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}"
                             for c in v) + '"'
    return str(v)
