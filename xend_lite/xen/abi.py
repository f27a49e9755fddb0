"""Struct layouts in the guest's own mode.

The 64-bit layouts come from Xen's public headers through ``xend_lite.xen.xenabi``. A guest in
32-bit protected mode uses the i386 layouts: ``unsigned long``, ``xen_ulong_t`` on x86_32 and
guest handles are 4 bytes, and a ``uint64_t`` inside a struct is aligned to 4. Those are
computed here from field lists; tests/xen/test_abi_layouts.py compares every one against the
headers compiled with ``gcc -m32``.
"""

from __future__ import annotations

from functools import cache

from xend_lite.xen.xenabi import Field, Layout, X, layout

__all__ = ["Layout", "X", "guest_layout", "SharedInfoLayout", "SHINFO64", "SHINFO32"]

# (size, alignment, signed) of each C type in the i386 ABI
_I386 = {"u8": (1, 1, False), "s8": (1, 1, True), "u16": (2, 2, False), "s16": (2, 2, True),
         "u32": (4, 4, False), "s32": (4, 4, True), "u64": (8, 4, False), "u64a": (8, 8, False), "ulong": (4, 4, False),
         "ptr": (4, 4, False), "u64x4": (32, 4, False)}

# The i386 declarations of the structs whose layout differs by mode (or that are read in
# both modes); field names as in the public headers.
_COMPAT = {
    "xen_add_to_physmap": [("domid", "u16"), ("size", "u16"), ("space", "u32"), ("idx", "ulong"),
                           ("gpfn", "ulong")],
    "xen_remove_from_physmap": [("domid", "u16"), ("gpfn", "ulong")],
    "xen_memory_reservation": [("extent_start", "ptr"), ("nr_extents", "ulong"),
                               ("extent_order", "u32"), ("mem_flags", "u32"), ("domid", "u16")],
    "xen_memory_map": [("nr_entries", "u32"), ("buffer", "ptr")],
    "xen_hvm_param": [("domid", "u16"), ("index", "u32"), ("value", "u64")],
    "xen_hvm_evtchn_upcall_vector": [("vcpu", "u32"), ("vector", "u8")],
    "sched_shutdown": [("reason", "u32")],
    "vcpu_runstate_info": [("state", "s32"), ("state_entry_time", "u64"),
                           ("time", "u64x4")],
    "sched_poll": [("ports", "ptr"), ("nr_ports", "u32"), ("timeout", "u64")],
    "evtchn_alloc_unbound": [("dom", "u16"), ("remote_dom", "u16"), ("port", "u32")],
    "evtchn_bind_interdomain": [("remote_dom", "u16"), ("remote_port", "u32"), ("local_port", "u32")],
    "evtchn_bind_virq": [("virq", "u32"), ("vcpu", "u32"), ("port", "u32")],
    "evtchn_bind_ipi": [("vcpu", "u32"), ("port", "u32")],
    "evtchn_close": [("port", "u32")],
    "evtchn_send": [("port", "u32")],
    "evtchn_status": [("dom", "u16"), ("port", "u32"), ("status", "u32"), ("vcpu", "u32"),
                      ("u", "u64")],
    "evtchn_unmask": [("port", "u32")],
    "evtchn_bind_vcpu": [("port", "u32"), ("vcpu", "u32")],
    "evtchn_init_control": [("control_gfn", "u64a"), ("offset", "u32"), ("vcpu", "u32"),
                            ("link_bits", "u8")],
    "evtchn_set_priority": [("port", "u32"), ("priority", "u32")],
    "gnttab_setup_table": [("dom", "u16"), ("nr_frames", "u32"), ("status", "s16"),
                           ("frame_list", "ptr")],
    "gnttab_query_size": [("dom", "u16"), ("nr_frames", "u32"), ("max_nr_frames", "u32"),
                          ("status", "s16")],
    "gnttab_set_version": [("version", "u32")],
    "gnttab_get_version": [("dom", "u16"), ("pad", "u16"), ("version", "u32")],
    "vcpu_register_vcpu_info": [("mfn", "u64"), ("offset", "u32"), ("rsvd", "u32")],
    "vcpu_set_singleshot_timer": [("timeout_abs_ns", "u64"), ("flags", "u32")],
    "vcpu_set_periodic_timer": [("period_ns", "u64")],
    "xen_feature_info": [("submap_idx", "u32"), ("submap", "u32")],
    "xen_platform_parameters": [("virt_start", "ulong")],
}

# The periods Xen accepts for a vCPU's periodic timer (VCPUOP_set_periodic_timer): from 1 ms
# up to STIME_DELTA_MAX, the longest delta Xen adds to its system time.
PERIODIC_MIN_NS, PERIODIC_MAX_NS = 1_000_000, (1 << 62) - 1

# Structs our 64-bit builder does not declare but whose layout is fixed and simple.
_EXTRA64 = {
    "xen_remove_from_physmap": [("domid", 0, 2), ("gpfn", 8, 8)],
    "xen_hvm_get_time": [("now", 0, 8)],
}
_EXTRA64_SIZE = {"xen_remove_from_physmap": 16, "xen_hvm_get_time": 8}


def _compat(name: str) -> Layout:
    off = 0
    align_max = 1
    fields = {}
    for fname, ctype in _COMPAT[name]:
        size, align, signed = _I386[ctype]
        off = (off + align - 1) // align * align
        fields[fname] = Field(fname, off, size, signed)
        off += size
        align_max = max(align_max, align)
    size = (off + align_max - 1) // align_max * align_max
    return Layout(name, size, fields)


@cache
def guest_layout(name: str, long_mode: bool) -> Layout:
    """``struct name`` as a guest in that mode lays it out."""
    if not long_mode and name in _COMPAT:
        return _compat(name)
    if name in _EXTRA64:
        return Layout(name, _EXTRA64_SIZE[name],
                      {f: Field(f, o, s, False) for f, o, s in _EXTRA64[name]})
    return layout(name)


class SharedInfoLayout:
    """Offsets inside the shared_info page (and a vcpu_info) for one guest mode."""

    def __init__(self, long_mode: bool):
        self.long_mode = long_mode
        self.word = 8 if long_mode else 4                 # xen_ulong_t
        self.bits = self.word * 8
        self.nr_ports = self.word * 8 * self.bits         # 2-level ABI: words * bits per word
        self.vcpu_info_size = 64
        self.upcall_pending = 0
        self.upcall_mask = 1
        self.pending_sel = self.word                       # after two u8s, aligned to the word
        self.time = 32
        self.evtchn_pending = 2048
        self.evtchn_mask = self.evtchn_pending + self.word * self.bits
        self.wc_version = self.evtchn_mask + self.word * self.bits
        self.wc_sec = self.wc_version + 4
        self.wc_nsec = self.wc_version + 8
        self.wc_sec_hi = self.wc_version + 12 if long_mode else self.wc_version + 12 + 24
        self.max_legacy_vcpus = 32


# vcpu_time_info (identical in both modes)
TIME_VERSION, TIME_TSC, TIME_SYSTEM, TIME_MUL, TIME_SHIFT, TIME_FLAGS = 0, 8, 16, 24, 28, 29

SHINFO64 = SharedInfoLayout(True)
SHINFO32 = SharedInfoLayout(False)
