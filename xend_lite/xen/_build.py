"""cffi API-mode builder for the Xen layer's native code: Xen's public ABI (64-bit layouts)
from libxen-dev's headers, Xen's hypercall calling convention read from the registers KVM
syncs into kvm_run, and the atomic bit operations event channels need on guest memory.

Structs are declared with ``...;`` so the compiler supplies sizes and offsets; numbers are
``#define X ...`` so their values come from the headers. Built at install time into
``xend_lite.xen._xen``; ``xend_lite.xen.xenabi`` and ``xend_lite.xen.native`` are its only
readers.
"""

from cffi import FFI

CONSTANTS = """
__HYPERVISOR_set_trap_table __HYPERVISOR_mmu_update __HYPERVISOR_set_gdt
__HYPERVISOR_stack_switch __HYPERVISOR_set_callbacks __HYPERVISOR_fpu_taskswitch
__HYPERVISOR_sched_op_compat __HYPERVISOR_platform_op __HYPERVISOR_set_debugreg
__HYPERVISOR_get_debugreg __HYPERVISOR_update_descriptor __HYPERVISOR_memory_op
__HYPERVISOR_multicall __HYPERVISOR_update_va_mapping __HYPERVISOR_set_timer_op
__HYPERVISOR_event_channel_op_compat __HYPERVISOR_xen_version __HYPERVISOR_console_io
__HYPERVISOR_physdev_op_compat __HYPERVISOR_grant_table_op __HYPERVISOR_vm_assist
__HYPERVISOR_update_va_mapping_otherdomain __HYPERVISOR_iret __HYPERVISOR_vcpu_op
__HYPERVISOR_set_segment_base __HYPERVISOR_mmuext_op __HYPERVISOR_xsm_op
__HYPERVISOR_nmi_op __HYPERVISOR_sched_op __HYPERVISOR_callback_op __HYPERVISOR_xenoprof_op
__HYPERVISOR_event_channel_op __HYPERVISOR_physdev_op __HYPERVISOR_hvm_op
__HYPERVISOR_sysctl __HYPERVISOR_domctl __HYPERVISOR_kexec_op __HYPERVISOR_tmem_op
__HYPERVISOR_argo_op __HYPERVISOR_xenpmu_op __HYPERVISOR_dm_op __HYPERVISOR_hypfs_op

XEN_EPERM XEN_ENOENT XEN_ESRCH XEN_EIO XEN_ENXIO XEN_E2BIG XEN_ENOEXEC XEN_EBADF
XEN_ECHILD XEN_EAGAIN XEN_ENOMEM XEN_EACCES XEN_EFAULT XEN_EBUSY XEN_EEXIST XEN_EXDEV
XEN_ENODEV XEN_EINVAL XEN_ENFILE XEN_EMFILE XEN_ENOSPC XEN_EROFS XEN_EMLINK XEN_EDOM
XEN_ERANGE XEN_EDEADLK XEN_ENAMETOOLONG XEN_ENOLCK XEN_ENOSYS XEN_ENODATA XEN_ETIME
XEN_EBADMSG XEN_EOVERFLOW XEN_EILSEQ XEN_ENOTEMPTY XEN_EOPNOTSUPP
XEN_ETIMEDOUT XEN_EISCONN XEN_ENOTCONN

XENVER_version XENVER_extraversion XENVER_compile_info XENVER_capabilities XENVER_changeset
XENVER_platform_parameters XENVER_get_features XENVER_pagesize XENVER_guest_handle
XENVER_commandline XENVER_build_id
XENFEAT_writable_page_tables XENFEAT_auto_translated_physmap XENFEAT_supervisor_mode_kernel
XENFEAT_hvm_callback_vector XENFEAT_hvm_safe_pvclock XENFEAT_hvm_pirqs XENFEAT_memory_op_vnode_supported
XENFEAT_NR_SUBMAPS

XENMEM_increase_reservation XENMEM_decrease_reservation XENMEM_populate_physmap
XENMEM_maximum_ram_page XENMEM_current_reservation XENMEM_maximum_reservation
XENMEM_add_to_physmap XENMEM_add_to_physmap_batch XENMEM_memory_map XENMEM_machine_memory_map
XENMEM_remove_from_physmap XENMEM_maximum_gpfn XENMEM_set_memory_map
XENMAPSPACE_shared_info XENMAPSPACE_grant_table XENMAPSPACE_gmfn XENMAPSPACE_gmfn_range
XENMAPSPACE_gmfn_foreign XENMAPSPACE_dev_mmio XENMAPIDX_grant_table_status
XENMEMF_populate_on_demand

HVMOP_set_param HVMOP_get_param HVMOP_set_evtchn_upcall_vector HVMOP_pagetable_dying
HVMOP_get_time HVMOP_flush_tlbs
HVM_PARAM_CALLBACK_IRQ HVM_PARAM_STORE_PFN HVM_PARAM_STORE_EVTCHN 
HVM_PARAM_IOREQ_PFN HVM_PARAM_BUFIOREQ_PFN HVM_PARAM_TIMER_MODE HVM_PARAM_HPET_ENABLED
HVM_PARAM_CONSOLE_PFN HVM_PARAM_CONSOLE_EVTCHN HVM_PARAM_NR_IOREQ_SERVER_PAGES
HVM_NR_PARAMS HVM_PARAM_CALLBACK_TYPE_GSI HVM_PARAM_CALLBACK_TYPE_PCI_INTX
HVM_PARAM_CALLBACK_TYPE_VECTOR HVM_PARAM_VM86_TSS HVM_PARAM_ACPI_IOPORTS_LOCATION
HVM_PARAM_VM_GENERATION_ID_ADDR HVM_PARAM_ALTP2M HVM_PARAM_X87_FIP_WIDTH HVM_PARAM_VM86_TSS_SIZED

CONSOLEIO_write CONSOLEIO_read

SCHEDOP_yield SCHEDOP_block SCHEDOP_shutdown SCHEDOP_poll SCHEDOP_remote_shutdown
SCHEDOP_shutdown_code SCHEDOP_watchdog SCHEDOP_pin_override
SHUTDOWN_poweroff SHUTDOWN_reboot SHUTDOWN_suspend SHUTDOWN_crash SHUTDOWN_watchdog
SHUTDOWN_soft_reset

EVTCHNOP_bind_interdomain EVTCHNOP_bind_virq EVTCHNOP_bind_pirq EVTCHNOP_close
EVTCHNOP_send EVTCHNOP_status EVTCHNOP_alloc_unbound EVTCHNOP_bind_ipi EVTCHNOP_bind_vcpu
EVTCHNOP_unmask EVTCHNOP_reset EVTCHNOP_init_control EVTCHNOP_expand_array
EVTCHNOP_set_priority 
EVTCHNSTAT_closed EVTCHNSTAT_unbound EVTCHNSTAT_interdomain EVTCHNSTAT_pirq
EVTCHNSTAT_virq EVTCHNSTAT_ipi
VIRQ_TIMER VIRQ_DEBUG VIRQ_CONSOLE VIRQ_DOM_EXC NR_VIRQS

GNTTABOP_map_grant_ref GNTTABOP_unmap_grant_ref GNTTABOP_setup_table GNTTABOP_dump_table
GNTTABOP_transfer GNTTABOP_copy GNTTABOP_query_size GNTTABOP_unmap_and_replace
GNTTABOP_set_version GNTTABOP_get_status_frames GNTTABOP_get_version GNTTABOP_swap_grant_ref
GNTTABOP_cache_flush
GNTST_okay GNTST_general_error GNTST_bad_domain GNTST_permission_denied

VCPUOP_initialise VCPUOP_up VCPUOP_down VCPUOP_is_up VCPUOP_get_runstate_info
RUNSTATE_running RUNSTATE_runnable RUNSTATE_blocked RUNSTATE_offline
VCPUOP_register_runstate_memory_area VCPUOP_set_periodic_timer VCPUOP_stop_periodic_timer
VCPUOP_set_singleshot_timer VCPUOP_stop_singleshot_timer VCPUOP_register_vcpu_info
VCPUOP_send_nmi VCPUOP_get_physid VCPUOP_register_vcpu_time_memory_area
VCPU_SSHOTTMR_future

DOMID_SELF DOMID_FIRST_RESERVED XEN_LEGACY_MAX_VCPUS
XEN_CPUID_FIRST_LEAF XEN_CPUID_MAX_NUM_LEAVES
XEN_HVM_CPUID_APIC_ACCESS_VIRT XEN_HVM_CPUID_X2APIC_VIRT XEN_HVM_CPUID_IOMMU_MAPPINGS
XEN_HVM_CPUID_VCPU_ID_PRESENT XEN_HVM_CPUID_DOMID_PRESENT XEN_HVM_CPUID_UPCALL_VECTOR
XEN_ELFNOTE_PHYS32_ENTRY
""".split()

