"""save_on_stop: stopping the daemon saves the VM and the next start restores it; a guest
that powered off leaves nothing behind; a file that cannot be loaded is moved aside."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.daemon.test_process import REAL, base_args, ctl, spawn, stop, wait_listening

pytestmark = pytest.mark.kvm


@pytest.fixture
def sock(short_tmp):
    return os.path.join(short_tmp, "d.sock")


def hypercalls(sock: str) -> int:
    r = ctl(sock, "query-hypercalls")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["total"]


def wait_calls(sock: str, at_least: int, timeout: float = 15.0) -> int:
    end = time.monotonic() + timeout
    while (n := hypercalls(sock)) < at_least:
        assert time.monotonic() < end, f"only {n} hypercalls"
        time.sleep(0.1)
    return n


def test_stop_saves_and_next_start_restores(short_tmp, sock):
    args = base_args(short_tmp, sock) + ["--memory", "64", "--save-on-stop", "vm.xls"]
    saved = os.path.join(short_tmp, "vm.xls")
    p = spawn(args, cmd=REAL)
    wait_listening(p, sock)
    before = wait_calls(sock, 6)           # the default guest's boot calls plus some polls
    code, err = stop(p)
    assert code == 0, err
    assert os.path.getsize(saved) > 0 and "saved the VM for the next start" in err
    p = spawn(args, cmd=REAL)
    wait_listening(p, sock)
    # the counters came back with the VM: a fresh boot would start from zero
    assert hypercalls(sock) >= before
    console = json.loads(ctl(sock, "query-console").stdout)
    assert "shared_info mapped" in json.dumps(console)
    assert json.loads(ctl(sock, "query-status").stdout)["status"] == "running"
    code, err = stop(p)
    assert code == 0 and "restored the VM saved at the last stop" in err


def test_unloadable_save_is_moved_aside_and_the_guest_boots(short_tmp, sock):
    saved = os.path.join(short_tmp, "vm.xls")
    with open(saved, "wb") as f:
        f.write(b"not a snapshot" * 100)
    args = base_args(short_tmp, sock) + ["--memory", "64", "--save-on-stop", "vm.xls"]
    p = spawn(args, cmd=REAL)
    wait_listening(p, sock)
    assert json.loads(ctl(sock, "query-status").stdout)["status"] == "running"   # served: start done
    assert os.path.exists(saved + ".unloadable")
    wait_calls(sock, 3)
    code, err = stop(p)
    assert code == 0 and "cannot be loaded" in err


def test_guest_poweroff_leaves_no_save(short_tmp, sock, guest_image):
    """A guest that powered off (the daemon kept up by on_poweroff = pause) is not saved,
    and an older save is removed, so the next start boots afresh."""
    saved = os.path.join(short_tmp, "vm.xls")
    img = os.path.join(short_tmp, "poweroff64.elf")
    with open(img, "wb") as f:
        f.write(guest_image("daemon/guests/poweroff64.S"))
    args = base_args(short_tmp, sock) + ["--memory", "64", "--save-on-stop", "vm.xls",
                                          "--on-poweroff", "pause", "--image", img]
    p = spawn(args, cmd=REAL)
    wait_listening(p, sock)
    end = time.monotonic() + 15
    while json.loads(ctl(sock, "query-status").stdout)["status"] != "shutdown":
        assert time.monotonic() < end
        time.sleep(0.05)
    with open(saved, "wb") as f:
        f.write(b"an older save")
    code, err = stop(p)
    assert code == 0, err
    assert not os.path.exists(saved) and "boots afresh" in err
