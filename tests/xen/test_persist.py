"""Save a running domain and bring it back: in a fresh domain, twice, and refusing bad files."""

from __future__ import annotations

import hashlib
import os
import struct
import time

import pytest

from xend_lite.errors import SnapshotError
from xend_lite.vmm.domain import Domain
from xend_lite.xen.abi import SHINFO64
from xend_lite.vmm.spec import DomainSpec

pytestmark = pytest.mark.kvm

COUNTER = 0x300000
SHINFO = 0x800000


@pytest.fixture
def counter_image(guest_image, tmp_path):
    img = tmp_path / "counter64.elf"
    img.write_bytes(guest_image("xen/guests/counter64.S"))
    return str(img)


@pytest.fixture
def domains():
    made = []

    def make(image, **kw):
        kw.setdefault("memory_mib", 64)
        d = Domain(DomainSpec(image=image, **kw))
        made.append(d)
        return d
    yield make
    for d in made:
        d.close()


def counters(d):
    return struct.unpack("<QQQ", d.machine.mem.read(COUNTER, 24))


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def saved_running(domains, counter_image, path):
    a = domains(counter_image)
    a.start()
    assert wait_for(lambda: counters(a)[1] > 20), a.machine.status
    a.pause()
    info = a.snapshot_save(path)
    return a, counters(a), info


def test_restore_into_fresh_domain_goes_on(domains, counter_image, tmp_path):
    path = str(tmp_path / "snap.xls")
    a, (c0, h0, v0), info = saved_running(domains, counter_image, path)
    from xend_lite.snapshot import load_snapshot
    from xend_lite.vmm.persist import CLASSES

    with load_snapshot(path, CLASSES) as snap:      # the page as saved (a's keeps ticking)
        shinfo_a = snap.states["xen_overlay"].contents["shared_info"]
    assert info["size"] > 0 and os.path.getsize(path) == info["size"]
    assert os.stat(path).st_blocks * 512 < 16 << 20, "64 MiB of mostly empty RAM saves sparse"
    b = domains(counter_image)
    b.snapshot_load(path)
    assert counters(b) == (c0, h0, v0)
    assert b.overlay.gpa("shared_info") == SHINFO
    # as saved, but for vCPU 0's time record, made afresh for the TSC the guest has now,
    # and the wallclock, written again (the same time of day at system time zero)
    got = bytes(b.overlay.shared_info.view)
    wc = SHINFO64.wc_version
    assert got[:32] + got[64:wc] + got[wc + 12:] == shinfo_a[:32] + shinfo_a[64:wc] + shinfo_a[wc + 12:]
    sec = int.from_bytes(got[wc + 4:wc + 8], "little")
    assert abs(sec - int.from_bytes(shinfo_a[wc + 4:wc + 8], "little")) <= 1
    saved_time = int.from_bytes(shinfo_a[48:56], "little")
    assert int.from_bytes(got[48:56], "little") >= saved_time
    assert b.xen.hypercall_page == a.xen.hypercall_page
    calls_a = a.query_hypercalls()["hypercalls"]
    b.start()
    assert wait_for(lambda: counters(b)[1] > h0 + 20), b.machine.status
    c1, h1, v1 = counters(b)
    assert c1 > c0 and v1 == v0 == 4 << 16 | 16
    assert b.query_hypercalls()["hypercalls"]["xen_version"]["calls"] > calls_a["xen_version"]["calls"]
    # the guest in b still reaches shared_info through its mapping
    assert b.machine.mem.read(SHINFO + 3072, 16) == bytes(a.overlay.shared_info.view[3072:3088]) \
        or b.machine.mem.read(SHINFO + 3076, 4) != bytes(4)


def test_loading_into_a_running_domain_is_refused_at_once(domains, counter_image, tmp_path):
    """A running vCPU holds its fd inside KVM_RUN: a load that did not refuse would wait
    for ever on the first register write (it did). Refused, and the guest keeps running."""
    from xend_lite.errors import StateError

    path = str(tmp_path / "snap.xls")
    a, _, _ = saved_running(domains, counter_image, path)
    a.resume()
    t = time.monotonic()
    with pytest.raises(StateError, match="paused"):
        a.snapshot_load(path)
    assert time.monotonic() - t < 2
    h = counters(a)[1]
    assert wait_for(lambda: counters(a)[1] > h + 5), a.machine.status
    a.pause()
    a.snapshot_load(path)                              # paused: loads


