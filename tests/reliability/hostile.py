"""Hostile hypercall tables for guests/fuzz.S: random numbers, sub-ops, pointers, lengths and
struct contents, drawn from a ``Pick`` (a seeded random.Random for the bulk soak, or
hypothesis's ``data.draw`` where shrinking a failing struct matters).

Hypercalls that legitimately end or wreck the guest are steered, never skipped: a shutdown
asks for an invalid reason (or a soft reset), a poll gets a timeout already past, and every
op that maps, balloons or writes through a pointer nested in its struct gets a struct the
host planted, whose nested pointers and frames lie in the zones meant for them
(fuzzguest's memory layout), and whose extents (2**order frames) stay clear of the guest's own
pages. Such ops may still get a faulting pointer for the struct itself.
"""

from __future__ import annotations

import struct
from typing import Sequence

from xend_lite.xen.xenabi import X
from xend_lite.xen.abi import guest_layout

from .fuzzguest import (ALIAS, BALLOON, END_SCRATCH, OVERLAY_ARENA, OWN, RAM_END, SCRATCH, STRUCTS,
                        U32, U64)

HC = {name: getattr(X, "__HYPERVISOR_" + name) for name in (
    "xen_version", "memory_op", "hvm_op", "console_io", "sched_op", "sched_op_compat",
    "event_channel_op", "grant_table_op", "vcpu_op", "set_timer_op")}