STRUCTS = r"""
typedef uint16_t domid_t;
typedef uint32_t evtchn_port_t;
typedef uint32_t grant_ref_t;

struct vcpu_time_info { uint32_t version; uint64_t tsc_timestamp; uint64_t system_time;
    uint32_t tsc_to_system_mul; int8_t tsc_shift; uint8_t flags; ...; };
struct arch_vcpu_info { unsigned long cr2; ...; };
struct vcpu_info { uint8_t evtchn_upcall_pending; uint8_t evtchn_upcall_mask;
    unsigned long evtchn_pending_sel; struct arch_vcpu_info arch; struct vcpu_time_info time; ...; };
struct arch_shared_info { unsigned long max_pfn; ...; };
struct shared_info { struct vcpu_info vcpu_info[...]; unsigned long evtchn_pending[...];
    unsigned long evtchn_mask[...]; uint32_t wc_version; uint32_t wc_sec; uint32_t wc_nsec;
    uint32_t wc_sec_hi; struct arch_shared_info arch; ...; };

struct xen_add_to_physmap { domid_t domid; uint16_t size; unsigned int space;
    unsigned long idx; unsigned long gpfn; ...; };
struct xen_memory_reservation { void *extent_start; unsigned long nr_extents;
    unsigned int extent_order; unsigned int mem_flags; domid_t domid; ...; };
struct xen_memory_map { unsigned int nr_entries; void *buffer; ...; };
struct xen_foreign_memory_map { domid_t domid; struct xen_memory_map map; ...; };

struct xen_hvm_param { domid_t domid; uint32_t index; uint64_t value; ...; };
struct xen_hvm_evtchn_upcall_vector { uint32_t vcpu; uint8_t vector; ...; };

struct sched_shutdown { unsigned int reason; ...; };
struct sched_poll { void *ports; unsigned int nr_ports; uint64_t timeout; ...; };

struct evtchn_alloc_unbound { domid_t dom; domid_t remote_dom; evtchn_port_t port; ...; };
struct evtchn_bind_interdomain { domid_t remote_dom; evtchn_port_t remote_port;
    evtchn_port_t local_port; ...; };
struct evtchn_bind_virq { uint32_t virq; uint32_t vcpu; evtchn_port_t port; ...; };
struct evtchn_bind_ipi { uint32_t vcpu; evtchn_port_t port; ...; };
struct evtchn_close { evtchn_port_t port; ...; };
struct evtchn_send { evtchn_port_t port; ...; };
struct evtchn_status { domid_t dom; evtchn_port_t port; uint32_t status; uint32_t vcpu; ...; };
struct evtchn_unmask { evtchn_port_t port; ...; };
struct evtchn_bind_vcpu { evtchn_port_t port; uint32_t vcpu; ...; };
struct evtchn_init_control { uint64_t control_gfn; uint32_t offset; uint32_t vcpu; uint8_t link_bits; ...; };
struct evtchn_set_priority { evtchn_port_t port; uint32_t priority; ...; };

struct gnttab_setup_table { domid_t dom; uint32_t nr_frames; int16_t status; void *frame_list; ...; };
struct gnttab_query_size { domid_t dom; uint32_t nr_frames; uint32_t max_nr_frames; int16_t status; ...; };
struct gnttab_set_version { uint32_t version; ...; };
struct gnttab_get_version { domid_t dom; uint16_t pad; uint32_t version; ...; };
struct grant_entry_v1 { uint16_t flags; domid_t domid; uint32_t frame; ...; };

struct vcpu_register_vcpu_info { uint64_t mfn; uint32_t offset; uint32_t rsvd; ...; };
struct vcpu_set_singleshot_timer { uint64_t timeout_abs_ns; uint32_t flags; ...; };
struct vcpu_set_periodic_timer { uint64_t period_ns; ...; };
struct vcpu_runstate_info { int state; uint64_t state_entry_time; uint64_t time[4]; ...; };

struct xen_feature_info { unsigned int submap_idx; uint32_t submap; ...; };
struct xen_platform_parameters { unsigned long virt_start; ...; };

/* the hypercall calling convention, on the registers KVM synced into kvm_run */
#define XEN_CALL_LONG ...
#define XEN_CALL_USER ...
uintptr_t xen_decode_call_address(void);
int xen_decode_call(void *run, uint64_t *out, void *ctx);
/* hypercalls served in C on the vCPU thread (see the source) */
#define XEN_NATIVE_SLOTS ...
#define XEN_NATIVE_COUNTERS ...
struct xen_native_dom { uint32_t version_word; uint8_t on[...]; ...; };
struct xen_native_vcpu { struct xen_native_dom *dom; uint64_t calls[...]; uint64_t errors[...]; ...; };
int xen_native_slot(uint64_t op, uint64_t subop);
uintptr_t xen_native_hook_address(void);
/* atomic read-modify-write on guest memory (host addresses) */
uint64_t xen_fetch_or64(uintptr_t addr, uint64_t mask);
uint64_t xen_fetch_and64(uintptr_t addr, uint64_t mask);
uint8_t xen_xchg8(uintptr_t addr, uint8_t value);
uint64_t xen_rdtsc(void);
"""

