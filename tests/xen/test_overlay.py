"""The overlay device: shared_info and grant frames over guest RAM, from the guest and the host."""

from __future__ import annotations

import struct
import time

import pytest

from tests.xen.conftest import SCRATCH, errno
from xend_lite.errors import InvalidArgument, NotFound
from xend_lite.xen.xenabi import X
from xend_lite.machine.backing import INVALID_GPA

pytestmark = pytest.mark.kvm

MEM = X.__HYPERVISOR_memory_op
GNT = X.__HYPERVISOR_grant_table_op


def xatp(bits, space, idx, gpfn, domid=X.DOMID_SELF):
    if bits == 64:
        return struct.pack("<HHIQQ", domid, 0, space, idx, gpfn)
    return struct.pack("<HHIII", domid, 0, space, idx, gpfn)


def test_map_move_unmap_from_the_guest_keeps_ram_beneath(harness):
    h, m, p, b = harness, harness.mem, harness.ptr, harness.bits
    all_ones = (1 << b) - 1
    ram = bytes(range(256)) * 16
    for gfn in (0x800, 0x801, 0x0):
        m.write(gfn << 12, ram) if gfn else None
    calls = []
    plans = [
        (X.XENMAPSPACE_shared_info, 0, 0x800, 0),
        (X.XENMAPSPACE_shared_info, 0, 0x801, 0),            # move
        (X.XENMAPSPACE_grant_table, 0, 0x800, 0),
        (X.XENMAPSPACE_grant_table, 3, 0x802, 0),
        (X.XENMAPSPACE_shared_info, 1, 0x803, errno("EINVAL")),       # bad idx
        (X.XENMAPSPACE_grant_table, 64, 0x803, errno("EINVAL")),      # beyond frames
        (X.XENMAPSPACE_grant_table, X.XENMAPIDX_grant_table_status, 0x803, errno("EINVAL")),
        (X.XENMAPSPACE_gmfn_foreign, 0, 0x803, errno("ENOSYS")),
        (X.XENMAPSPACE_shared_info, 0, 1 << 40, errno("EINVAL")),     # past phys bits
        (X.XENMAPSPACE_grant_table, 1, 0x801, errno("EINVAL")),       # frame holds shared_info
        (X.XENMAPSPACE_grant_table, 3, all_ones, 0),                 # unmap
    ]
    if b == 32:   # a 32-bit gpfn cannot reach past the physical address width
        plans = [pl for pl in plans if pl[2] != 1 << 40]
    for i, (space, idx, gpfn, _want) in enumerate(plans):
        m.write(SCRATCH + 0x40 * i, xatp(b, space, idx, gpfn))
        calls.append((MEM, X.XENMEM_add_to_physmap, p(SCRATCH + 0x40 * i)))
    m.write(SCRATCH + 0x1000, xatp(b, X.XENMAPSPACE_shared_info, 0, 0, domid=0))
    calls.append((MEM, X.XENMEM_add_to_physmap, p(SCRATCH + 0x1000)))
    res = h.run(calls)
    want = [w for *_x, w in plans] + [errno("EPERM")]
    assert [r for r, _ in res] == want
    ov = h.domain.overlay
    assert ov.gpa("shared_info") == 0x801000
    assert ov.gpa("grant:0") == 0x800000
    assert ov.gpa("grant:3") is None
    # RAM beneath is intact and shows again when the pages go
    h.domain.overlay_unmap("shared_info", force=True)
    h.domain.overlay_unmap("grant:0", force=True)
    assert m.read(0x800000, 4096) == ram and m.read(0x801000, 4096) == ram
    events = [(e, d) for e, d in h.events if e.startswith("XEN_OVERLAY")]
    by = [(e, d["by"]) for e, d in events]
    assert by.count(("XEN_OVERLAY_MAPPED", "guest")) == 4
    assert by.count(("XEN_OVERLAY_UNMAPPED", "guest")) == 1
    assert by.count(("XEN_OVERLAY_UNMAPPED", "operator")) == 2
    assert all(d.get("guest_not_told") for e, d in events if d["by"] == "operator")


