"""A hostile guest: many thousand hypercalls with random numbers, sub-ops, pointers, lengths
and struct contents, in 64- and 32-bit mode, on one boot of guests/fuzz.S.

What must hold for every call: the vCPU stays up, RAX is a value or minus a Xen errno,
every register but RAX is as the guest left it, no handler raised an unexpected exception
(xen.internal_errors == 0), and no access left the memory that backs the guest (the audit
in conftest, the guard zone, host canaries).
"""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xend_lite.xen.xenabi import X

from .conftest import scaled
from .fuzzguest import GUARD, result_ok
from .hostile import HC, HypothesisPick, RandomPick, TableMaker

pytestmark = pytest.mark.kvm

STATS: dict[str, int] = {}


def check_table(g, calls, results) -> None:
    for call, (res, clobbered) in zip(calls, results):
        assert result_ok(res), f"call {call} returned {res}, neither a value nor a Xen errno"
        if clobbered:
            # a console write longer than one chunk may be continued after a pause, and a
            # continuation moves the buffer and count on, as Xen's does
            assert call[0] == HC["console_io"] and call[1] == X.CONSOLEIO_write, \
                f"call {call} changed a register other than RAX"
    assert g.xen.internal_errors == 0, g.xen.counters()
    g.check_alive()


def guard_untouched(g) -> None:
    data = g.mem.read(GUARD[0], GUARD[1] - GUARD[0])
    assert data.count(0) == len(data), "a hypercall wrote into the guard zone nothing points at"


def map_like_a_guest(g, maker) -> list[tuple]:
    from .fuzzguest import OVERLAY_ARENA, U64
    calls = []
    for space, idx, page in ((X.XENMAPSPACE_shared_info, 0, 0), (X.XENMAPSPACE_grant_table, 1, 1)):
        gpfn = OVERLAY_ARENA[0] // 4096 + page
        arg = maker.place(maker.pack("xen_add_to_physmap", domid=X.DOMID_SELF, space=space, idx=idx,
                                     gpfn=gpfn))
        calls.append((HC["memory_op"], X.XENMEM_add_to_physmap, arg & U64))
    maker.flush()
    return calls


def soak(g, total: int, seed: int, batch: int = 500) -> dict:
    rng = random.Random(seed)
    done, tables, classes, t0 = 0, 0, {}, time.monotonic()
    while done < total:
        n = min(batch, total - done)
        maker = TableMaker(g, RandomPick(rng))
        calls = maker.table(n)
        remap = tables % 10 == 0
        if remap:
            # shared_info (and a grant frame) mapped as a guest maps them, so pointers into
            # overlay pages meet real ones; later calls in the table may move or drop them
            calls[:0] = map_like_a_guest(g, maker)
        results = g.run(calls)
        check_table(g, calls, results)
        if tables == 0:         # a fresh domain: both map (later a fuzzed page may hold the frame)
            assert results[0][0] == 0 and results[1][0] == 0, results[:2]
        tables += 1
        for k, v in maker.classes.items():
            classes[k] = classes.get(k, 0) + v
        done += len(calls)
    guard_untouched(g)
    # the guest is still a working Xen guest: a plain version query answers
    res = g.run([(HC["xen_version"], X.XENVER_version, 0)])
    assert res[0][0] == g.xen.version_tuple[0] << 16 | g.xen.version_tuple[1]
    return {"calls": done, "seconds": round(time.monotonic() - t0, 1), "pointers": classes,
            "counters": g.xen.counters()}


def test_hostile_hypercall_soak(fuzz_guest, bits, memory_audit, request):
    total = scaled(2500, 100000, request)
    g = fuzz_guest(bits)
    info = soak(g, total, seed=1000 + bits)
    memory_audit.check()
    assert memory_audit.accesses > 0 and memory_audit.refused > 0
    assert g.xen.counters()["total"] >= total and info["calls"] >= total
    STATS[f"soak{bits}"] = info["calls"]
    print(f"\n{bits}-bit soak: {info['calls']} calls in {info['seconds']} s, pointers "
          f"{info['pointers']}, audited {memory_audit.accesses} accesses "
          f"({memory_audit.refused} refused)")


@pytest.mark.slow
def test_hostile_hypercall_soak_long(fuzz_guest, bits, memory_audit, request):
    test_hostile_hypercall_soak(fuzz_guest, bits, memory_audit, request)


STRUCT_OPS = ("memory_op", "event_channel_op", "grant_table_op", "sched_op", "vcpu_op", "hvm_op")


def struct_fuzz(g, examples: int) -> int:
    """hypothesis draws every struct field, pointer class and sub-op; a failure shrinks to
    the smallest table that still breaks a rule (a failure that stopped the shared guest
    names, in its message, the table and call it stopped in: every later example fails too).

    derandomize fixes the examples only for a given set of loaded xend_lite modules:
    hypothesis mixes integer constants from the project's loaded modules into its draws, so
    a run after other tests (which import more of them) draws other tables than a run alone."""
    ran = [0, 0]          # calls, tables

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one_table(data):
        maker = TableMaker(g, HypothesisPick(data))
        n = data.draw(st.integers(1, 20), label="calls")
        calls = [maker.known(data.draw(st.sampled_from(STRUCT_OPS), label="op")) for _ in range(n)]
        maker.flush()
        check_table(g, calls, g.run(calls))
        ran[0] += n
        ran[1] += 1

    one_table()
    guard_untouched(g)
    assert ran[1] == examples, f"{ran[1]} tables of {examples}"
    return ran[0]


def test_hostile_struct_contents(fuzz_guest, bits, memory_audit, request):
    g = fuzz_guest(bits)
    t0 = time.monotonic()
    n = struct_fuzz(g, scaled(150, 2500, request))
    memory_audit.check()
    print(f"\n{bits}-bit struct fuzz: {n} calls in {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_hostile_struct_contents_long(fuzz_guest, bits, memory_audit, request):
    test_hostile_struct_contents(fuzz_guest, bits, memory_audit, request)
