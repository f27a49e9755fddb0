"""parse_elf on hostile input: only LoaderError may come out, whatever the bytes."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from xend_lite.errors import LoaderError
from xend_lite.machine.loader import find_pvh_entry, parse_elf


def minimal_elf64() -> bytes:
    eh = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    eh += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x100000, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 7, 0x78, 0x100000, 0x100000, 4, 4, 0x1000)
    return eh + ph + b"\xf4\xf4\xf4\xf4"


def check(data: bytes) -> None:
    try:
        _bits, _entry, phdrs = parse_elf(data)
        find_pvh_entry(data, phdrs)
    except LoaderError:
        pass


def test_minimal_elf_parses():
    bits, entry, phdrs = parse_elf(minimal_elf64())
    assert (bits, entry, len(phdrs)) == (64, 0x100000, 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes(data):
    check(data)
    check(b"\x7fELF" + data)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x77), st.integers(0, 255)), max_size=12))
def test_mutated_valid_elf(flips):
    data = bytearray(minimal_elf64())
    for pos, val in flips:
        data[pos] = val
    check(bytes(data))