def test_two_restores_are_independent_and_the_file_is_untouched(domains, counter_image, tmp_path):
    path = str(tmp_path / "snap.xls")
    saved_running(domains, counter_image, path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    b, c = domains(counter_image), domains(counter_image)
    b.snapshot_load(path)
    c.snapshot_load(path)
    b.machine.mem.write(0x500000, b"only in b")
    assert c.machine.mem.read(0x500000, 9) == bytes(9)
    b.start()
    c.start()
    assert wait_for(lambda: counters(b)[1] > 40 and counters(c)[1] > 40)
    b.close()
    c.close()
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest


@pytest.mark.parametrize("damage", ["magic", "section", "truncate", "memsize"])
def test_bad_snapshot_refused_and_vm_unchanged(domains, counter_image, tmp_path, damage):
    path = str(tmp_path / "snap.xls")
    a, before, _ = saved_running(domains, counter_image, path)
    data = bytearray(open(path, "rb").read())
    bad = str(tmp_path / "bad.xls")
    target = a
    if damage == "magic":
        data[0] ^= 0xFF
    elif damage == "section":
        data[200] ^= 0x55
    elif damage == "truncate":
        data = data[: len(data) // 2]
    open(bad, "wb").write(data if damage != "memsize" else open(path, "rb").read())
    if damage == "memsize":
        target = domains(counter_image, memory_mib=32)
    regs_before = target.machine.runners[0].vcpu.get_regs()
    with pytest.raises(SnapshotError):
        target.snapshot_load(bad)
    assert target.machine.runners[0].vcpu.get_regs() == regs_before
    if target is a:
        assert counters(a) == before
        assert a.overlay.gpa("shared_info") == SHINFO
        a.resume()
        assert wait_for(lambda: counters(a)[0] > before[0])


def test_states_round_trip_through_the_codec(domains, counter_image):
    from xend_lite.snapshot.state import decode_state, encode_state
    from xend_lite.xen.state import XenState
    from xend_lite.xen.state import OverlayState

    a = domains(counter_image)
    a.start()
    assert wait_for(lambda: counters(a)[1] > 5)
    a.pause()
    for st in (a.xen.persist.save()["xen"], a.overlay.save()):
        back = decode_state(type(st), type(st).NAME, type(st).VERSION, encode_state(st))
        assert back == st
    assert isinstance(a.overlay.save(), OverlayState) and isinstance(a.xen.persist.save()["xen"], XenState)
    assert a.overlay.save().gpas == {"shared_info": SHINFO}


def test_periodic_timers_are_saved_and_version_1_xen_state_still_loads(domains, counter_image):
    from dataclasses import asdict

    from xend_lite.errors import InvalidArgument
    from xend_lite.snapshot.codec import encode
    from xend_lite.snapshot.state import decode_state
    from xend_lite.xen.state import XenState

    a = domains(counter_image)
    a.start()
    assert wait_for(lambda: counters(a)[1] > 5)
    a.pause()
    a.xen.timers.set_periodic(0, 10**12)            # far enough not to fire meanwhile
    st = a.xen.persist.save()["xen"]
    b = domains(counter_image)

    def load(xen_state):
        states = b.xen.persist.save() | {"xen": xen_state}
        b.xen.persist.apply(b.xen.persist.prepare(states))
    load(st)
    assert b.xen.timers.periodics() == a.xen.timers.periodics()
    # a section saved before periodic timers existed: version 1, no such field
    old = {k: v for k, v in asdict(st).items() if k != "periodic"}
    v1 = decode_state(XenState, "xen", 1, encode(old))
    assert v1.periodic == {}
    load(v1)
    assert b.xen.timers.periodics() == {}
    # a period Xen would not accept is refused before anything changes
    with pytest.raises(InvalidArgument, match="periodic"):
        load(XenState(**(asdict(st) | {"periodic": {"0": [5, 0]}})))


def test_newer_or_malformed_overlay_section_refused(domains, counter_image, tmp_path, monkeypatch):
    from dataclasses import dataclass

    from xend_lite.snapshot import SectionVersionError
    from xend_lite.xen.state import OverlayState

    a = domains(counter_image)
    a.start()
    assert wait_for(lambda: counters(a)[1] > 5)
    a.pause()
    good = a.overlay.save()

    @dataclass
    class Future(OverlayState, register=False):
        VERSION = OverlayState.VERSION + 1

    newer = str(tmp_path / "newer.xls")
    monkeypatch.setattr(a.overlay, "save", lambda: Future(**good.__dict__))
    a.snapshot_save(newer)
    malformed = str(tmp_path / "malformed.xls")
    monkeypatch.setattr(a.overlay, "save", lambda: OverlayState(
        gpas={"shared_info": 0x800123}, long_mode=True, contents={}, grant_frames=64))
    a.snapshot_save(malformed)
    monkeypatch.undo()
    b = domains(counter_image)
    with pytest.raises(SectionVersionError):
        b.snapshot_load(newer)
    with pytest.raises(SnapshotError, match="aligned"):
        b.snapshot_load(malformed)
    assert b.overlay.gpa("shared_info") is None


def test_time_is_refreshed_every_second_and_never_steps_back(domains, counter_image):
    from xend_lite.xen.timekeeping import scale_delta

    d = domains(counter_image)
    d.start()
    assert wait_for(lambda: counters(d)[1] > 5)
    view = d.overlay.shared_info.view

    def record():
        ver, _pad, tsc, system, mul, shift = struct.unpack("<IIQQIb", bytes(view[32:61]))
        return ver, tsc, system, mul, shift
    first = record()
    assert wait_for(lambda: record()[0] != first[0], timeout=5), "no refresh within 5 s"
    second = record()
    assert second[0] % 2 == 0 and second[1] > first[1]
    # what a guest extrapolating from the first record sees at the second stamp is not later
    at_second = first[2] + scale_delta(second[1] - first[1], first[3], first[4])
    assert second[2] >= at_second
    assert abs(second[2] - d.xen.clock.now()) < 2 * 10**9
    # a guest scribbling the version field cannot break the refresh
    view[32:36] = b"\xff\xff\xff\xff"
    d.xen.time.refresh()
    assert record()[0] % 2 == 0 and d.machine.status is None


def test_flipped_bit_in_saved_ram_refused_unless_verification_is_skipped(domains, counter_image,
                                                                        tmp_path):
    from xend_lite.snapshot import MemoryChecksumMismatch, describe

    path = str(tmp_path / "snap.xls")
    saved_running(domains, counter_image, path)
    data = bytearray(open(path, "rb").read())
    mem_off = len(data) - describe(path)["memory_size"]   # RAM is the last thing in the file
    saved_count = int.from_bytes(data[mem_off + COUNTER:mem_off + COUNTER + 8], "little")
    data[mem_off + COUNTER + 3] ^= 0x40
    bad = str(tmp_path / "bad.xls")
    open(bad, "wb").write(data)
    b = domains(counter_image)
    regs = b.machine.runners[0].vcpu.get_regs()
    with pytest.raises(MemoryChecksumMismatch):
        b.snapshot_load(bad)
    assert b.machine.runners[0].vcpu.get_regs() == regs
    b.snapshot_load(bad, verify=False)      # the caller asked for speed over the check
    assert counters(b)[0] == saved_count ^ (0x40 << 24)


def test_restored_ram_moves_off_the_file_so_rewriting_it_is_harmless(domains, counter_image,
                                                                     tmp_path):
    path = str(tmp_path / "snap.xls")
    a, (c0, _h0, _v0), _ = saved_running(domains, counter_image, path)
    b = domains(counter_image)
    b.snapshot_load(path)
    b.machine.mem.write(0x500000, b"written before the move")   # a page written while on the file
    b.start()
    assert b.detached.wait(10), "RAM did not move off the snapshot file"
    assert not b.machine.ram.private
    with open(path, "r+b") as f:                 # rewrite it in place, then truncate it
        f.write(b"\xff" * 65536)
        f.truncate(4096)
    assert wait_for(lambda: counters(b)[0] > c0 + 1000)
    assert b.machine.mem.read(0x500000, 23) == b"written before the move"
    assert b.overlay.gpa("shared_info") == SHINFO and b.machine.status is None
    b.pause()
    b.snapshot_save(str(tmp_path / "again.xls"))     # and it saves from its own memory
    c = domains(counter_image)
    c.snapshot_load(str(tmp_path / "again.xls"))
    assert c.machine.mem.read(0x500000, 23) == b"written before the move"


def test_a_domain_closed_before_its_ram_moves_lets_go_of_the_file(domains, counter_image,
                                                                  tmp_path):
    """The move of RAM starts a while after the restore; a domain closed before then drops
    the snapshot's read lease and its descriptor, and no move starts."""
    import errno
    import threading

    path = str(tmp_path / "snap.xls")
    saved_running(domains, counter_image, path)
    b = domains(counter_image)
    b.snapshot_load(path)

    def writable() -> bool:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
            return True
        except OSError as exc:
            assert exc.errno == errno.EWOULDBLOCK, exc
            return False
    if writable():
        pytest.skip("this file system grants no read lease: nothing to let go of")
    b.close()
    assert writable()
    time.sleep(0.4)                 # past the delay a move would have started after
    assert not any(t.name == "ram-detach" for t in threading.enumerate())
    assert not b.detached.is_set()