SOURCE = r"""
#define __XEN_INTERFACE_VERSION__ __XEN_LATEST_INTERFACE_VERSION__
#include <sched.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/errno.h>
#include <xen/version.h>
#include <xen/features.h>
#include <xen/memory.h>
#include <xen/sched.h>
#include <xen/event_channel.h>
#include <xen/grant_table.h>
#include <xen/vcpu.h>
#include <xen/hvm/params.h>
#include <xen/hvm/hvm_op.h>
#include <xen/arch-x86/cpuid.h>
#include <xen/elfnote.h>
#include <linux/kvm.h>

/* A hypercall made by a port write (the stub page) or a rewritten vmcall, in the convention
 * of the caller's mode: out[0] the call number (EAX), out[1] XEN_CALL_* flags, out[2..6] the
 * five arguments (64-bit mode: RDI RSI RDX R10 R8; otherwise EBX ECX EDX ESI EDI,
 * zero-extended). XEN_CALL_USER: the caller is not the guest kernel (CPL > 0 in protected
 * mode, or virtual-8086 mode). Called by the KVM layer's run loop right after the exit, with
 * the kvm_run it exited on. */
#define XEN_CALL_LONG 1u
#define XEN_CALL_USER 2u
static int xen_decode_call(void *run_ptr, uint64_t *out, void *ctx) {
    const struct kvm_run *run = run_ptr;
    const struct kvm_regs *r = &run->s.regs.regs;
    const struct kvm_sregs *s = &run->s.regs.sregs;
    uint64_t lng = s->cs.l && (s->efer & (1u << 10)) ? XEN_CALL_LONG : 0;   /* EFER.LMA */
    uint64_t user = (s->cr0 & 1u) && ((s->cs.selector & 3u)
                                      || (!lng && (r->rflags & (1u << 17))))   /* RFLAGS.VM */
                    ? XEN_CALL_USER : 0;
    (void)ctx;
    out[0] = (uint32_t)r->rax;
    out[1] = lng | user;
    if (lng) {
        out[2] = r->rdi; out[3] = r->rsi; out[4] = r->rdx; out[5] = r->r10; out[6] = r->r8;
    } else {
        out[2] = (uint32_t)r->rbx; out[3] = (uint32_t)r->rcx; out[4] = (uint32_t)r->rdx;
        out[5] = (uint32_t)r->rsi; out[6] = (uint32_t)r->rdi;
    }
    return 0;                        /* decoded for the Python dispatcher */
}
static uintptr_t xen_decode_call_address(void) { return (uintptr_t)&xen_decode_call; }

/* Hypercalls served in C, inside the vCPU's KVM_RUN loop with the GIL released: the ones a
 * guest calls in loops that need no state but numbers fixed at set-up. Each (call, sub-op)
 * has a slot; the domain's struct says which slots are on (Python turns on the ones
 * dispatch.NATIVE names) and holds the fixed values; each vCPU counts what it served, by
 * call number as the Python dispatcher does (TABLE_SIZE + 1 counters), one writer each.
 * Anything else, and any call from outside the guest kernel, goes to Python decoded. */
enum { XN_VERSION_VERSION, XN_VERSION_PAGESIZE, XN_SCHED_YIELD, XEN_NATIVE_SLOTS };
#define XEN_NATIVE_COUNTERS 65
struct xen_native_dom {
    uint32_t version_word;           /* XENVER_version's answer: major << 16 | minor */
    uint8_t on[XEN_NATIVE_SLOTS];
};
struct xen_native_vcpu {
    struct xen_native_dom *dom;
    uint64_t calls[XEN_NATIVE_COUNTERS];
    uint64_t errors[XEN_NATIVE_COUNTERS];
};
static int xen_native_slot(uint64_t op, uint64_t subop) {
    if (op == __HYPERVISOR_xen_version && subop == XENVER_version) return XN_VERSION_VERSION;
    if (op == __HYPERVISOR_xen_version && subop == XENVER_pagesize) return XN_VERSION_PAGESIZE;
    if (op == __HYPERVISOR_sched_op && subop == SCHEDOP_yield) return XN_SCHED_YIELD;
    return -1;
}
static int xen_native_hook(void *run, uint64_t *out, void *ctx) {
    struct xen_native_vcpu *v = ctx;
    xen_decode_call(run, out, NULL);
    if (v == NULL || (out[1] & XEN_CALL_USER))
        return 0;                    /* Xen refuses a user-mode caller: Python answers */
    int slot = xen_native_slot(out[0], out[2]);
    if (slot < 0 || !__atomic_load_n(&v->dom->on[slot], __ATOMIC_RELAXED))
        return 0;
    int64_t ret;
    switch (slot) {
    case XN_VERSION_VERSION: ret = v->dom->version_word; break;
    case XN_VERSION_PAGESIZE: ret = 4096; break;
    default: sched_yield(); ret = 0; break;        /* XN_SCHED_YIELD */
    }
    uint64_t nr = out[0];            /* < XEN_NATIVE_COUNTERS: every slot's call is */
    __atomic_store_n(&v->calls[nr], v->calls[nr] + 1, __ATOMIC_RELAXED);
    if (ret < 0)
        __atomic_store_n(&v->errors[nr], v->errors[nr] + 1, __ATOMIC_RELAXED);
    out[0] = (uint64_t)ret & (out[1] & XEN_CALL_LONG ? ~0ull : 0xffffffffull);
    return 1;
}
static uintptr_t xen_native_hook_address(void) { return (uintptr_t)&xen_native_hook; }
/* Event-channel bitmaps the guest updates with locked instructions at the same time. */
static uint64_t xen_fetch_or64(uintptr_t addr, uint64_t mask) {
    return __atomic_fetch_or((uint64_t *)addr, mask, __ATOMIC_SEQ_CST);
}
static uint64_t xen_fetch_and64(uintptr_t addr, uint64_t mask) {
    return __atomic_fetch_and((uint64_t *)addr, mask, __ATOMIC_SEQ_CST);
}
static uint8_t xen_xchg8(uintptr_t addr, uint8_t value) {
    return __atomic_exchange_n((uint8_t *)addr, value, __ATOMIC_SEQ_CST);
}
static uint64_t xen_rdtsc(void) {
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
"""

ffi = FFI()
ffi.cdef("\n".join(f"#define {name} ..." for name in CONSTANTS) + STRUCTS)
ffi.set_source("xend_lite.xen._xen", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffi.compile(verbose=True)
