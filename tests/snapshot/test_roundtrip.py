"""Save then load: states and memory come back equal, the file is sparse, untouched memory
is never read, progress is reported, describe() summarises without reading memory."""

from __future__ import annotations

import datetime
import errno
import json
import os
import random
import time

import pytest

from xend_lite.snapshot import (
    MemoryChecksumMismatch,
    MemoryRegion,
    SnapshotError,
    SnapshotReadError,
    StateClassError,
    StateEncodeError,
    describe,
    load_snapshot,
    save_snapshot,
    wait_reclaimed,
)
from xend_lite.snapshot import checksum as csum
from xend_lite.snapshot import fileformat as ff
from xend_lite.snapshot import writer

from .helpers import (
    CLASSES,
    PAGE,
    ClockState,
    MiB,
    close_regions,
    fill_pages,
    fix_header_crc,
    memfd,
    read_all,
    sample_states,
    small_memory,
)

BIG = 256 * MiB
BIG_PAGES = [0, 1, 2, 100, 4095, 4096, 30000, 65535]  # a few data pages in 65536
ZERO_PAGES = [50, 51, 40000]  # written with zeros: allocated in the source, holes in the file


@pytest.fixture
def big_and_small():
    """Region "ram": 256 MiB, mostly never touched. Region "rom": 8 MiB, every page data."""
    ram = memfd(BIG, "ram")
    fill_pages(ram, BIG_PAGES, 1)
    for p in ZERO_PAGES:
        os.pwrite(ram, bytes(PAGE), p * PAGE)
    rom = memfd(8 * MiB, "rom")
    os.pwrite(rom, os.urandom(8 * MiB), 0)
    regions = [MemoryRegion("ram", 0, BIG, ram), MemoryRegion("rom", 0xFF80_0000, 8 * MiB, rom)]
    yield regions
    close_regions(regions)


def assert_same_memory(snap, region: MemoryRegion) -> None:
    m = snap.map_region(region.name)
    try:
        step = 32 * MiB
        for off in range(0, region.size, step):
            n = min(step, region.size - off)
            assert m[off:off + n] == read_all(region.fd, n, region.offset + off), \
                f"{region.name} differs near {off:#x}"
    finally:
        m.close()


