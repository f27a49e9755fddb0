"""Restoring into a standby VM (vmm/incoming.py): the domain built on the snapshot's RAM ends
up as a load into an ordinary domain leaves it; a standby that cannot serve the snapshot
gives way to a VM built anew; a failed load spends the standby and a new one serves the
next load."""

from __future__ import annotations

import gc
import os

import pytest

from tests.xen.test_persist import SHINFO, counters, wait_for
from xend_lite.errors import SnapshotError
from xend_lite.snapshot import MemoryRegion, load_snapshot, save_snapshot
from xend_lite.vmm.domain import Domain
from xend_lite.vmm.incoming import Incoming
from xend_lite.vmm.persist import CLASSES
from xend_lite.vmm.spec import DomainSpec

pytestmark = pytest.mark.kvm

MIB = 48


@pytest.fixture
def saved(guest_image, tmp_path):
    """A 2-vCPU counting guest (it maps shared_info over RAM) saved paused: (spec, path)."""
    img = tmp_path / "counter64.elf"
    img.write_bytes(guest_image("xen/guests/counter64.S"))
    spec = DomainSpec(image=str(img), memory_mib=MIB, vcpus=2)
    d = Domain(spec)
    try:
        d.start()
        assert wait_for(lambda: counters(d)[1] > 20), d.machine.status
        d.pause()
        path = str(tmp_path / "counter.snap")
        d.snapshot_save(path)
    finally:
        d.close()
    return spec, path


@pytest.fixture
def incomings():
    made: list[Incoming] = []

    def make(spec: DomainSpec) -> Incoming:
        inc = Incoming(spec)
        made.append(inc)
        return inc
    yield make
    for inc in made:
        inc.close()


def ram(d: Domain) -> bytes:
    return bytes(d.machine.ram.view)


def test_standby_restore_leaves_the_guest_as_an_ordinary_load(saved, incomings):
    spec, path = saved
    plain = Domain(spec.replace(memory_mib=MIB, vcpus=2))
    try:
        plain.snapshot_load(path)
        want = ram(plain)
        want_regs = [r.vcpu.get_regs() for r in plain.machine.runners]
        want_map = plain.query_memory_map()
    finally:
        plain.close()
    inc = incomings(spec.replace(vcpus=1))          # the file decides: 2 vCPUs
    inc.prepare()
    standby = inc.standby
    assert standby is not None and len(standby.vcpus) == 1
    d, info = inc.restore(None, path)
    try:
        assert inc.standby is None and standby.adopted       # built on it, and spent
        assert d.machine.owner is standby.owner and d.machine.vm is standby.vm
        assert (info["memory_mib"], info["vcpus"]) == (MIB, 2)
        assert d.machine.ram.private                           # the file's pages, copy-on-write
        assert ram(d) == want                                  # byte for byte
        assert [r.vcpu.get_regs() for r in d.machine.runners] == want_regs
        assert d.query_memory_map() == want_map
        assert d.overlay.gpa("shared_info") == SHINFO
        before = counters(d)
        d.start()
        assert wait_for(lambda: counters(d)[0] > before[0] + 1000 and counters(d)[1] > before[1])
    finally:
        d.close()


def test_a_standby_with_more_vcpus_than_the_snapshot_gives_way_to_a_new_vm(saved, incomings):
    spec, path = saved
    inc = incomings(spec.replace(vcpus=4))
    inc.prepare()
    standby = inc.standby
    assert standby is not None and len(standby.vcpus) == 4
    d, info = inc.restore(None, path)
    try:
        assert inc.standby is None
        assert d.machine.vm is not standby.vm and standby.vm.fd < 0    # released
        assert info["vcpus"] == 2 and len(d.machine.runners) == 2
        before = counters(d)
        d.start()
        assert wait_for(lambda: counters(d)[0] > before[0] + 1000)
    finally:
        d.close()