def test_grant_table_ops(harness):
    h, m, p, b = harness, harness.mem, harness.ptr, harness.bits
    m.write(SCRATCH, xatp(b, X.XENMAPSPACE_grant_table, 0, 0x810))
    m.write(SCRATCH + 0x40, xatp(b, X.XENMAPSPACE_grant_table, 1, 0x811))
    m.write(SCRATCH + 0x80, struct.pack("<HHIIhH", X.DOMID_SELF, 0, 0, 0, 0, 0))  # query_size
    setup = (struct.pack("<HHIhHIQ", X.DOMID_SELF, 0, 3, 0, 0, 0, p(SCRATCH + 0x200)) if b == 64
             else struct.pack("<HHIhHI", X.DOMID_SELF, 0, 3, 0, 0, p(SCRATCH + 0x200)))
    m.write(SCRATCH + 0xc0, setup)
    big = (struct.pack("<HHIhHIQ", X.DOMID_SELF, 0, 65, 0, 0, 0, p(SCRATCH + 0x200)) if b == 64
           else struct.pack("<HHIhHI", X.DOMID_SELF, 0, 65, 0, 0, p(SCRATCH + 0x200)))
    m.write(SCRATCH + 0x100, big)
    m.write(SCRATCH + 0x140, struct.pack("<I", 2))
    m.write(SCRATCH + 0x150, struct.pack("<I", 1))
    res = h.run([(MEM, X.XENMEM_add_to_physmap, p(SCRATCH)),
                 (MEM, X.XENMEM_add_to_physmap, p(SCRATCH + 0x40)),
                 (GNT, X.GNTTABOP_query_size, p(SCRATCH + 0x80), 1),
                 (GNT, X.GNTTABOP_setup_table, p(SCRATCH + 0xc0), 1),
                 (GNT, X.GNTTABOP_setup_table, p(SCRATCH + 0x100), 1),
                 (GNT, X.GNTTABOP_set_version, p(SCRATCH + 0x140), 1),
                 (GNT, X.GNTTABOP_set_version, p(SCRATCH + 0x150), 1),
                 (GNT, X.GNTTABOP_query_size, p(SCRATCH + 0x80), 2),
                 (GNT, X.GNTTABOP_map_grant_ref, p(SCRATCH + 0x80), 1)])
    assert [r for r, _ in res] == [0, 0, 0, 0, 0, errno("EACCES"), 0, errno("EINVAL"), errno("ENOSYS")]
    _d, _p, nr, mx, st = struct.unpack("<HHIIh", m.read(SCRATCH + 0x80, 14))
    assert (nr, mx, st) == (2, 64, 0)
    assert struct.unpack("<h", m.read(SCRATCH + 0xc8, 2))[0] == X.GNTST_okay
    assert struct.unpack("<h", m.read(SCRATCH + 0x108, 2))[0] == X.GNTST_general_error
    w = b // 8
    frames = [int.from_bytes(m.read(SCRATCH + 0x200 + i * w, w), "little") for i in range(3)]
    assert frames == [0x810, 0x811, (1 << b) - 1]
    # a v1 grant entry the guest writes lands in the frame, not in RAM
    m.write(0x810000, struct.pack("<HHI", 1, 0, 0x1234))
    assert bytes(h.domain.overlay.pages["grant:0"].view[:8]) == struct.pack("<HHI", 1, 0, 0x1234)


def test_ballooning(harness):
    h, m, p, b = harness, harness.mem, harness.ptr, harness.bits
    w = b // 8
    gfns = [0x900, 0x901, 0x902]
    m.write(SCRATCH + 0x100, b"".join(g.to_bytes(w, "little") for g in gfns))
    m.write(SCRATCH + 0x200, b"".join(g.to_bytes(w, "little") for g in [0x903, 0x903]))

    def resv(at, handle, n):
        if b == 64:
            m.write(at, struct.pack("<QQIIH", handle, n, 0, 0, X.DOMID_SELF))
        else:
            m.write(at, struct.pack("<IIIIH", handle, n, 0, 0, X.DOMID_SELF))
    resv(SCRATCH, p(SCRATCH + 0x100), 3)
    resv(SCRATCH + 0x40, p(SCRATCH + 0x200), 2)
    m.write(0x900000, b"\xaa" * 4096)
    m.write(SCRATCH + 0x80, struct.pack("<H", X.DOMID_SELF))
    res = h.run([(MEM, X.XENMEM_decrease_reservation, p(SCRATCH)),
                 (MEM, X.XENMEM_current_reservation, p(SCRATCH + 0x80)),
                 (MEM, X.XENMEM_decrease_reservation, p(SCRATCH)),          # already out
                 (MEM, X.XENMEM_decrease_reservation, p(SCRATCH + 0x40)),   # 0x903 twice
                 (MEM, X.XENMEM_populate_physmap, p(SCRATCH)),
                 (MEM, X.XENMEM_populate_physmap, p(SCRATCH)),              # already in
                 (MEM, X.XENMEM_current_reservation, p(SCRATCH + 0x80))])
    pages = 64 << 8
    assert [r for r, _ in res] == [3, pages - 3, 0, 1, 3, 0, pages - 1]
    assert h.machine.memmap.ballooned() == [0x903]
    assert not m.is_backed(0x903000)
    assert m.read(0x900000, 4096) == bytes(4096), "a frame put back is zeroed"


