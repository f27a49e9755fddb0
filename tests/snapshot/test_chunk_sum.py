"""The guest memory chunk sum of snapshot format 2: CRC-32C over four lanes, combined."""

from __future__ import annotations

import mmap
import os
import random

import pytest

from xend_lite.snapshot import checksum as csum
from xend_lite.snapshot._snapshot import lib
from xend_lite.snapshot import fileformat as ff

_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ (0x82F63B78 if _c & 1 else 0)
    _TABLE.append(_c)


def ref_crc32c(data: bytes, crc: int = 0) -> int:
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = (c >> 8) ^ _TABLE[(c ^ b) & 0xFF]
    return c ^ 0xFFFFFFFF


def ref_chunk_sum(data: bytes) -> int:
    """The format's definition, written out: four contiguous lanes (the first three of n/4
    bytes rounded down to a multiple of 8, the last the rest), a CRC-32C each, then the
    CRC-32C of the four as little-endian u32s."""
    n = len(data)
    lane = n // 4 // 8 * 8
    bounds = [0, lane, 2 * lane, 3 * lane, n]
    lanes = [ref_crc32c(data[bounds[k]:bounds[k + 1]]) for k in range(4)]
    return ref_crc32c(b"".join(c.to_bytes(4, "little") for c in lanes))


@pytest.fixture(params=["cpu", "table"])
def path(request):
    """Both implementations: the CPU's CRC-32C instruction (where there is one) and the
    table-driven one used elsewhere."""
    if request.param == "cpu" and not csum.hardware_crc():
        pytest.skip("no CRC-32C instruction on this CPU")
    was = lib.xl_set_hw(1 if request.param == "cpu" else 0)
    yield request.param
    lib.xl_set_hw(was)


def test_crc32c_check_value(path):
    assert csum.crc32c(b"123456789") == 0xE3069283
    assert csum.crc32c(b"") == 0
    assert csum.crc32c(b"6789", csum.crc32c(b"12345")) == 0xE3069283


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 31, 32, 33, 63, 100, 4096, 3 * 4096 + 8, 65536])
def test_chunk_sum_matches_its_definition(path, n):
    data = random.Random(n).randbytes(n)
    assert csum.chunk_sum(data) == ref_chunk_sum(data)
    assert csum.crc32c(data) == ref_crc32c(data)


@pytest.mark.parametrize("n", [0, 1, 3, 8, 255, 4096, 65537, 1 << 20, (1 << 32) + 5])
def test_zeros_are_summed_without_reading_them(n):
    rng = random.Random(n)
    for crc in (0, 0xFFFFFFFF, rng.getrandbits(32)):
        got = csum.crc32c_zeros(n, crc)
        if n <= 1 << 20:
            assert got == csum.crc32c(bytes(n), crc)
        if n < 5000:
            assert got == ref_crc32c(bytes(n), crc)
    # long runs: the sum of a+b zeros continues the sum of a zeros
    assert csum.crc32c_zeros(n + 12345, 7) == csum.crc32c_zeros(12345, csum.crc32c_zeros(n, 7))


@pytest.mark.parametrize("seed", range(12))
def test_a_sparse_chunk_sums_as_the_whole_one(path, seed):
    """Extents of data at any offsets (across lane bounds, at either end, one byte long)
    with zeros between them sum as the full chunk does."""
    rng = random.Random(seed)
    n = rng.choice([ff.PAGE_SIZE, 16 * ff.PAGE_SIZE + 8, ff.CHUNK_SIZE, 100, 33])
    data = bytearray(n)
    extents = []
    pos = 0
    while pos < n:
        pos += rng.choice([0, 1, 7, 4096, n // 4 - 3, n // 3])
        length = min(n - pos, rng.choice([1, 8, 13, 4096, n // 4 + 1]))
        if length <= 0:
            break
        chunk = rng.randbytes(length)
        data[pos:pos + length] = chunk
        extents.append((pos, chunk))
        pos += length + 1
    assert csum.sparse_chunk_sum(n, extents) == csum.chunk_sum(bytes(data)) == ref_chunk_sum(bytes(data))
    assert csum.sparse_chunk_sum(n, []) == csum.chunk_sum(bytes(n))


def test_both_implementations_agree_on_a_whole_chunk():
    data = os.urandom(ff.CHUNK_SIZE)
    was = lib.xl_set_hw(1)
    try:
        fast = csum.chunk_sum(data), csum.crc32c(data)
        lib.xl_set_hw(0)
        assert (csum.chunk_sum(data), csum.crc32c(data)) == fast
    finally:
        lib.xl_set_hw(was)


def test_a_flipped_bit_in_any_lane_changes_the_sum():
    n = 16 * ff.PAGE_SIZE
    data = bytearray(os.urandom(n))
    good = csum.chunk_sum(data)
    for at in (0, n // 4 - 1, n // 4, n // 2 + 5, 3 * n // 4, n - 1):
        data[at] ^= 0x01
        assert csum.chunk_sum(data) != good, at
        data[at] ^= 0x01
    # lanes are not interchangeable: swapping two lanes' contents changes the sum
    q = n // 4
    swapped = data[q:2 * q] + data[:q] + data[2 * q:]
    assert csum.chunk_sum(swapped) != good


def test_sums_any_buffer_and_lets_an_mmap_close():
    m = mmap.mmap(-1, 2 * ff.PAGE_SIZE)
    m[:4] = b"abcd"
    view = memoryview(m)
    s = csum.chunk_sum(view[:ff.PAGE_SIZE])
    view.release()
    m.close()   # no export left behind by the checksum
    assert s == ref_chunk_sum(b"abcd" + bytes(ff.PAGE_SIZE - 4))


def test_zero_chunk_sum():
    for n in (ff.PAGE_SIZE, ff.CHUNK_SIZE):
        assert ff.zero_chunk_sum(n) == csum.chunk_sum(bytes(n))


def test_start_writeback(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, os.urandom(1 << 20), 0)
        csum.start_writeback(fd, 0, 1 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        with pytest.raises(OSError):
            csum.start_writeback(w, 0, 4096)   # a pipe has no pages to write back
    finally:
        os.close(r)
        os.close(w)