def _with_bad_xen_state(path: str, out: str) -> None:
    """The same snapshot, its Xen state naming a vCPU the guest does not have: refused only
    once the domain is built (the check needs the platform)."""
    with load_snapshot(path, CLASSES) as snap:
        states = dict(snap.states)
        states["xen"].upcall_vectors = {"9": 0xF3}
        r = snap.region("ram")
        save_snapshot(out, states, [MemoryRegion("ram", 0, r.size, fd=snap.fd, offset=r.file_offset)])


def test_a_failed_load_spends_the_standby_and_a_new_one_serves_the_next(saved, incomings, tmp_path):
    spec, path = saved
    bad = str(tmp_path / "bad.snap")
    _with_bad_xen_state(path, bad)
    inc = incomings(spec.replace(vcpus=1))
    inc.prepare()
    first = inc.standby
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(SnapshotError, match="names vcpu 9"):
        inc.restore(None, bad)
    assert inc.standby is None and first.vm.fd < 0 and not first.owner.alive
    gc.collect()                     # mappings hold a descriptor until they are collected
    left = {os.readlink(f"/proc/self/fd/{f}") for f in set(os.listdir("/proc/self/fd")) - before}
    assert not left, left                                   # nothing of it left open
    with pytest.raises(SnapshotError):                      # a bad file does not spend it
        open(bad + "2", "wb").write(b"not a snapshot" * 300)
        inc.prepare()
        second = inc.standby
        inc.restore(None, bad + "2")
    assert inc.standby is second and second.owner.alive
    d, _ = inc.restore(None, path)
    try:
        assert d.machine.vm is second.vm
        before = counters(d)
        d.start()
        assert wait_for(lambda: counters(d)[0] > before[0] + 1000)
    finally:
        d.close()


def test_the_store_comes_from_the_snapshot_or_else_from_the_toolstack(saved, incomings, tmp_path):
    """A restored guest's xenstore is the saved one (the toolstack's tree is not written
    first); a snapshot saved before the store was (no xenstore section) gets the tree."""
    spec, path = saved
    plain = Domain(spec)
    try:
        plain.snapshot_load(path)
        want = plain.xenstore("read", "/local/domain/1/memory/target")
        plain.xenstore("write", "/local/domain/1/data/mark", b"from the guest")
        plain.pause()
        marked = str(tmp_path / "marked.snap")
        plain.snapshot_save(marked)
    finally:
        plain.close()
    nostore = str(tmp_path / "nostore.snap")
    with load_snapshot(path, CLASSES) as snap:
        states = {k: v for k, v in snap.states.items() if k != "xenstore"}
        r = snap.region("ram")
        save_snapshot(nostore, states, [MemoryRegion("ram", 0, r.size, fd=snap.fd, offset=r.file_offset)])
    inc = incomings(spec)
    for file, mark in ((marked, b"from the guest"), (nostore, None)):
        inc.prepare()
        d, _ = inc.restore(None, file)
        try:
            assert d.xen.tree_pending is None
            assert d.xenstore("read", "/local/domain/1/memory/target") == want
            if mark is None:
                assert "mark" not in d.xenstore("ls", "/local/domain/1/data")
            else:
                assert d.xenstore("read", "/local/domain/1/data/mark") == mark
        finally:
            d.close()


def test_the_guest_image_is_read_ahead_and_kept_for_a_reset(saved, incomings, tmp_path):
    """The waiting daemon reads its guest image with the standby: a load does not read it
    again (the file may be gone by then), and a reset of the restored guest boots it."""
    spec, path = saved
    img = tmp_path / "kept.elf"
    img.write_bytes(open(spec.image, "rb").read())
    inc = incomings(spec.replace(image=str(img)))
    inc.prepare()
    img.unlink()
    d, _ = inc.restore(None, path)
    try:
        d.start()
        assert wait_for(lambda: counters(d)[0] > 1000)
        d.reset()                                    # the image again, from memory
        assert wait_for(lambda: d.boot is not None and counters(d)[1] > 5)
    finally:
        d.close()