def test_host_map_api_errors(harness_factory):
    h = harness_factory(64)
    h.run([])
    ov = h.domain.overlay
    with pytest.raises(InvalidArgument):
        h.domain.overlay_map("shared_info", 0x1001)
    with pytest.raises(InvalidArgument):
        h.domain.overlay_map("shared_info", 1 << 60)
    with pytest.raises(InvalidArgument):
        h.domain.overlay_map("bogus", 0x1000)
    with pytest.raises(NotFound):
        h.domain.overlay_map("grant:64", 0x1000)
    h.domain.overlay_map("shared_info", 0)                 # address 0 is an address
    assert ov.gpa("shared_info") == 0
    h.domain.overlay_unmap("shared_info")
    assert ov.gpa("shared_info") is None
    listing = {e["page"]: e for e in ov.list()}
    assert len(listing) == 65 and listing["shared_info"]["backend"] == "userspace"


def test_time_through_shared_info_is_live_and_monotonic(run_to_done):
    d = run_to_done("xen/guests/time64.S", timeout=30)
    m = d.machine.mem
    wc_sec, backwards, retries = struct.unpack("<QQQ", m.read(0x300100, 24))
    samples = struct.unpack("<2000Q", m.read(0x310000, 16000))
    assert abs(wc_sec - time.time()) < 5
    assert backwards == 0
    assert samples[-1] > samples[0] > 0, "system time must advance with the TSC"
    assert samples[-1] - samples[0] < 30 * 10**9
    now = d.xen.clock.now()
    assert abs(now - samples[-1]) < 2 * 10**9, (now, samples[-1])

def test_soft_reset_unmaps_and_zeroes(harness_factory):
    h = harness_factory(64)
    m, p = h.mem, h.ptr
    m.write(SCRATCH, xatp(64, X.XENMAPSPACE_shared_info, 0, 0x820))
    m.write(SCRATCH + 0x40, struct.pack("<I", X.SHUTDOWN_soft_reset))
    res = h.run([(MEM, X.XENMEM_add_to_physmap, p(SCRATCH)),
                 (X.__HYPERVISOR_sched_op, X.SCHEDOP_shutdown, p(SCRATCH + 0x40))])
    assert [r for r, _ in res] == [0, 0]
    assert h.domain.overlay.gpa("shared_info") is None
    assert bytes(h.domain.overlay.shared_info.view) == bytes(4096)
    assert h.machine.status is None


def test_reservation_refusals_return_the_extents_done(harness):
    """As Xen: a reservation op that cannot start answers with start_extent, not an errno;
    a continuation (start_extent in the command's high bits) resumes where it says."""
    h, m, p, b = harness, harness.mem, harness.ptr, harness.bits
    w = b // 8
    m.write(SCRATCH + 0x100, b"".join(g.to_bytes(w, "little") for g in (0xa00, 0xa01, 0xa02)))

    def resv(at, handle, n, order=0, domid=X.DOMID_SELF):
        fmt = "<QQIIH" if b == 64 else "<IIIIH"
        m.write(at, struct.pack(fmt, handle, n, order, 0, domid))
    resv(SCRATCH, p(SCRATCH + 0x100), 3, domid=5)
    resv(SCRATCH + 0x40, p(SCRATCH + 0x100), 3, order=10)
    resv(SCRATCH + 0x80, p(SCRATCH + 0x100), 3)
    dec = X.XENMEM_decrease_reservation
    res = h.run([(MEM, dec, p(SCRATCH)), (MEM, dec, p(SCRATCH + 0x40)),
                 (MEM, dec, 0xFFFFF000), (MEM, dec | 5 << 6, p(SCRATCH + 0x80)),
                 (MEM, dec | 2 << 6, p(SCRATCH + 0x80)),
                 (MEM, X.XENMEM_add_to_physmap | 0x10000 << 6, p(SCRATCH))])
    assert [r for r, _ in res] == [0, 0, 0, 5, 3, errno("EDOM")]
    assert h.machine.memmap.ballooned() == [0xa02], "only the extent from the continuation went"


