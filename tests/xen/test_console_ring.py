"""The PV console ring against a bytearray page: guest indices are hostile."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from xend_lite.xen.console_ring import IN_SIZE, OUT_SIZE, ConsoleRing
from xend_lite.xen.page import BytesPage

IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = 3072, 3076, 3080, 3084
U32 = 1 << 32


class SpyPage(BytesPage):
    """Records every access so a test can check nothing strays outside the struct."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []

    def read(self, off: int, n: int) -> bytes:
        self.reads.append((off, n))
        return super().read(off, n)

    def write(self, off: int, data: bytes) -> None:
        self.writes.append((off, len(data)))
        super().write(off, data)


def u32(page: BytesPage, off: int) -> int:
    return struct.unpack_from("<I", page.buf, off)[0]


def set_u32(page: BytesPage, off: int, v: int) -> None:
    struct.pack_into("<I", page.buf, off, v % U32)


def guest_write(page: BytesPage, data: bytes) -> None:
    """What a guest does to send console output."""
    prod = u32(page, OUT_PROD)
    for i, b in enumerate(data):
        page.buf[1024 + (prod + i) % OUT_SIZE] = b
    set_u32(page, OUT_PROD, prod + len(data))


def guest_read(page: BytesPage) -> bytes:
    cons, prod = u32(page, IN_CONS), u32(page, IN_PROD)
    n = (prod - cons) % U32
    out = bytes(page.buf[(cons + i) % IN_SIZE] for i in range(n))
    set_u32(page, IN_CONS, prod)
    return out


def test_drain_takes_output_and_advances_out_cons():
    page = BytesPage()
    ring = ConsoleRing(page)
    guest_write(page, b"hello, world\n")
    assert ring.drain() == b"hello, world\n"
    assert u32(page, OUT_CONS) == 13
    assert ring.drain() == b""
    assert not ring.broken


def test_drain_across_the_wrap_and_the_index_wrap():
    page = BytesPage()
    ring = ConsoleRing(page)
    start = U32 - 5                  # indices wrap past 2**32 mid-message
    set_u32(page, OUT_CONS, start)
    set_u32(page, OUT_PROD, start)
    msg = bytes(range(256)) * 7      # 1792 bytes, crosses the end of out[] too
    guest_write(page, msg)
    assert ring.pending_output() == len(msg)
    assert ring.drain() == msg
    assert u32(page, OUT_CONS) == (start + len(msg)) % U32


def test_full_ring_drains_whole():
    page = BytesPage()
    ring = ConsoleRing(page)
    guest_write(page, b"x" * OUT_SIZE)
    assert ring.drain() == b"x" * OUT_SIZE


def test_broken_out_indices_take_nothing_and_touch_nothing():
    page = SpyPage()
    ring = ConsoleRing(page)
    for cons, prod in ((0, OUT_SIZE + 1), (100, 99), (0, U32 - 1), (7, 0x8000_0000)):
        set_u32(page, OUT_CONS, cons)
        set_u32(page, OUT_PROD, prod)
        page.reads.clear()
        page.writes.clear()
        assert ring.drain() == b""
        assert ring.broken
        assert page.writes == []                       # out_cons not advanced
        assert page.reads == [(OUT_CONS, 8)]           # only the indices were read
        assert u32(page, OUT_CONS) == cons
    assert ring.broken_count == 4
    # The guest puts them right: served again.
    set_u32(page, OUT_CONS, 5)
    set_u32(page, OUT_PROD, 5)
    guest_write(page, b"ok")
    assert ring.drain() == b"ok" and not ring.broken


def test_push_input_writes_what_fits():
    page = BytesPage()
    ring = ConsoleRing(page)
    assert ring.push_input(b"abc") == 3
    assert guest_read(page) == b"abc"
    assert ring.push_input(b"y" * 2000) == IN_SIZE      # only a ring's worth
    assert ring.push_input(b"z") == 0                   # full
    assert guest_read(page) == b"y" * IN_SIZE
    assert ring.push_input(b"") == 0


def test_push_input_broken_indices_write_nothing():
    page = SpyPage()
    ring = ConsoleRing(page)
    set_u32(page, IN_CONS, 10)
    set_u32(page, IN_PROD, 10 + IN_SIZE + 1)
    page.writes.clear()
    assert ring.push_input(b"data") == 0
    assert ring.broken and page.writes == []


def test_accesses_stay_inside_their_rings():
    page = SpyPage()
    ring = ConsoleRing(page)
    set_u32(page, IN_PROD, U32 - 3)
    set_u32(page, IN_CONS, U32 - 3)
    set_u32(page, OUT_PROD, U32 - 700)
    set_u32(page, OUT_CONS, U32 - 700)
    page.reads.clear()
    page.writes.clear()
    guest_write(page, b"q" * 1500)
    ring.drain()
    ring.push_input(b"p" * 1000)
    for off, n in page.reads + page.writes:
        assert (1024 <= off and off + n <= 3072) or (0 <= off and off + n <= 1024) \
            or (3072 <= off and off + n <= 3088), (off, n)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, U32 - 1), st.integers(0, U32 - 1),
       st.lists(st.tuples(st.booleans(), st.binary(max_size=900)), max_size=20))
def test_streams_match_a_model(out_start, in_start, steps):
    """Guest output and host input arrive whole and in order, whatever the start indices."""
    page = BytesPage()
    ring = ConsoleRing(page)
    set_u32(page, OUT_CONS, out_start)
    set_u32(page, OUT_PROD, out_start)
    set_u32(page, IN_CONS, in_start)
    set_u32(page, IN_PROD, in_start)
    sent_out = received_out = b""
    sent_in = received_in = b""
    for to_guest, data in steps:
        if to_guest:
            n = ring.push_input(data)
            assert n == min(len(data), IN_SIZE - len(sent_in) + len(received_in))
            sent_in += data[:n]
            received_in += guest_read(page)
        else:
            room = OUT_SIZE - ring.pending_output()
            guest_write(page, data[:room])
            sent_out += data[:room]
            received_out += ring.drain()
    assert received_out == sent_out and received_in == sent_in
    assert not ring.broken
