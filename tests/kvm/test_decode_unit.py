"""Exit decoding and error formatting with fake kvm_run values (no /dev/kvm needed)."""

from __future__ import annotations

import errno
from types import SimpleNamespace as NS

import pytest

from xend_lite.kvm import KvmError, const, exits
from xend_lite.kvm.errors import check


def _run(reason, **parts):
    return NS(exit_reason=reason, **parts)


def test_io_out_reads_data_from_the_run_mapping():
    page = bytearray(4096)
    page[0x200:0x204] = b"abcd"
    io = NS(direction=const.KVM_EXIT_IO_OUT, size=2, count=2, port=0x510, data_offset=0x200)
    assert exits.decode(_run(const.KVM_EXIT_IO, io=io), page) == exits.IoOut(0x510, 2, 2, b"abcd")


def test_io_in():
    io = NS(direction=const.KVM_EXIT_IO_IN, size=4, count=1, port=0x71, data_offset=0x200)
    assert exits.decode(_run(const.KVM_EXIT_IO, io=io), b"") == exits.IoIn(0x71, 4, 1)


@pytest.mark.parametrize("reason,want", [
    ("KVM_EXIT_HLT", exits.Hlt()),
    ("KVM_EXIT_SHUTDOWN", exits.Shutdown()),
    ("KVM_EXIT_INTR", exits.Interrupted()),
    ("KVM_EXIT_IRQ_WINDOW_OPEN", exits.IrqWindowOpen()),
])
def test_simple_reasons(reason, want):
    assert exits.decode(_run(getattr(const, reason)), b"") == want


def test_msr_exits():
    msr = NS(index=0x40000000, data=0x1234, reason=const.KVM_MSR_EXIT_REASON_FILTER)
    assert exits.decode(_run(const.KVM_EXIT_X86_RDMSR, msr=msr), b"") == \
        exits.MsrRead(0x40000000, const.KVM_MSR_EXIT_REASON_FILTER)
    assert exits.decode(_run(const.KVM_EXIT_X86_WRMSR, msr=msr), b"") == \
        exits.MsrWrite(0x40000000, 0x1234, const.KVM_MSR_EXIT_REASON_FILTER)


def test_internal_error_keeps_at_most_sixteen_words():
    internal = NS(suberror=1, ndata=99, data=list(range(16)))
    ex = exits.decode(_run(const.KVM_EXIT_INTERNAL_ERROR, internal=internal), b"")
    assert ex == exits.InternalError(1, tuple(range(16)))


def test_fail_entry():
    fe = NS(hardware_entry_failure_reason=0x21, cpu=1)
    assert exits.decode(_run(const.KVM_EXIT_FAIL_ENTRY, fail_entry=fe), b"") == exits.FailEntry(0x21, 1)


def test_unknown_reasons_are_data_not_exceptions():
    assert exits.decode(_run(12345), b"") == exits.Unknown(12345, 0)
    hw = NS(hardware_exit_reason=0x30)
    assert exits.decode(_run(const.KVM_EXIT_UNKNOWN, hw=hw), b"") == \
        exits.Unknown(const.KVM_EXIT_UNKNOWN, 0x30)


def test_exits_are_frozen():
    ex = exits.IoOut(1, 1, 1, b"x")
    with pytest.raises(AttributeError):
        ex.port = 2  # type: ignore[misc]


def test_check_passes_results_and_raises_named_errors():
    assert check("KVM_RUN", 7) == 7
    with pytest.raises(KvmError) as info:
        check("KVM_SET_REGS", -errno.EFAULT)
    assert info.value.errno == errno.EFAULT
    assert info.value.call == "KVM_SET_REGS"
    assert str(info.value).startswith("[Errno 14] KVM_SET_REGS:") and "EFAULT" in str(info.value)