def test_round_trip_two_states_two_regions(tmp_path, big_and_small):
    path = tmp_path / "guest.snap"
    states = sample_states(5)
    info = save_snapshot(path, states, big_and_small)
    assert info.sections == 2 and info.memory_size == BIG + 8 * MiB
    assert info.memory_data == (len(BIG_PAGES)) * PAGE + 8 * MiB

    with load_snapshot(path, CLASSES, required=["tcpu/0", "tclock"],
                       verify_memory=True) as snap:
        assert snap.states == states
        assert type(snap.states["tcpu/0"].cr) is tuple
        assert [(r.name, r.gpa, r.size) for r in snap.regions] == \
            [("ram", 0, BIG), ("rom", 0xFF80_0000, 8 * MiB)]
        for r in snap.regions:
            assert r.file_offset % PAGE == 0
        assert snap.region("ram").data == len(BIG_PAGES) * PAGE
        for r in big_and_small:
            assert_same_memory(snap, r)
        fd = snap.fd
        os.fstat(fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the context manager


def test_output_is_sparse_and_holes_are_not_read(tmp_path, big_and_small, monkeypatch):
    """Untouched source pages are skipped with SEEK_DATA, zero pages become holes."""
    real = os.preadv
    read = [0]

    def counting(fd, bufs, off, *a):
        n = real(fd, bufs, off, *a)
        read[0] += n
        return n

    monkeypatch.setattr(os, "preadv", counting)
    path = tmp_path / "guest.snap"
    t0 = time.monotonic()
    info = save_snapshot(path, sample_states(), big_and_small)
    elapsed = time.monotonic() - t0
    monkeypatch.undo()
    # every chunk read holds a data or zero page: at most ~9 chunks of "ram" plus "rom"
    assert read[0] <= 12 * MiB + 8 * MiB
    st = os.stat(path)
    assert st.st_size >= BIG + 8 * MiB
    data = (len(BIG_PAGES)) * PAGE + 8 * MiB
    assert st.st_blocks * 512 < data + 1 * MiB
    assert info.size_on_disk == st.st_blocks * 512
    assert elapsed < 5


def test_huge_sparse_region_is_fast(tmp_path):
    """A 16 GiB region with two pages saves in well under a second: holes are never read."""
    size = 16 << 30
    fd = memfd(size)
    try:
        fill_pages(fd, [3, size // PAGE - 1], 9)
        t0 = time.monotonic()
        save_snapshot(tmp_path / "s", [], [MemoryRegion("ram", 0, size, fd)])
        assert time.monotonic() - t0 < 2
        assert os.stat(tmp_path / "s").st_blocks * 512 < 1 * MiB
        with load_snapshot(tmp_path / "s", CLASSES, verify_memory=True) as snap:
            m = snap.map_region("ram")
            assert m[3 * PAGE:4 * PAGE] == read_all(fd, PAGE, 3 * PAGE)
            assert m[size - PAGE:] == read_all(fd, PAGE, size - PAGE)
            assert m[4 * PAGE:5 * PAGE] == bytes(PAGE)
            m.close()
    finally:
        os.close(fd)


def test_progress_every_64_mib(tmp_path, big_and_small):
    calls = []
    save_snapshot(tmp_path / "s", sample_states(), big_and_small,
                  progress=lambda done, total: calls.append((done, total)))
    total = BIG + 8 * MiB
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    dones = [d for d, _ in calls]
    assert dones == sorted(dones)
    assert max(b - a for a, b in zip(dones, dones[1:])) <= 64 * MiB
    assert len(calls) >= total // (64 * MiB) + 1


def test_progress_within_a_data_region(tmp_path):
    """Progress comes while data is copied, not only at region ends."""
    size = 160 * MiB
    fd = memfd(size)
    try:
        fill_pages(fd, list(range(0, size // PAGE, 256)), 2)  # one page per MiB
        calls = []
        save_snapshot(tmp_path / "s", [], [MemoryRegion("ram", 0, size, fd)],
                      progress=lambda d, t: calls.append(d))
        assert calls == [0, 64 * MiB, 128 * MiB, size]
    finally:
        os.close(fd)


def test_buffer_region_and_no_regions(tmp_path):
    buf = bytearray(64 * PAGE)
    buf[PAGE:2 * PAGE] = os.urandom(PAGE)
    save_snapshot(tmp_path / "b", [ClockState(5)], [MemoryRegion("vga", 0xA0000, len(buf),
                                                                 buffer=buf)])
    with load_snapshot(tmp_path / "b", CLASSES, verify_memory=True) as snap:
        assert snap.states == {"tclock": ClockState(5)}
        m = snap.map_region("vga")
        assert m[:] == bytes(buf)
        m.close()
    save_snapshot(tmp_path / "n", {"tclock": ClockState(1)}, [])
    with load_snapshot(tmp_path / "n", CLASSES) as snap:
        assert snap.regions == [] and snap.header.file_size == PAGE


def test_replaced_file_is_freed_in_the_background(tmp_path):
    path = tmp_path / "s"
    save_snapshot(path, [ClockState(1)], [])
    with open(path, "rb") as reader:       # a reader of the earlier file keeps its contents
        old_inode = os.fstat(reader.fileno()).st_ino
        save_snapshot(path, [ClockState(2)], [])
        assert wait_reclaimed(30)
        assert os.listdir(tmp_path) == ["s"]          # the replaced file's name is gone
        assert os.stat(path).st_ino != old_inode
        assert os.fstat(reader.fileno()).st_nlink == 0
        with load_snapshot(path, CLASSES) as snap:
            assert snap.states == {"tclock": ClockState(2)}
    assert wait_reclaimed(0)                          # nothing pending: returns at once


def test_mapping_is_private(tmp_path):
    regions, contents = small_memory()
    try:
        save_snapshot(tmp_path / "s", sample_states(), regions)
    finally:
        close_regions(regions)
    before = (tmp_path / "s").read_bytes()
    with load_snapshot(tmp_path / "s", CLASSES) as snap:
        m = snap.map_region("lo")
        assert m[:] == contents["lo"]
        m[0:PAGE] = b"\xaa" * PAGE
        m[10 * PAGE:11 * PAGE] = b"\xbb" * PAGE  # a hole in the file
        m.flush()
        m.close()
    assert (tmp_path / "s").read_bytes() == before


def test_not_needed_state_is_not_written_and_hooks_run(tmp_path):
    from .test_state import Hooked

    class Empty(ClockState, register=False):
        def needed(self):
            return False

    h = Hooked([1, 2, 3])
    save_snapshot(tmp_path / "s", {"thooked": h, "tclock": Empty(7)}, [])
    assert h.total == 6  # pre_save ran
    d = describe(tmp_path / "s")
    assert [s["name"] for s in d["sections"]] == ["thooked"]
    with load_snapshot(tmp_path / "s", {"thooked": Hooked}) as snap:
        assert snap.states["thooked"] == Hooked([1, 2, 3], 6)


def test_save_refuses_bad_input_without_touching_disk(tmp_path):
    path = tmp_path / "s"
    fd = memfd(MiB)
    try:
        bad = [
            ({"tclock": sample_states()["tcpu/0"]}, [], StateClassError),
            ({"tclock": "nope"}, [], StateEncodeError),
            ({"tclock bad": ClockState()}, [], StateClassError),
            ({"tclock": ClockState(ns="x")}, [], StateEncodeError),
            ({}, [MemoryRegion("a", 0, MiB, fd), MemoryRegion("b", MiB - PAGE, MiB, fd)],
             StateClassError),
            ({}, [MemoryRegion("a", 0, MiB, fd), MemoryRegion("a", 2 * MiB, MiB, fd)],
             StateClassError),
            ({}, [MemoryRegion("a", 1, MiB, fd)], StateClassError),
            ({}, [MemoryRegion("a", 0, 100, fd)], StateClassError),
            ({}, [MemoryRegion("a", 0, MiB)], StateClassError),
            ({}, [MemoryRegion("a", 2**64 - PAGE, 2 * PAGE, fd)], StateClassError),
        ]
        for states, regions, exc in bad:
            with pytest.raises(exc):
                save_snapshot(path, states, regions)
        assert os.listdir(tmp_path) == []
    finally:
        os.close(fd)


def test_verify_memory_finds_corrupt_memory(tmp_path):
    regions, _ = small_memory()
    try:
        save_snapshot(tmp_path / "s", sample_states(), regions)
    finally:
        close_regions(regions)
    with load_snapshot(tmp_path / "s", CLASSES) as snap:
        lo, hi = snap.region("lo"), snap.region("hi")
    raw = bytearray((tmp_path / "s").read_bytes())
    for where, region in ((lo.file_offset + 5 * PAGE + 17, "lo"),     # a data page
                          (lo.file_offset + 100 * PAGE, "lo"),        # a hole
                          (hi.file_offset + 2 * MiB - 1, "hi")):      # last byte of the file
        bad = bytearray(raw)
        bad[where] ^= 0x40
        (tmp_path / "bad").write_bytes(bad)
        with load_snapshot(tmp_path / "bad", CLASSES):
            pass  # memory is not read by default
        with pytest.raises(MemoryChecksumMismatch) as ei:
            load_snapshot(tmp_path / "bad", CLASSES, verify_memory=True)
        assert ei.value.region == region


def test_verify_memory_reports_the_first_bad_chunk_whichever_thread_finds_it(tmp_path):
    """Chunks with data are checked on several threads: with two bad chunks, the one first
    in the file is reported, every time."""
    from xend_lite.snapshot import verify

    n = 4 * verify.VERIFY_THREADS                    # enough chunks to be shared out
    size = n * MiB
    fd = memfd(size)
    try:
        os.pwrite(fd, os.urandom(size), 0)
        save_snapshot(tmp_path / "s", [ClockState(1)], [MemoryRegion("ram", 0, size, fd)])
    finally:
        os.close(fd)
    with load_snapshot(tmp_path / "s", CLASSES, verify_memory=True) as snap:
        start = snap.region("ram").file_offset
    raw = bytearray((tmp_path / "s").read_bytes())
    first, last = 1, n - 1                           # on different threads
    for k in (first, last):
        raw[start + k * MiB + 123] ^= 1
    (tmp_path / "bad").write_bytes(raw)
    for _ in range(5):
        with pytest.raises(MemoryChecksumMismatch) as ei:
            load_snapshot(tmp_path / "bad", CLASSES, verify_memory=True)
        assert ei.value.offset == first * MiB and f"chunk {first}" in str(ei.value)


def _write_sparse(path, image: bytes) -> None:
    """Write a file image with its all-zero pages left as holes, as the writer leaves them."""
    with open(path, "wb") as f:
        f.truncate(len(image))
        for at in range(0, len(image), PAGE):
            page = image[at:at + PAGE]
            if page.count(0) != len(page):
                f.seek(at)
                f.write(page)


def test_verify_memory_checks_the_sum_of_every_hole(tmp_path):
    """A chunk with no data must carry the sum of zeros: a stored sum changed (and the
    header checksum made to match) is refused for a full chunk and for the short last one,
    and of two faults the first in the file is named, a hole or a chunk with data."""
    size = 5 * MiB + 8 * PAGE                       # five full chunks and a short one
    fd = memfd(size)
    try:
        os.pwrite(fd, os.urandom(PAGE), 1 * MiB)    # chunks 1 and 3 hold data
        os.pwrite(fd, os.urandom(PAGE), 3 * MiB + PAGE)
        save_snapshot(tmp_path / "s", [ClockState(1)], [MemoryRegion("ram", 0, size, fd)])
    finally:
        os.close(fd)
    raw = (tmp_path / "s").read_bytes()
    h = ff.Header(*ff.HEADER.unpack(raw[:ff.HEADER_SIZE])[1:])
    sums_at = ff.HEADER_SIZE + h.meta_len - 4 * ff.chunk_count(size, h.chunk_size)
    with load_snapshot(tmp_path / "s", CLASSES, verify_memory=True) as snap:
        data_at = snap.region("ram").file_offset

    def damaged(sums: list[int], data_chunk: int | None = None) -> None:
        bad = bytearray(raw)
        for i in sums:
            bad[sums_at + 4 * i] ^= 1
        if data_chunk is not None:
            bad[data_at + data_chunk * MiB + PAGE // 2 + (data_chunk == 3) * PAGE] ^= 1
        fix_header_crc(bad)
        _write_sparse(tmp_path / "bad", bad)

    for hole in (0, 2, 4, 5):                       # 5 is the short last chunk
        damaged([hole])
        with pytest.raises(MemoryChecksumMismatch) as ei:
            load_snapshot(tmp_path / "bad", CLASSES, verify_memory=True)
        assert ei.value.offset == hole * MiB, hole
        with load_snapshot(tmp_path / "bad", CLASSES):
            pass                                    # the metadata alone is whole
    damaged([4], data_chunk=3)                      # a data chunk before the bad hole
    with pytest.raises(MemoryChecksumMismatch) as ei:
        load_snapshot(tmp_path / "bad", CLASSES, verify_memory=True)
    assert ei.value.offset == 3 * MiB
    damaged([2], data_chunk=3)                      # the bad hole first
    with pytest.raises(MemoryChecksumMismatch) as ei:
        load_snapshot(tmp_path / "bad", CLASSES, verify_memory=True)
    assert ei.value.offset == 2 * MiB
    damaged([1])                                    # a data chunk's sum: found by reading it
    with pytest.raises(MemoryChecksumMismatch) as ei:
        load_snapshot(tmp_path / "bad", CLASSES, verify_memory=True)
    assert ei.value.offset == 1 * MiB


def test_verify_memory_reads_only_the_data_of_a_chunk(tmp_path, monkeypatch):
    """Of a chunk with data, only its data extents are read; the zeros around them are
    summed unread. A byte changed in the data is still found."""
    size = 4 * MiB
    fd = memfd(size)
    try:
        os.pwrite(fd, os.urandom(PAGE), MiB + 5 * PAGE)      # two pages of one chunk,
        os.pwrite(fd, os.urandom(PAGE), 2 * MiB - PAGE)      # the second at its end
        save_snapshot(tmp_path / "s", [ClockState(1)], [MemoryRegion("ram", 0, size, fd)])
    finally:
        os.close(fd)
    with load_snapshot(tmp_path / "s", CLASSES) as snap:
        at = snap.region("ram").file_offset
    with open(tmp_path / "s", "rb") as f:
        if os.lseek(f.fileno(), at, os.SEEK_DATA) != at + MiB + 5 * PAGE:
            pytest.skip("the file system does not report the file's holes")
    real_v, real, read = os.preadv, os.pread, []

    def counting_v(fd, buffers, offset, *a):
        n = real_v(fd, buffers, offset, *a)
        if offset >= at:
            read.append(n)
        return n

    def counting(fd, n, offset):
        data = real(fd, n, offset)
        if offset >= at:
            read.append(len(data))
        return data
    monkeypatch.setattr(os, "preadv", counting_v)
    monkeypatch.setattr(os, "pread", counting)
    load_snapshot(tmp_path / "s", CLASSES, verify_memory=True).close()
    assert sum(read) == 2 * PAGE
    raw = bytearray((tmp_path / "s").read_bytes())
    raw[at + 2 * MiB - 1] ^= 0x10
    _write_sparse(tmp_path / "bad", raw)
    with pytest.raises(MemoryChecksumMismatch) as ei:
        load_snapshot(tmp_path / "bad", CLASSES, verify_memory=True)
    assert ei.value.offset == MiB


def test_verify_memory_checks_every_lane_of_a_chunk(tmp_path):
    """A flipped byte anywhere in a chunk (each of its four checksum lanes, both ends) is
    found; the file is otherwise left whole."""
    fd = memfd(2 * MiB, "ram")
    try:
        os.pwrite(fd, os.urandom(2 * MiB), 0)
        save_snapshot(tmp_path / "s", sample_states(), [MemoryRegion("ram", 0, 2 * MiB, fd)])
    finally:
        os.close(fd)
    with load_snapshot(tmp_path / "s", CLASSES, verify_memory=True) as snap:
        base = snap.region("ram").file_offset
    raw = (tmp_path / "s").read_bytes()
    q = MiB // 4
    for off in (0, q - 1, q, 2 * q + 123, 3 * q, MiB - 1, MiB + 3 * q + 8):
        bad = bytearray(raw)
        bad[base + off] ^= 0x80
        (tmp_path / "bad").write_bytes(bad)
        with pytest.raises(MemoryChecksumMismatch) as ei:
            load_snapshot(tmp_path / "bad", CLASSES, verify_memory=True)
        assert ei.value.offset == off // MiB * MiB


def _is_hole(fd: int, at: int) -> bool:
    try:
        return os.lseek(fd, at, os.SEEK_DATA) > at
    except OSError as err:   # ENXIO: no data from here to the end
        if err.errno != errno.ENXIO:
            raise
        return True


def test_zero_pages_inside_data_chunks_are_holes(tmp_path):
    """Pages of zeros among data pages, at any place in a chunk (and pages that only start
    or only end with zeros), from an fd and from a buffer."""
    rng = random.Random(7)
    kinds = [rng.choice(["zero", "data", "head0", "tail"]) for _ in range(3 * 256 + 5)]
    kinds[256:512] = ["zero"] * 256          # one whole chunk of zeros
    src = bytearray()
    for k in kinds:
        src += (bytes(PAGE) if k == "zero" else
                b"\0" + rng.randbytes(PAGE - 1) if k == "head0" else
                bytes(PAGE - 1) + b"\1" if k == "tail" else rng.randbytes(PAGE))
    fd = memfd(len(src), "ram")
    try:
        os.pwrite(fd, src, 0)
        for region in (MemoryRegion("ram", 0, len(src), fd),
                       MemoryRegion("ram", 0, len(src), buffer=src)):
            save_snapshot(tmp_path / "s", sample_states(), [region])
            with load_snapshot(tmp_path / "s", CLASSES, verify_memory=True) as snap:
                r = snap.region("ram")
                assert r.data == PAGE * sum(k != "zero" for k in kinds)
                m = snap.map_region("ram")
                try:
                    assert m[:] == src
                finally:
                    m.close()
                for i, k in enumerate(kinds):
                    assert _is_hole(snap.fd, r.file_offset + i * PAGE) == (k == "zero"), i
    finally:
        os.close(fd)


def test_written_memory_is_sent_to_disk_while_the_save_runs(tmp_path, monkeypatch):
    """Writeback of the file is started every WRITEBACK_STEP of memory (and for the tail),
    over the ranges written; a file system that refuses it only loses the head start."""
    calls = []
    monkeypatch.setattr(csum, "start_writeback", lambda fd, off, n: calls.append((off, n)))
    size = 3 * writer.WRITEBACK_STEP + 3 * MiB
    fd = memfd(size, "ram")
    try:
        os.pwrite(fd, os.urandom(size), 0)
        save_snapshot(tmp_path / "s", sample_states(), [MemoryRegion("ram", 0, size, fd)])
        with load_snapshot(tmp_path / "s", CLASSES) as snap:
            base = snap.region("ram").file_offset
        assert calls[0][0] == base and len(calls) == 4
        assert all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))
        assert calls[-1][0] + calls[-1][1] == base + size

        def refuse(fd, off, n):
            calls.append((off, n))
            raise OSError(errno.EINVAL, "no")
        calls.clear()
        monkeypatch.setattr(csum, "start_writeback", refuse)
        save_snapshot(tmp_path / "s", sample_states(), [MemoryRegion("ram", 0, size, fd)])
        assert len(calls) == 1            # not asked again in the same save
        with load_snapshot(tmp_path / "s", CLASSES, verify_memory=True):
            pass
    finally:
        os.close(fd)


def test_describe(tmp_path, big_and_small):
    path = tmp_path / "s"
    info = save_snapshot(path, sample_states(), big_and_small)
    d = describe(path)
    json.dumps(d)
    assert d["format_version"] == ff.FORMAT_VERSION == 2
    created = datetime.datetime.fromisoformat(d["created"].replace("Z", "+00:00"))
    assert created.tzinfo is not None and d["created"].endswith("Z")
    assert abs(created.timestamp() - time.time()) < 60
    assert [s["name"] for s in d["sections"]] == ["tcpu/0", "tclock"]
    assert all(s["version"] == 1 and s["length"] > 0 for s in d["sections"])
    assert [(r["name"], r["gpa"], r["size"]) for r in d["regions"]] == \
        [("ram", 0, BIG), ("rom", 0xFF80_0000, 8 * MiB)]
    assert d["memory_size"] == BIG + 8 * MiB
    assert d["memory_data"] == info.memory_data
    assert d["file_size"] == os.stat(path).st_size == info.logical_size
    assert d["size_on_disk"] == os.stat(path).st_blocks * 512 == info.size_on_disk


def test_describe_and_load_unreadable_paths(tmp_path):
    missing = tmp_path / "nope.snap"
    for fn in (describe, load_snapshot):
        with pytest.raises(SnapshotReadError, match="nope.snap") as ei:
            fn(missing)
        assert isinstance(ei.value, SnapshotError)
        with pytest.raises(SnapshotReadError, match="not a regular file"):
            fn(tmp_path)


def test_default_classes_come_from_the_registry(tmp_path):
    from .test_state import RegisteredForTest

    save_snapshot(tmp_path / "s", [RegisteredForTest(4)], [])
    with load_snapshot(tmp_path / "s") as snap:
        assert snap.states == {"ttest_registered": RegisteredForTest(4)}


@pytest.mark.parametrize("seed", range(8))
def test_data_chunks_walk_finds_exactly_the_chunks_with_data(tmp_path, seed):
    """Memory verification reads only the chunks the data-extent walk finds."""
    import random

    from xend_lite.snapshot.verify import _data_chunks

    rng = random.Random(seed)
    chunk, chunks, start = 16 * PAGE, 64, 3 * PAGE       # a region that starts mid-file
    pages = sorted(rng.sample(range(chunks * chunk // PAGE), rng.randint(0, 40)))
    if seed == 0:
        pages = [0, chunks * chunk // PAGE - 1]             # first and last page of the region
    path = tmp_path / "m"
    with open(path, "wb") as f:
        f.truncate(start + chunks * chunk + 5 * PAGE)
        f.seek(start - PAGE)
        f.write(b"\x01" * PAGE)                            # data just before the region...
        f.seek(start + chunks * chunk)
        f.write(b"\x02" * PAGE)                            # ...and just after it
        for p in pages:
            f.seek(start + p * PAGE)
            f.write(b"\x03" * PAGE)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = _data_chunks(fd, start, chunks * chunk, chunk)
        if os.lseek(fd, 0, os.SEEK_HOLE) < os.fstat(fd).st_size:   # the file system has holes
            assert got == {p * PAGE // chunk for p in pages}
        else:
            assert got >= {p * PAGE // chunk for p in pages}
    finally:
        os.close(fd)
