"""Kernel images: the LZ4 legacy-frame decoder against hostile input, the bzImage setup
header, gzip/xz/LZ4 payloads, and a bzImage-wrapped guest booting through load_image."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xend_lite.errors import LoaderError
from xend_lite.machine import kernel
from xend_lite.machine.kernel import decompress, parse_setup_header, unpack_kernel
from xend_lite.machine.loader import load_image, parse_elf
from xend_lite.machine.native import DecompressError, lz4_legacy_decompress

from . import kernelimages as ki
from .conftest import MIB

MAX = 64 * MIB


def _text(n: int, seed: int = 1) -> bytes:
    """Compressible bytes: random words with repeats, like code."""
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randint(1, 12)) for _ in range(64)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) if rnd.random() < 0.8 else rnd.randbytes(rnd.randint(1, 30))
    return bytes(out[:n])


# -- the decoder on good data -----------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(max_size=3000),
                      st.builds(_text, st.integers(0, 20000), st.integers(0, 1 << 30))))
def test_lz4_round_trip(data):
    out, trailer = lz4_legacy_decompress(ki.legacy_frame(data), MAX)
    assert out == data and trailer is None


def test_lz4_several_blocks_frames_and_the_trailer():
    data = _text(ki.BLOCK + 5000)   # two blocks
    frame = ki.legacy_frame(data, trailer=True)
    out, trailer = lz4_legacy_decompress(frame, MAX)
    assert out == data and trailer == len(data)
    second = ki.legacy_frame(b"second frame " * 50)
    out, _ = lz4_legacy_decompress(ki.legacy_frame(b"first frame " * 50) + second, MAX)
    assert out == b"first frame " * 50 + b"second frame " * 50


def test_lz4_overlapping_match_copies_byte_by_byte():
    # "ab" then a 40-byte match at distance 2: the copy reads what it has just written
    block = ki.sequence(b"ab", 2, 40) + ki.sequence(b"xyzzy")
    out, _ = lz4_legacy_decompress(ki.LZ4_MAGIC + ki.block_frame(block), MAX)
    assert out == b"ab" * 21 + b"xyzzy"


@pytest.mark.skipif(shutil.which("lz4") is None, reason="the lz4 tool is not installed")
def test_lz4_reads_what_the_lz4_tool_writes(tmp_path):
    data = _text(3 * MIB, seed=5) + bytes(MIB) + random.Random(3).randbytes(MIB)
    src = tmp_path / "data"
    src.write_bytes(data)
    for level in ("-1", "-9"):
        frame = subprocess.run(["lz4", "-l", level, "-c", str(src)], check=True,
                               capture_output=True).stdout
        assert frame[:4] == ki.LZ4_MAGIC
        assert lz4_legacy_decompress(frame, MAX) == (data, None)


# -- the decoder on hostile data --------------------------------------------------------------

def _fails(frame: bytes, message: str, limit: int = MAX) -> None:
    with pytest.raises(DecompressError, match=message):
        lz4_legacy_decompress(frame, limit)


def _one_block(block: bytes) -> bytes:
    return ki.LZ4_MAGIC + ki.block_frame(block)


@pytest.mark.parametrize("frame,message", [
    (b"", "magic"),
    (b"\x02\x21\x4c", "magic"),
    (b"\x04\x22\x4d\x18" + bytes(8), "magic"),
    (ki.LZ4_MAGIC, "holds no block"),
    (ki.LZ4_MAGIC * 3, "holds no block"),
    (ki.LZ4_MAGIC + b"\x10\x00", "truncated at input offset 0x4"),
    (ki.LZ4_MAGIC + struct.pack("<I", 0) + b"x", "corrupt"),                  # empty block
    (ki.LZ4_MAGIC + struct.pack("<I", 9 << 20) + bytes(16), "corrupt"),       # over the bound
    (ki.LZ4_MAGIC + struct.pack("<I", 100) + bytes(16), "truncated"),         # past the input
    (_one_block(ki.sequence(b"abcd", 0, 4) + ki.sequence(b"x")), "corrupt"),  # distance 0
    (_one_block(ki.sequence(b"abcd", 5, 4) + ki.sequence(b"x")), "corrupt"),  # before the block
    (_one_block(b"\x50abc"), "corrupt"),                                      # literals past the end
    (_one_block(b"\xf0" + b"\xff" * 40), "corrupt"),                          # endless literal length
    (_one_block(ki.sequence(b"abcd")[:-1] + b"d\x01"), "truncated"),          # half a distance
    (_one_block(ki.sequence(b"abcd", 4, 4)), "truncated"),                    # ends after a match
    (_one_block(b"\x4fabcd\x04\x00" + b"\xff" * 20), "truncated"),           # match length cut off
])
def test_lz4_malformed(frame, message):
    _fails(frame, message)


def test_lz4_block_larger_than_8_mib_is_refused():
    # 9 MiB from a few bytes: one literal, a distance-1 match of 9 MiB, five literals
    block = ki.sequence(b"a", 1, 9 * MIB) + ki.sequence(b"bbbbb")
    assert len(block) < 40000
    _fails(_one_block(block), "block decodes to more than 8 MiB", limit=64 * MIB)
    ok = ki.sequence(b"a", 1, 8 * MIB - 6) + ki.sequence(b"bbbbb")   # exactly 8 MiB
    assert len(lz4_legacy_decompress(_one_block(ok), 64 * MIB)[0]) == 8 * MIB


def test_lz4_output_is_capped():
    frame = ki.legacy_frame(bytes(4 * MIB))       # 4 MiB from about 16 KiB
    assert len(frame) < 20000
    _fails(frame, "more than the limit", limit=MIB)
    _fails(frame, "more than the limit", limit=4 * MIB - 1)
    assert len(lz4_legacy_decompress(frame, 4 * MIB)[0]) == 4 * MIB
    many = ki.LZ4_MAGIC + ki.block_frame(ki.compress_block(bytes(8 * MIB))) * 40   # 320 MiB
    _fails(many, "more than the limit", limit=16 * MIB)


def test_lz4_every_truncation_fails_or_yields_a_prefix():
    data = _text(30000, seed=9)
    frame = ki.LZ4_MAGIC + b"".join(ki.block_frame(ki.compress_block(data[i:i + 10000]))
                                    for i in range(0, len(data), 10000))
    whole = 0
    for cut in range(len(frame)):
        try:
            out, trailer = lz4_legacy_decompress(frame[:cut], MAX)
        except DecompressError:
            continue
        whole += 1
        assert data.startswith(out)            # only at a block boundary
        assert len(out) % 10000 == 0 or trailer is not None
    assert whole >= 2


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 1 << 30), flips=st.integers(1, 8))
def test_lz4_corrupted_frames_fail_cleanly(seed, flips):
    rnd = random.Random(seed)
    data = _text(rnd.randint(100, 5000), seed)
    frame = bytearray(ki.legacy_frame(data))
    for _ in range(flips):
        frame[rnd.randrange(4, len(frame))] = rnd.randrange(256)
    limit = rnd.choice([64, 4096, MAX])
    try:
        out, _ = lz4_legacy_decompress(bytes(frame), limit)
    except DecompressError:
        return
    assert len(out) <= limit


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=600))
def test_lz4_random_blocks_fail_cleanly(body):
    for frame in (ki.LZ4_MAGIC + body, _one_block(body)):
        try:
            out, _ = lz4_legacy_decompress(frame, 8192)
        except DecompressError:
            continue
        assert len(out) <= 8192


# -- the setup header -----------------------------------------------------------------------

def test_setup_header_fields():
    img = ki.bzimage(b"payload", setup_sects=3, lead=0x2CC)
    h = parse_setup_header(img)
    assert h.version == (2, 15) and h.setup_sects == 3
    assert h.payload_offset == 4 * 512 + 0x2CC and h.payload_length == 7
    assert img[h.payload_offset:h.payload_offset + h.payload_length] == b"payload"
    assert h.pref_address == 0x1000000 and h.init_size == 0x3000000
    assert h.kernel_version == "6.1.0-test (xend-lite) #1"
    assert parse_setup_header(ki.bzimage(b"p", setup_sects=0)).payload_offset == 5 * 512 + 0x2CC


@pytest.mark.parametrize("image,message", [
    (ki.bzimage(b"x", version=0x0207), "older than 2.08"),
    (ki.bzimage(b"x", boot_flag=0x1234), "boot flag"),
    (ki.bzimage(b"x", length=1 << 30), "not inside"),
    (ki.bzimage(b"x", length=0), "not inside"),
    (ki.bzimage(b"x")[:0x240], "truncated"),
])
def test_bad_setup_headers(image, message):
    with pytest.raises(LoaderError, match=message):
        unpack_kernel(image)


# -- payload formats --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["lz4", "gzip", "xz", "none"])
def test_bzimage_opens_to_its_elf(guests, fmt):
    elf = guests.image("boot.S", bits=64)
    k = unpack_kernel(ki.bzimage(ki.compress(elf, fmt)))
    assert k.elf == elf and k.container == "bzimage" and k.compression == fmt
    assert k.header.version == (2, 15)


def test_elf_stays_as_it_is(guests):
    elf = guests.image("boot.S", bits=32)
    k = unpack_kernel(elf)
    assert k.elf is elf and k.container == "elf" and k.compression is None


@pytest.mark.parametrize("magic,name", [(b"BZh91AY", "bzip2"), (b"\x5d\x00\x00\x80", "lzma"),
                                        (b"\x89LZO\x00", "lzo"), (b"\x28\xb5\x2f\xfd", "zstd"),
                                        (b"\x04\x22\x4d\x18", "lz4-frame")])
def test_unsupported_formats_are_named(magic, name):
    with pytest.raises(LoaderError, match=f"compressed with {name}, which xend-lite does not"):
        unpack_kernel(ki.bzimage(magic + bytes(64)))


def test_unknown_payload_format():
    with pytest.raises(LoaderError, match="unknown format \\(starts 13 37"):
        unpack_kernel(ki.bzimage(b"\x13\x37" + bytes(30)))


@pytest.mark.parametrize("fmt", ["lz4", "gzip", "xz"])
def test_payload_that_is_not_an_elf(fmt):
    with pytest.raises(LoaderError, match="did not decompress to an ELF"):
        unpack_kernel(ki.bzimage(ki.compress(b"MZ not an elf" * 100, fmt)))


@pytest.mark.parametrize("fmt", ["lz4", "gzip", "xz"])
def test_payload_cap(fmt):
    payload = ki.compress(b"\x7fELF" + bytes(2 * MIB), fmt)
    with pytest.raises(LoaderError, match="more than"):
        decompress(payload, limit=MIB)
    assert len(decompress(payload, limit=2 * MIB + 4)[1]) == 2 * MIB + 4


@pytest.mark.parametrize("fmt", ["lz4", "gzip", "xz"])
def test_truncated_and_corrupt_payloads(fmt):
    data = b"\x7fELF" + _text(50000)
    payload = ki.compress(data, fmt)
    body = payload[:-4] if fmt != "gzip" else payload
    with pytest.raises(LoaderError):
        decompress(body[:len(body) // 2])
    bad = bytearray(payload)
    for i in range(len(bad) // 3, len(bad) // 3 + 40):
        bad[i] ^= 0x5A
    with pytest.raises(LoaderError):
        decompress(bytes(bad))


@pytest.mark.parametrize("fmt", ["lz4", "xz"])
def test_size_trailer_must_match(fmt):
    payload = ki.compress(b"\x7fELF" + bytes(1000), fmt)
    wrong = payload[:-4] + struct.pack("<I", 1005)
    with pytest.raises(LoaderError, match="size trailer says 1005 bytes, it decompressed to 1004"):
        decompress(wrong)
    with pytest.raises(LoaderError, match="follow the xz stream|truncated"):
        decompress(payload + b"junk")


# -- booting a bzImage -----------------------------------------------------------------------

@pytest.mark.kvm
@pytest.mark.parametrize("fmt", ["lz4", "gzip"])
def test_bzimage_guest_boots_at_its_pvh_entry(make_machine, guests, fmt):
    elf = guests.image("boot.S", bits=64)
    m = make_machine(64 * MIB, irqchip=False)
    seen: list[int] = []
    m.exits.register_io_out(0x5E0, lambda r, ex: seen.append(int.from_bytes(ex.data, "little")))
    info = load_image(m, ki.bzimage(ki.compress(elf, fmt)), "console=hvc0")
    m.start()
    status = m.wait(10)
    assert status is not None and status.reason == "halted", status
    assert info.pvh and info.entry == guests.symbol("boot.S", "pvh_start", bits=64)
    assert info.entry != parse_elf(elf)[1]
    assert seen == [0x9F9F9F9F]


def test_load_image_reports_a_bad_bzimage_as_loader_error():
    class NoMachine:   # never reached: the image fails before any memory is touched
        pass

    with pytest.raises(LoaderError, match="compressed with zstd"):
        load_image(NoMachine(), ki.bzimage(b"\x28\xb5\x2f\xfd" + bytes(16)))
    assert kernel.MAX_KERNEL_BYTES == 512 * MIB
