"""Exit handlers on the machine: MSR traps with #GP on refusal, port I/O, the console."""

from __future__ import annotations

import io

import pytest

from xend_lite.kvm import const, exits
from xend_lite.machine.console import ConsoleSink
from xend_lite.machine.loader import load_image

MSR_A, MSR_B = 0x4000_0F10, 0x4000_0F11


@pytest.mark.kvm
def test_msr_handlers_answer_or_inject_gp(make_machine, guests, kvm):
    if not (kvm.check_extension(const.KVM_CAP_X86_USER_SPACE_MSR)
            and kvm.check_extension(const.KVM_CAP_X86_MSR_FILTER)):
        pytest.skip("KVM cannot trap MSRs to user space on this host")
    m = make_machine(irqchip=False)
    seen: list[tuple[int, int]] = []
    writes: list[tuple[int, int]] = []
    m.exits.register_io_out(0x5F1, lambda r, ex: seen.append((0x5F1, int.from_bytes(ex.data, "little"))))
    m.exits.register_io_out(0x5F2, lambda r, ex: seen.append((0x5F2, int.from_bytes(ex.data, "little"))))
    m.register_msr(MSR_A, read=lambda r: 0xCAFEBABE_12345678,
                   write=lambda r, v: writes.append((MSR_A, v)) or True)
    m.register_msr(MSR_B, read=lambda r: None, write=lambda r, v: writes.append((MSR_B, v)) or False)
    load_image(m, guests.image("msr32.S", bits=32, defines={"MSR_A": hex(MSR_A), "MSR_B": hex(MSR_B)}))
    m.start()
    status = m.wait(10)
    assert status is not None and status.reason == "halted", status
    assert seen == [
        (0x5F1, 0x12345678), (0x5F1, 0xCAFEBABE),  # read A: the handler's value
        (0x5F2, 13), (0x5F1, 0xDEAD),              # read B refused: #GP, EAX untouched
        (0x5F1, 0x600D),                           # write A accepted
        (0x5F2, 13), (0x5F1, 0x0BAD),              # write B refused: #GP
    ]
    assert writes == [(MSR_A, 0x22222222_11111111), (MSR_B, 0x44444444_33333333)]
    assert m.runners[0].exit_counts["MsrRead"] == 2 and m.runners[0].exit_counts["MsrWrite"] == 2


@pytest.mark.kvm
def test_console_ports_reach_the_sink(make_machine, guests, tmp_path):
    log = tmp_path / "console.log"
    stream = io.BytesIO()
    sink = ConsoleSink(log_path=str(log), stream=stream)
    chunks: list[bytes] = []
    sink.add_listener(chunks.append)
    m = make_machine(console=sink, irqchip=False)
    load_image(m, guests.image("console32.S", bits=32))
    m.start()
    assert m.wait(10).reason == "halted"
    m.close()
    assert sink.text() == "ABCxyzDY"
    assert stream.getvalue() == b"ABCxyzDY"
    assert log.read_bytes() == b"ABCxyzDY"
    assert b"".join(chunks) == b"ABCxyzDY" and sink.total == 8


@pytest.mark.kvm
def test_unclaimed_ports_read_as_ones_and_handler_order(make_machine, guests):
    # hello64 writes 0x500, reads 0x501 and writes the answer + 1 to 0x502.
    m = make_machine(irqchip=False)
    got: list[exits.IoOut] = []
    m.exits.register_io_out(0x500, lambda r, ex: got.append(ex))
    m.exits.register_io_out(0x502, lambda r, ex: got.append(ex))
    load_image(m, (guests.path("hello64.S")).read_bytes())
    m.start()
    assert m.wait(10).reason == "halted"
    assert got[0] == exits.IoOut(0x500, 4, 1, (0x1000).to_bytes(4, "little"))
    assert got[1] == exits.IoOut(0x502, 4, 1, (0).to_bytes(4, "little"))  # 0xffffffff + 1
    assert m.mem.read_u64(0x200000) == 0x1122334455667788
    assert "hello from long mode" in m.console.text()


@pytest.mark.kvm
def test_failing_handler_stops_the_vm_with_a_status(make_machine, guests):
    m = make_machine(irqchip=False)

    def boom(r, ex):
        raise RuntimeError("handler bug")

    m.exits.register_io_out(0x500, boom)
    load_image(m, guests.image("hello64.S"))
    m.start()
    status = m.wait(10)
    assert status.reason == "internal-error" and "RuntimeError" in status.detail
    assert "handler bug" not in status.detail  # internal text stays in the log


# -- ConsoleSink without a guest ----------------------------------------------------------

def test_ring_keeps_the_newest_bytes():
    sink = ConsoleSink(ring_bytes=8)
    sink.write(b"0123456789")
    sink.write(b"ab")
    assert sink.tail(100) == b"456789ab"
    assert sink.tail(3) == b"9ab"
    assert sink.tail(0) == b""
    assert sink.total == 12


def test_empty_writes_are_ignored():
    sink = ConsoleSink()
    calls = []
    sink.add_listener(calls.append)
    sink.write(b"")
    assert calls == [] and sink.total == 0


def test_invalid_utf8_is_replaced_in_text():
    sink = ConsoleSink()
    sink.write(b"ok\xff\n")
    assert sink.text() == "ok\ufffd\n"


def test_a_broken_stream_is_dropped_not_fatal():
    class Broken(io.RawIOBase):
        def write(self, b):
            raise OSError(5, "gone")

    sink = ConsoleSink(stream=Broken())
    sink.write(b"a\n")
    sink.write(b"b\n")
    assert sink.text() == "a\nb\n"


def test_msr_filter_ranges_trap_exactly_the_registered_msrs():
    from xend_lite.machine.msrfilter import msr_filter_ranges as _msr_filter_ranges

    ranges = _msr_filter_ranges([0x40000000, 0x40000001, 0x4000000A, 0xC0000100])
    assert [r.base for r in ranges] == [0x40000000, 0xC0000100]
    trapped = set()
    for r in ranges:
        for i in range(r.nmsrs):
            if not r.bitmap[i // 8] >> (i % 8) & 1:
                trapped.add(r.base + i)
    assert trapped == {0x40000000, 0x40000001, 0x4000000A, 0xC0000100}
    for a, b in zip(ranges, ranges[1:]):
        assert a.base + a.nmsrs <= b.base  # no overlap: KVM would obey only the first