def test_the_operator_needs_force_to_move_what_the_guest_mapped(harness_factory):
    """The guest maps shared_info itself and is never told when it moves: the operator's
    change is refused unless forced, and the forced one says what the guest was not told."""
    h = harness_factory(64)
    m, p = h.mem, h.ptr
    m.write(SCRATCH, xatp(64, X.XENMAPSPACE_shared_info, 0, 0x820))
    assert [r for r, _ in h.run([(MEM, X.XENMEM_add_to_physmap, p(SCRATCH))])] == [0]
    d = h.domain
    for change in (lambda **kw: d.overlay_map("shared_info", 0x830000, **kw),
                   lambda **kw: d.overlay_unmap("shared_info", **kw)):
        with pytest.raises(InvalidArgument, match="force"):
            change()
        assert d.overlay.gpa("shared_info") == 0x820000
    moved = d.overlay_map("shared_info", 0x830000, force=True)
    assert moved["gpa"] == 0x830000 and moved["guest_not_told"] and moved["by"] == "operator"
    # the operator's own mapping needs no force to change again
    again = d.overlay_map("shared_info", 0x840000)
    assert again["gpa"] == 0x840000 and "guest_not_told" not in again
    forced = [dt for e, dt in h.events if e == "XEN_OVERLAY_MAPPED" and dt["by"] == "operator"]
    assert forced[0]["guest_not_told"] is True and "guest_not_told" not in forced[1]


def test_grant_pages_are_mapped_when_first_used_and_saved_and_loaded_as_before(harness_factory):
    """The device maps a page of its memfd when the page is first asked for: a new domain
    has only shared_info mapped; a grant frame written and mapped comes back from a save,
    a page never used is zero."""
    h = harness_factory(64)
    h.run([])
    ov = h.domain.overlay
    assert [b.name for b in ov.pages.made()] == ["shared_info"]
    assert len(ov.pages) == 65 and "grant:63" in ov.pages and "grant:64" not in ov.pages
    h.domain.overlay_map("grant:5", 0x900000)
    ov.pages["grant:5"].view[:8] = b"granted!"
    assert [b.name for b in ov.pages.made()] == ["shared_info", "grant:5"]
    st = ov.save()
    assert st.contents == {"grant:5": b"granted!" + bytes(4088)} and st.gpas == {"grant:5": 0x900000}
    other = harness_factory(64)
    other.run([])
    other.domain.machine.pause()
    try:
        other.domain.overlay.load(st)
    finally:
        other.domain.machine.resume()
    assert bytes(other.domain.overlay.pages["grant:5"].view[:8]) == b"granted!"
    assert other.domain.overlay.gpa("grant:5") == 0x900000
    assert bytes(other.domain.overlay.pages["grant:7"].view) == bytes(4096)


def _time_record(mem, shinfo_gpa: int) -> tuple[int, int]:
    """vCPU 0's vcpu_time_info in shared_info as the guest reads it: (version, system time)."""
    version, = struct.unpack("<I", mem.read(shinfo_gpa + 32, 4))
    system_time, = struct.unpack("<Q", mem.read(shinfo_gpa + 32 + 16, 8))
    return version, system_time


def test_shared_info_moved_by_the_operator_carries_live_time(harness_factory):
    """The operator's map or move publishes nothing itself: the page is the same page
    wherever it lies, and once the guest gave its TSC (its own map) the timer thread keeps
    the record in it current, mapped or not. The guest finds a valid, recent record at
    the new place, and it keeps moving there."""
    h = harness_factory(64)
    m, p = h.mem, h.ptr
    m.write(SCRATCH, xatp(64, X.XENMAPSPACE_shared_info, 0, 0x820))
    assert [r for r, _ in h.run([(MEM, X.XENMEM_add_to_physmap, p(SCRATCH))])] == [0]
    d = h.domain
    d.overlay_map("shared_info", 0x830000, force=True)
    clock = d.xen.clock
    version, first = _time_record(m, 0x830000)
    assert version % 2 == 0 and version > 0 and 0 < first <= clock.now()
    d.overlay_unmap("shared_info")
    time.sleep(1.5)                       # longer than the refresh period
    d.overlay_map("shared_info", 0x840000)
    version, later = _time_record(m, 0x840000)
    assert version % 2 == 0 and later > first, "the record went stale while unmapped"
    assert clock.now() - later < 1.5 * 10**9
