"""--restore takes the VM's shape (memory, vCPUs, Xen settings) from the snapshot; an
explicit option or config key that conflicts is a clear error at start."""

from __future__ import annotations

import json
import os
import types

import pytest

from tests.daemon.test_process import REAL, ctl, one_line_error, run, spawn, stop, wait_listening
from xend_lite.daemon.restoreshape import with_shape
from xend_lite.errors import ConfigError

CFG = types.SimpleNamespace


def test_with_shape_fills_in_and_refuses_conflicts():
    from xend_lite.daemon.config import build_config

    cfg = build_config(restore="/x.snap", socket="/s", snapshot_dir="/d")
    shape = {"memory_mib": 64, "vcpus": 2, "xen_version": "4.13", "domid": 5, "grant_frames": 32}
    out = with_shape(cfg, shape, explicit=set())
    assert (out.memory_mib, out.vcpus, out.xen_version, out.domid, out.grant_frames) == \
        (64, 2, "4.13", 5, 32)
    # an explicit value that agrees is fine; one that differs names option, key and both values
    assert with_shape(cfg.with_overrides(vcpus=2), shape, {"vcpus"}).vcpus == 2
    with pytest.raises(ConfigError, match=r"--memory \(guest.memory\) is 128 MiB .* 64 MiB"):
        with_shape(cfg, shape, {"memory_mib"})
    with pytest.raises(ConfigError, match="--domid"):
        with_shape(cfg, shape, {"domid"})


@pytest.mark.kvm
def test_restore_needs_no_shape_options(short_tmp):
    sock = os.path.join(short_tmp, "d.sock")
    snap = os.path.join(short_tmp, "vm.snap")
    base = ["--socket", sock, "--snapshot-dir", short_tmp]
    proc = spawn(base + ["--memory", "48", "--vcpus", "2", "--domid", "7", "--grant-frames", "16"],
                 cmd=REAL)
    try:
        wait_listening(proc, sock, timeout=30)
        r = ctl(sock, "snapshot-save", "path=vm.snap")
        assert r.returncode == 0, r.stderr
    finally:
        assert stop(proc, timeout=20)[0] == 0

    proc = spawn(base + ["--restore", snap, "-S"], cmd=REAL)
    try:
        wait_listening(proc, sock, timeout=30)
        caps = json.loads(ctl(sock, "query-capabilities").stdout)
        assert caps["domid"] == 7
        assert len(json.loads(ctl(sock, "query-vcpus").stdout)) == 2
        assert json.loads(ctl(sock, "query-status").stdout)["status"] == "paused"
    finally:
        assert stop(proc, timeout=20)[0] == 0

    r = run(base + ["--restore", snap, "--memory", "128"], cmd=REAL)
    assert r.returncode == 78
    line = one_line_error(r)
    assert "--memory" in line and "128 MiB" in line and "48 MiB" in line
    conf = os.path.join(short_tmp, "c.toml")
    with open(conf, "w") as f:
        f.write("[guest]\nvcpus = 1\n")
    r = run(base + ["--config", conf, "--restore", snap], cmd=REAL)
    assert r.returncode == 78 and "guest.vcpus" in one_line_error(r)
    assert not os.path.exists(sock)
