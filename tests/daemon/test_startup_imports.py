"""What the daemon's start imports, and what it leaves for later: asyncio and aiohttp come
without TLS (the daemon never uses it; ssl is given back for any other code), the
snapshot reader and writer wait for the first save or load, and the inspection tools and
the RAM detach for their first use (test_kvm.py uses them in a fresh daemon)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, os, sys
{first}
import xend_lite.daemon.main
import xend_lite.daemon.rpc, xend_lite.daemon.server, xend_lite.daemon.service
import xend_lite.vmm.domain
import asyncio.base_events, aiohttp.connector
out = {{
    "ssl_loaded": "ssl" in sys.modules,
    "asyncio_ssl": asyncio.base_events.ssl is not None,
    "aiohttp_ssl": aiohttp.connector.ssl is not None,
    "aiohttp_cas": (aiohttp.connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"]
                    if aiohttp.connector._SSL_CONTEXT_VERIFIED is not None else None),
    "env": {{k: os.environ.get(k) for k in ("SSL_CERT_FILE", "SSL_CERT_DIR")}},
    "snapshot": sorted(m for m in sys.modules if m.startswith("xend_lite.snapshot")),
    "persist": "xend_lite.vmm.persist" in sys.modules,
    "on_demand": sorted(m for m in ("xend_lite.vmm.inspect", "xend_lite.vmm.pagewalk",
                                    "xend_lite.vmm.detach") if m in sys.modules),
}}
import ssl
out["later_cas"] = ssl.create_default_context().cert_store_stats()["x509_ca"]
from xend_lite.snapshot import load_snapshot, save_snapshot, State
out["lazy"] = [f.__module__ for f in (load_snapshot, save_snapshot, State)]
print(json.dumps(out))
"""


def _run(code: str, env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout


def _probe(env: dict[str, str], first: str = "") -> dict:
    return json.loads(_run(PROBE.format(first=first), env))


def _system_cas(env: dict[str, str]) -> int:
    return int(_run("import ssl; print(ssl.create_default_context().cert_store_stats()['x509_ca'])", env))


def test_the_daemon_imports_its_web_stack_without_tls_and_gives_ssl_back():
    env = dict(os.environ)
    got = _probe(env)
    assert not got["ssl_loaded"]          # nothing the daemon starts with imports ssl
    assert not got["asyncio_ssl"] and not got["aiohttp_ssl"]
    assert got["env"] == {k: env.get(k) for k in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    assert got["later_cas"] == _system_cas(env)   # other code still gets a working ssl


def test_with_asyncio_already_imported_aiohttp_skips_the_ca_store_and_the_environment_is_restored(tmp_path):
    for given in ({}, {"SSL_CERT_FILE": str(tmp_path / "ca.pem"), "SSL_CERT_DIR": str(tmp_path)}):
        env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
        env.update(given)
        got = _probe(env, first="import asyncio")
        assert got["aiohttp_ssl"] and got["aiohttp_cas"] == 0
        assert got["env"] == {k: given.get(k) for k in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
        assert got["later_cas"] == _system_cas(env)


def test_booting_imports_no_snapshot_reader_or_writer():
    got = _probe(dict(os.environ))
    assert not got["persist"]
    assert not {"xend_lite.snapshot.reader", "xend_lite.snapshot.writer"} & set(got["snapshot"])
    assert got["lazy"] == ["xend_lite.snapshot.reader", "xend_lite.snapshot.writer",
                           "xend_lite.snapshot.state"]


def test_booting_imports_no_inspection_tools_or_ram_detach():
    assert _probe(dict(os.environ))["on_demand"] == []


COLLECTOR = r"""
import gc, json, os, sys, threading, time
sys.path.insert(0, os.getcwd())
collections = []
gc.callbacks.append(lambda phase, info: collections.append(1) if phase == "start" else None)
from xend_lite.cli import daemon as cli
seen = {}
if sys.argv[1] == "--version":
    collections.clear()      # what the command's own imports make run, nothing before
    rc = cli.main(["--version"])
    seen["collections_while_loading"] = len(collections)   # before anything else allocates
else:
    from tests.daemon.fakes import FakeDomain
    from xend_lite.daemon import main as daemon_main
    def watch():      # the daemon runs: is the collector on, then stop it
        while not os.path.exists(sys.argv[sys.argv.index("--socket") + 1]):
            time.sleep(0.01)
        time.sleep(0.2)
        seen["running"] = gc.isenabled()
        os.kill(os.getpid(), 15)
    threading.Thread(target=watch, daemon=True).start()
    real = daemon_main.main
    daemon_main.main = lambda argv, **kw: real(argv, domain_factory=FakeDomain, **kw)
    rc = cli.main(sys.argv[1:])
seen.setdefault("collections_while_loading", len(collections))
print(json.dumps({"rc": rc, "stack": "aiohttp" in sys.modules, "after": gc.isenabled(), **seen}))
"""


def _collector(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", COLLECTOR, *args], capture_output=True,
                         text=True, check=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    return json.loads(out.stdout.splitlines()[-1])


def test_the_command_loads_its_libraries_with_the_collector_off_and_gives_it_back():
    got = _collector("--version")
    assert got["rc"] == 0 and got["stack"]
    assert got["collections_while_loading"] == 0
    assert got["after"]


def test_with_incoming_the_collector_is_on_while_the_daemon_waits(short_tmp):
    sock = os.path.join(short_tmp, "in.sock")
    got = _collector("--incoming", "--socket", sock, "--snapshot-dir", short_tmp)
    assert got["rc"] == 0 and got["running"] and got["after"]