# Numbers beyond the 64-entry table: in the page (64..127) and past it (the guest's own stub).
BEYOND = (64, 65, 100, 127, 128, 129, 255, 256, 4096, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
KNOWN_CMDS = {
    "xen_version": range(0, 12),
    "memory_op": (0, 1, 2, 3, 4, 6, 7, 9, 10, 14, 15, 23),
    "hvm_op": (0, 1, 5, 9, 10, 23),
    "console_io": (0, 1),
    "sched_op": (0, 1, 2, 3, 4, 5, 6, 7),
    "sched_op_compat": (0, 1, 2),
    "event_channel_op": range(0, 14),
    "grant_table_op": range(0, 13),
    "vcpu_op": range(0, 14),
}
DOMIDS = (X.DOMID_SELF, X.DOMID_SELF, X.DOMID_SELF, 1, 0, 2, 0x7FF1, 0x7FF2, 0xFFFF)
PAGE = 4096


class Pick:
    """What a generator draws from: random.Random or hypothesis's data.draw behind it."""

    def int(self, lo: int, hi: int) -> int: ...
    def choice(self, seq: Sequence): ...
    def chance(self, p: float) -> bool: ...


class RandomPick(Pick):
    def __init__(self, rng):
        self.rng = rng

    def int(self, lo, hi):
        return self.rng.randint(lo, hi)

    def choice(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def chance(self, p):
        return self.rng.random() < p


class HypothesisPick(Pick):
    def __init__(self, data):
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def int(self, lo, hi):
        return self.data.draw(self.st.integers(lo, hi))

    def choice(self, seq):
        return self.data.draw(self.st.sampled_from(list(seq)))

    def chance(self, p):
        return self.data.draw(self.st.integers(0, 999)) < int(p * 1000)


class TableMaker:
    """Makes one table of calls for a FuzzGuest; structs go to STRUCTS (reset per table)."""

    def __init__(self, guest, pick: Pick):
        self.g = guest
        self.p = pick
        self.long = guest.bits == 64
        self.ulong = 8 if self.long else 4
        self.cursor = STRUCTS[0]
        self.writes: list[tuple[int, bytes]] = []
        self.classes: dict[str, int] = {}

    # -- placing structs ---------------------------------------------------------------

    def place(self, data: bytes) -> int:
        """Put bytes in the struct zone; returns the guest pointer (alias or plain)."""
        gpa = self.cursor
        self.cursor = (self.cursor + len(data) + 63) & ~63
        assert self.cursor < STRUCTS[1], "struct zone full: make smaller tables"
        self.writes.append((gpa, bytes(data)))
        if self.long and self.p.chance(0.5):
            return ALIAS + gpa
        return gpa

    def pack(self, name: str, **values) -> bytes:
        lay = guest_layout(name, self.long)
        buf = bytearray(lay.size)
        for k, v in values.items():
            f = lay.fields[k]
            buf[f.offset:f.offset + f.size] = (v & ((1 << (8 * f.size)) - 1)).to_bytes(f.size, "little")
        return bytes(buf)

    def flush(self) -> None:
        for gpa, data in self.writes:
            self.g.mem.write(gpa, data)
        self.writes.clear()

    # -- pointers ------------------------------------------------------------------------

    def pointer(self, length_hint: int = 1024) -> int:
        """A pointer that is safe to write length_hint bytes through (or that faults)."""
        p = self.p
        kinds = ["scratch", "end", "zero", "overlay", "hole", "max", "random"]
        if self.long:
            kinds += ["alias", "noncanonical", "unmapped"]
        kind = p.choice(kinds)
        self.classes[kind] = self.classes.get(kind, 0) + 1
        if kind == "scratch":
            return p.int(SCRATCH[0], SCRATCH[1] - max(length_hint, 0x2000))
        if kind == "alias":
            return ALIAS + p.int(SCRATCH[0], SCRATCH[1] - max(length_hint, 0x2000))
        if kind == "end":
            return RAM_END - p.choice((1, 2, 4, 7, 8, 16, 24, 64, 100, 1000, PAGE, 0x10000))
        if kind == "zero":
            return p.choice((0, 0, 8, 0x800, 0x3000 - 16))
        if kind == "overlay":
            # the same draws whatever is mapped (hypothesis replays need that)
            fallback, k, off = p.int(OVERLAY_ARENA[0], OVERLAY_ARENA[1] - 1), p.int(0, 7), p.int(0, PAGE - 1)
            gpas = sorted(self.g.machine.memmap.overlays().values())
            return gpas[k % len(gpas)] + off if gpas else fallback
        if kind == "hole":
            return p.choice((RAM_END, RAM_END + 0x1000, 0xBFFFF000, 0xC0000000, 0xFEE00000,
                             0xFFFBC000, 0xFFFBD000, 0xFFFFF000, 0xFFFFFFFF,
                             p.int(RAM_END, 0xFFFFFFFF)))
        if kind == "max":
            return U64 - p.choice((0, 0, 1, 3, 7, 15, PAGE - 1)) if self.long else U32 - p.int(0, 7)
        if kind == "noncanonical":
            return p.choice((1 << 47, (1 << 47) + PAGE, 0xFFFF7FFFFFFFF000, 0x0000FFFFFFFFFFF0,
                             p.int(1 << 47, (1 << 64) - (1 << 47) - 1)))
        if kind == "unmapped":
            return p.choice((1 << 32, (1 << 32) + PAGE, 0x7FFFFFFFF000, 0xFFFF800000000000,
                             0xFFFFFFFF80000000, p.int(1 << 33, (1 << 39) - 1)))
        # random, above RAM (holes, unmapped, non-canonical): below it the guest's own memory
        # lies, and hypothesis favours small numbers. In 32-bit mode only the low half counts.
        if self.long:
            return p.int(RAM_END, U64)
        return p.int(0, U32) << 32 | p.int(RAM_END, U32)

    def faulting(self) -> int:
        """A struct pointer that faults whatever is mapped: an overlay page may lie in any
        hole (even just past RAM), and a poll or shutdown struct read from one could block
        the guest for good or stop it, as on Xen."""
        if self.long:   # non-canonical, or canonical but outside the guest's page tables
            return self.p.choice((U64, U64 - 7, 1 << 47, 1 << 32, 0xFFFF800000000000))
        return self.p.choice((U32, U32 - 2, U32 - 7))      # runs past 4 GiB

    def frame(self) -> int:
        """A guest frame number for ops that map or balloon: only safe zones or nonsense."""
        p = self.p
        k = p.choice(("overlay", "balloon", "low", "hole", "huge", "ones"))
        if k == "overlay":
            return p.int(OVERLAY_ARENA[0] // PAGE, OVERLAY_ARENA[1] // PAGE - 1)
        if k == "balloon":
            return p.int(BALLOON[0] // PAGE, BALLOON[1] // PAGE - 1)
        if k == "low":
            return p.int(0, 2)
        if k == "hole":
            return p.choice((RAM_END // PAGE, 0xC0000, 0xFEE00, 0xFFFBD, 0x100000, 0x3FFFFFF))
        if k == "huge":
            # random, but never a frame of the guest's own memory: hypothesis likes small
            # numbers, and a page laid over the guest's code or table would kill it
            return p.choice((1 << 40, 1 << 52, (1 << 52) - 1,
                             p.int(RAM_END // PAGE, U64 if self.long else U32)))
        return U64 if self.long else U32

    def word(self) -> int:
        p = self.p
        return p.choice((0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
                         U64, p.int(0, 64), p.int(0, U64)))

    # -- calls ---------------------------------------------------------------------------

    def table(self, n: int) -> list[tuple]:
        calls = [self.call() for _ in range(n)]
        self.flush()
        return calls

    def call(self) -> tuple:
        p = self.p
        r = p.int(0, 99)
        if r < 75:
            name = p.choice(sorted(HC))
            return self.known(name)
        if r < 93:
            nr = p.int(0, 63)
            if nr in HC.values():
                return self.known({v: k for k, v in HC.items()}[nr])
            return (nr, self.word(), self.pointer(), self.word(), self.word(), self.word())
        return (p.choice(BEYOND), self.word(), self.pointer(), self.word(), self.word(), self.word())

    def cmd(self, name: str) -> int:
        p = self.p
        if p.chance(0.85):
            return p.choice(list(KNOWN_CMDS[name]))
        return p.choice((p.int(0, 64), 0xFFFFFFFF, 1 << 31, U64 if self.long else U32))

    def known(self, name: str) -> tuple:
        nr, p = HC[name], self.p
        if name == "set_timer_op":
            return (nr, p.choice((0, 1, p.int(0, U64), (1 << 63) - 1)), p.int(0, U32), 0, 0, 0)
        cmd = self.cmd(name)
        return (nr,) + getattr(self, "_" + name)(cmd)

    def _ptr_or_struct(self, make) -> int:
        """A struct the host planted (made by ``make``), or a hostile pointer."""
        if self.p.chance(0.6):
            return self.place(make())
        return self.pointer()

    # every _name returns (a1..a5)

    def _xen_version(self, cmd):
        if cmd == X.XENVER_get_features:
            arg = self._ptr_or_struct(lambda: struct.pack("<II", self.word() & U32, self.word() & U32))
        else:
            arg = self.pointer(1024)
        return (cmd, arg, self.word(), 0, 0)

    def _memory_op(self, cmd):
        p = self.p
        sub = cmd & 63
        start = 0 if p.chance(0.85) else p.choice((1, 2, p.int(0, 1 << 20)))
        word = (start << 6 | sub) if cmd < 64 else cmd
        if sub in (0, 1, 6):           # reservations: extent lists of safe frames only
            arg = self.struct_or_fault(self.reservation)
        elif sub == 7:
            arg = self.struct_or_fault(self.add_to_physmap)
        elif sub == 15:
            arg = self.struct_or_fault(lambda: self.pack(
                "xen_remove_from_physmap", domid=p.choice(DOMIDS), gpfn=self.frame()))
        elif sub == 9:
            arg = self.struct_or_fault(lambda: self.pack(
                "xen_memory_map", nr_entries=p.choice((0, 1, 3, 8, 128, U32)),
                buffer=self.pointer(128 * 20)))
        elif sub in (3, 4, 14):
            arg = self._ptr_or_struct(lambda: struct.pack("<H", p.choice(DOMIDS)))
        else:
            arg = self.pointer()
        return (word, arg, self.word(), self.word(), self.word())

    def struct_or_fault(self, make) -> int:
        if self.p.chance(0.85):
            return self.place(make())
        return self.faulting()

    def reservation(self) -> bytes:
        p = self.p
        n = p.choice((0, 1, 2, 5, 16, 64, U32, p.int(0, 40)))
        order = p.choice((0, 0, 1, 9, 10, 31, U32))
        listed = [self.extent(order) for _ in range(min(n, p.int(0, 24)))]
        if n > len(listed):
            # the daemon, as Xen, reads nr_extents entries: past the listed ones lies whatever
            # an earlier table left in the struct zone (a frame of GUARD, say), so a frame
            # that cannot be RAM ends the list, and both stop there
            listed.append(U64 if self.long else U32)
        fmt = "<Q" if self.long else "<I"
        data = b"".join(struct.pack(fmt, f) for f in listed)
        handle = self.place(data) if data and p.chance(0.8) else self.faulting()
        return self.pack("xen_memory_reservation", extent_start=handle, nr_extents=n,
                         extent_order=order, mem_flags=self.word(), domid=p.choice(DOMIDS))

    def extent(self, order: int) -> int:
        """The first frame of an extent of 2**order frames. A "low" frame starts below the
        guest's image, but 2 MiB or more from it runs over the image, the hypercall page and
        the table: decreasing that reservation balloons the running guest out from under
        itself (as on Xen, which removes every frame of the extent), so such a start moves to
        the balloon zone. The frame is judged as the guest's xen_pfn_t holds it (a 32-bit
        guest's "huge" 1 << 40 is frame 0). Orders the daemon refuses are kept: the generator
        does not rely on a refusal."""
        p = self.p
        first = self.frame() if p.chance(0.2) else p.int(BALLOON[0] // PAGE, BALLOON[1] // PAGE - 1)
        first &= U64 if self.long else U32
        last = first + (1 << min(order, 64)) - 1
        if first < OWN[1] // PAGE and last >= OWN[0] // PAGE:
            first = BALLOON[0] // PAGE + first
        return first

    def add_to_physmap(self) -> bytes:
        p = self.p
        space = p.choice((0, 0, 1, 1, 2, 3, 4, 5, 6, 0xFFFFFFFF))
        idx = p.choice((0, 0, 1, 2, 63, 64, 65, 1 << 31, U64 if self.long else U32, p.int(0, 70)))
        return self.pack("xen_add_to_physmap", domid=p.choice(DOMIDS), size=p.int(0, 0xFFFF),
                         space=space, idx=idx, gpfn=self.frame())

    def _hvm_op(self, cmd):
        p = self.p
        if cmd in (X.HVMOP_set_param, X.HVMOP_get_param):
            arg = self._ptr_or_struct(lambda: self.pack(
                "xen_hvm_param", domid=p.choice(DOMIDS), index=p.choice((0, 1, 2, 3, 5, 15, 19, 36,
                                                                          38, 39, 100, U32)),
                value=p.choice((0, 1, 0x20, 2 << 56 | 0xF3, 1 << 56 | 5, 3 << 56, U64,
                                p.int(0, U64)))))
        elif cmd == X.HVMOP_set_evtchn_upcall_vector:
            arg = self._ptr_or_struct(lambda: struct.pack(
                "<IB", p.choice((0, 1, 2, 64, U32)), p.choice((0, 0xF, 0x10, 0xF3, 0xFF))))
        elif cmd == X.HVMOP_flush_tlbs:
            arg = p.choice((0, 0, self.pointer()))
        else:
            arg = self.pointer(8)
        return (cmd, arg, self.word(), self.word(), self.word())

    def _console_io(self, cmd):
        p = self.p
        buf = self.pointer(0x10000)
        count = p.choice((0, 1, 16, 4095, 4096, 4097, 0x10000))
        if buf >= END_SCRATCH[0] and buf < RAM_END and p.chance(0.3):
            count = p.choice((U32, 1 << 31, 0x200000))     # runs across the end of RAM
        return (cmd, count, buf, self.word(), self.word())

    def _sched_op(self, cmd):
        p = self.p
        if cmd in (X.SCHEDOP_block,) and not p.chance(0.05):
            cmd = X.SCHEDOP_yield      # a block costs up to a 10 ms slice: keep it rare
        if cmd == X.SCHEDOP_shutdown:
            # as in Xen every reason but soft_reset (also as 0x100 | 5: a u8) ends the guest,
            # so the struct is a soft reset now and then, else out of reach (-EFAULT)
            arg = (self.place(struct.pack("<I", p.choice((X.SHUTDOWN_soft_reset, 0x100 | X.SHUTDOWN_soft_reset))))
                   if p.chance(0.1) else self.faulting())
        elif cmd == X.SCHEDOP_poll:
            arg = self.struct_or_fault(self.poll)
        elif cmd == X.SCHEDOP_shutdown_code:
            arg = self.pointer(4)
        else:
            arg = self.pointer()
        return (cmd, arg, self.word(), self.word(), self.word())

    def poll(self) -> bytes:
        p = self.p
        n = p.choice((0, 1, 2, 8, 128, 129, U32))
        ports = struct.pack(f"<{min(n, 130)}I", *[p.choice((0, 1, 2, 3, 4095, 4096, U32))
                                                     for _ in range(min(n, 130))])
        where = self.place(ports) if ports and p.chance(0.8) else self.faulting()
        # never 0 (forever) nor in the future: a poll with nothing pending returns at once
        return self.pack("sched_poll", ports=where, nr_ports=n, timeout=p.choice((1, 2, 1000)))

    def _sched_op_compat(self, cmd):
        p = self.p
        if cmd == X.SCHEDOP_block and not p.chance(0.05):
            cmd = X.SCHEDOP_yield
        arg = self.pointer()
        if cmd == X.SCHEDOP_shutdown:   # the reason itself is the argument: see _sched_op
            if p.chance(0.1):
                arg = p.choice((X.SHUTDOWN_soft_reset, 0xFF00 | X.SHUTDOWN_soft_reset))
            else:
                cmd = X.SCHEDOP_yield
        return (cmd, arg, self.word(), self.word(), self.word())

    def _event_channel_op(self, cmd):
        p = self.p

        def port():
            return p.choice((0, 1, 2, 3, 5, 31, 63, 64, 1023, 1024, 4095, 4096, U32))

        makers = {
            X.EVTCHNOP_alloc_unbound: lambda: self.pack(
                "evtchn_alloc_unbound", dom=p.choice(DOMIDS), remote_dom=p.choice(DOMIDS)),
            X.EVTCHNOP_bind_virq: lambda: self.pack(
                "evtchn_bind_virq", virq=p.choice((0, 1, 2, 3, 23, 24, U32)), vcpu=p.choice((0, 1, U32))),
            X.EVTCHNOP_bind_ipi: lambda: struct.pack("<II", p.choice((0, 1, U32)), 0),
            X.EVTCHNOP_bind_interdomain: lambda: struct.pack(
                "<HHII", p.choice(DOMIDS), 0, port(), 0),
            X.EVTCHNOP_status: lambda: self.pack("evtchn_status", dom=p.choice(DOMIDS), port=port()),
            X.EVTCHNOP_bind_vcpu: lambda: struct.pack("<II", port(), p.choice((0, 1, U32))),
            X.EVTCHNOP_reset: lambda: struct.pack("<H", p.choice(DOMIDS)),
        }
        make = makers.get(cmd, lambda: struct.pack("<I", port()))
        return (cmd, self._ptr_or_struct(make), self.word(), self.word(), self.word())

    def _grant_table_op(self, cmd):
        p = self.p
        count = p.choice((1, 1, 1, 0, 2, U32))
        if cmd == X.GNTTABOP_setup_table:
            uop = self.struct_or_fault(lambda: self.pack(
                "gnttab_setup_table", dom=p.choice(DOMIDS), nr_frames=p.choice((0, 1, 4, 64, 65, U32)),
                frame_list=self.pointer(64 * 8)))
        elif cmd == X.GNTTABOP_query_size:
            uop = self._ptr_or_struct(lambda: self.pack("gnttab_query_size", dom=p.choice(DOMIDS)))
        elif cmd in (X.GNTTABOP_set_version, X.GNTTABOP_get_version):
            uop = self._ptr_or_struct(lambda: struct.pack("<I", p.choice((0, 1, 2, 3, X.DOMID_SELF, U32))))
        else:
            uop = self.pointer()
        return (cmd, uop, count, self.word(), self.word())

    def _vcpu_op(self, cmd):
        p = self.p
        vcpuid = p.choice((0, 0, 0, 1, 64, U32))
        if cmd == X.VCPUOP_register_vcpu_info:
            arg = self.struct_or_fault(lambda: self.pack(
                "vcpu_register_vcpu_info", mfn=self.frame(), offset=p.choice((0, 64, 4032, 4033, 4096, U32)),
                rsvd=p.choice((0, 0, 0, 1))))
        elif cmd == X.VCPUOP_register_runstate_memory_area:
            # the struct is a handle to the area the daemon rewrites on every block and poll:
            # planted, so the area is where pointers may land, never over the guest itself
            arg = self._ptr_or_struct(lambda: (self.pointer(64) & (U64 if self.long else U32))
                                      .to_bytes(self.ulong, "little"))
        elif cmd == X.VCPUOP_set_singleshot_timer:
            arg = self._ptr_or_struct(lambda: struct.pack(
                "<QI", p.choice((0, 1, U64, p.int(0, 1 << 40))), p.choice((0, 1, U32))))
        elif cmd == X.VCPUOP_set_periodic_timer:   # around both limits (1 ms, 2^62 - 1)
            arg = self._ptr_or_struct(lambda: struct.pack("<Q", p.choice(
                (0, 999_999, 1_000_000, 10**9, (1 << 62) - 1, 1 << 62, U64, p.int(0, 1 << 40)))))
        else:
            arg = self.pointer()
        return (cmd, vcpuid, arg, self.word(), self.word())
