"""The direct-hypercall rewrite on Debian's cloud kernel: exactly Linux's two routines are
rewritten; every other vmcall/vmmcall byte sequence (KVM's, VMware's, SEV's, data) stays."""

from __future__ import annotations

from xend_lite.machine.kernel import unpack_kernel
from xend_lite.xen.hypercall_patch import patch_xen_hypercalls, replacement


def test_cloud_kernel_routines_are_found_and_nothing_else(linux_kernel):
    elf = unpack_kernel(linux_kernel().read_bytes()).elf
    result = patch_xen_hypercalls(elf)
    got = {p.routine: p for p in result.patched}
    assert set(got) == {"xen_hypercall_intel", "xen_hypercall_amd"}
    intel, amd = got["xen_hypercall_intel"].site, got["xen_hypercall_amd"].site
    assert intel.vaddr % 16 == 0 and amd.vaddr % 16 == 0 and abs(intel.vaddr - amd.vaddr) <= 64
    for p in result.patched:
        assert p.site.after[:1] in (b"\xc3", b"\xe9")      # ret, or jmp to the return thunk
        assert result.image[p.site.offset:p.site.offset + 3] == replacement()
    diff = [i for i, (a, b) in enumerate(zip(elf, result.image)) if a != b]
    assert len(diff) == 6 and len(result.image) == len(elf)
    # the kernel also holds KVM's inline vmcalls, VMware's, SEV's vmgexit, and stray bytes
    reasons = {s.reason for s in result.skipped}
    assert len(result.skipped) >= 10
    assert any(r.startswith("inline") for r in reasons) and any("vmgexit" in r for r in reasons)
