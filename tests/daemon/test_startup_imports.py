"""What the daemon's start imports, and what it leaves for later: aiohttp is imported without
loading the CA store into its unused client contexts (and the environment comes back as it
was), and the snapshot reader and writer wait for the first save or load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, os, sys
import xend_lite.daemon.main
import xend_lite.xen.domain
import aiohttp.connector as c
import ssl
out = {
    "env": {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "SSL_CERT_DIR")},
    "aiohttp_cas": c._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"],
    "later_cas": ssl.create_default_context().cert_store_stats()["x509_ca"],
    "snapshot": sorted(m for m in sys.modules if m.startswith("xend_lite.snapshot")),
    "persist": "xend_lite.xen.persist" in sys.modules,
}
from xend_lite.snapshot import load_snapshot, save_snapshot, State
out["lazy"] = [f.__module__ for f in (load_snapshot, save_snapshot, State)]
print(json.dumps(out))
"""


def _probe(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def _system_cas(env: dict[str, str]) -> int:
    code = "import ssl; print(ssl.create_default_context().cert_store_stats()['x509_ca'])"
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout)


def test_aiohttp_skips_the_ca_store_and_the_environment_is_restored():
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    got = _probe(env)
    assert got["env"] == {"SSL_CERT_FILE": None, "SSL_CERT_DIR": None}
    assert got["aiohttp_cas"] == 0
    assert got["later_cas"] == _system_cas(env)   # TLS set up later in the process sees the CAs


def test_a_given_ca_location_is_kept(tmp_path):
    env = dict(os.environ, SSL_CERT_FILE=str(tmp_path / "ca.pem"), SSL_CERT_DIR=str(tmp_path))
    got = _probe(env)
    assert got["env"] == {"SSL_CERT_FILE": str(tmp_path / "ca.pem"), "SSL_CERT_DIR": str(tmp_path)}


def test_booting_imports_no_snapshot_reader_or_writer():
    got = _probe(dict(os.environ))
    assert not got["persist"]
    assert not {"xend_lite.snapshot.reader", "xend_lite.snapshot.writer"} & set(got["snapshot"])
    assert got["lazy"] == ["xend_lite.snapshot.reader", "xend_lite.snapshot.writer",
                           "xend_lite.snapshot.state"]
