"""cffi API-mode builder for the Xen layer's native code: Xen's public ABI (64-bit layouts)
from libxen-dev's headers, Xen's hypercall calling convention read from the registers KVM
syncs into kvm_run, the hypercalls served in C on the vCPU thread (event-channel send and
unmask from a mirror of the Python state), and the atomic bit operations event channels
need on guest memory.

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
#define XEN_CALL_WAKE ...
#define XEN_EVT_VCPUS ...
#define XEN_EVT_PORTS ...
#define XEN_EVT_SEGS ...
#define XEN_PORT_PYTHON ...
#define XEN_PORT_IPI ...
#define XEN_PORT_LOOP ...
#define XEN_PORT_UNBOUND ...
#define XEN_VI_NONE ...
#define XEN_VI_SHARED ...
#define XEN_VI_GPA ...
#define XEN_UPCALL_NONE ...
#define XEN_UPCALL_MSI ...
#define XEN_UPCALL_PYTHON ...
struct xen_evt_seg { uint64_t gpa; uint64_t size; uint64_t host; };
struct xen_evt_vcpu { uint64_t vi_gpa; uint32_t vi_kind; uint32_t upcall; };
struct xen_evt_dom { uint32_t seq; uint32_t nr_segs; struct xen_evt_seg segs[...];
    uint64_t shinfo; uint32_t word; uint32_t nr_ports; uint32_t pending_off; uint32_t mask_off;
    uint32_t sel_off; uint32_t upcall_off; uint32_t nr_vcpus; struct xen_evt_vcpu vcpus[...];
    uint64_t ports[...]; uint8_t blocked[...]; uint8_t untaken[...]; int vm_fd; ...; };
struct xen_timer_dom { int64_t boot_ns; uint32_t running; uint64_t oneshot[...]; ...; };
struct xen_native_dom { uint32_t version_word; uint8_t on[...]; struct xen_evt_dom evt;
    struct xen_timer_dom timer; ...; };
struct xen_native_vcpu { struct xen_native_dom *dom; uint32_t index; int vcpu_fd;
    uint64_t calls[...]; uint64_t errors[...]; uint64_t sends; uint64_t msi_failures;
    int msi_errno; ...; };
int xen_native_slot(uint64_t op, uint64_t subop);
void xen_timer_set(struct xen_native_dom *d, uint32_t vcpu, uint64_t deadline);
void xen_timer_stop(struct xen_native_dom *d, uint32_t vcpu);
uint64_t xen_timer_get(struct xen_native_dom *d, uint32_t vcpu, int *armed);
uint32_t xen_timers_due(struct xen_native_dom *d, uint32_t n, uint64_t now, uint64_t sleep_until,
                        uint8_t *fired, uint64_t *next);
void xen_timer_kick(struct xen_native_dom *d);
uint32_t xen_timer_seq(struct xen_native_dom *d);
void xen_timer_wait(struct xen_native_dom *d, uint32_t seq, uint64_t timeout_ns);
uintptr_t xen_native_hook_address(void);
void xen_store64(uintptr_t addr, uint64_t value);
void xen_store8(uintptr_t addr, uint8_t value);
/* atomic read-modify-write on guest memory (host addresses) */
uint64_t xen_fetch_or64(uintptr_t addr, uint64_t mask);
uint64_t xen_fetch_and64(uintptr_t addr, uint64_t mask);
uint8_t xen_xchg8(uintptr_t addr, uint8_t value);
uint64_t xen_rdtsc(void);
"""

SOURCE = r"""
#define __XEN_INTERFACE_VERSION__ __XEN_LATEST_INTERFACE_VERSION__
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
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

/* Hypercalls served in C, inside the vCPU's KVM_RUN loop with the GIL released: the hot ones
 * a guest calls in loops. Each (call, sub-op) has a slot; the domain's struct says which slots
 * are on (Python turns on the ones dispatch.NATIVE names) and holds what they need: fixed
 * values, and for event channels a mirror of the Python state (below); each vCPU counts what
 * it served, by call number as the Python dispatcher does (TABLE_SIZE + 1 counters), one
 * writer each. Anything else, anything the mirror cannot answer exactly, and any call from
 * outside the guest kernel goes to Python decoded, nothing done. */
enum { XN_VERSION_VERSION, XN_VERSION_PAGESIZE, XN_SCHED_YIELD, XN_EVTCHN_SEND,
       XN_EVTCHN_UNMASK, XN_SET_TIMER, XN_SSHOT_SET, XN_SSHOT_STOP, XEN_NATIVE_SLOTS };
#define XEN_NATIVE_COUNTERS 65
/* in out[1] when the hook hands over a call it served (result in out[2], counted) whose
 * event may be waited for by a blocked vCPU: Python only wakes the vCPUs */
#define XEN_CALL_WAKE 4u

/* The event-channel mirror. Python writes it, under the event-channel lock (one writer):
 * - under the sequence count (odd while a rewrite is under way; the reader takes a snapshot
 *   and gives up if the count moved): the memory map's RAM segments (guest-physical to host,
 *   overlays and holes left out), shared_info's host address and layout, and per vCPU where
 *   its vcpu_info is and how its upcall is delivered;
 * - each a single aligned word stored whole: per port its kind, its vCPU and (loopback) the
 *   port at the other end; per vCPU whether it may be blocked waiting for an event, and
 *   whether KVM did not take its last upcall (both sides write this one). */
#define XEN_EVT_VCPUS 128
#define XEN_EVT_PORTS 4096           /* the 64-bit 2-level ABI's ports */
#define XEN_EVT_SEGS 64
#define XEN_PORT_PYTHON 0            /* closed, VIRQ, bound to the daemon: Python sends */
#define XEN_PORT_IPI 1
#define XEN_PORT_LOOP 2              /* interdomain, the other end a port of this domain */
#define XEN_PORT_UNBOUND 3           /* no one listens: a send is dropped */
#define XEN_VI_NONE 0                /* no vcpu_info */
#define XEN_VI_SHARED 1              /* the vCPU's slot in shared_info */
#define XEN_VI_GPA 2                 /* registered at vi_gpa */
#define XEN_UPCALL_NONE 0            /* nowhere to deliver */
#define XEN_UPCALL_MSI 1             /* the vector in the low byte, through KVM_SIGNAL_MSI */
#define XEN_UPCALL_PYTHON 2          /* a GSI: Python delivers */
struct xen_evt_seg { uint64_t gpa, size, host; };
struct xen_evt_vcpu { uint64_t vi_gpa; uint32_t vi_kind; uint32_t upcall; };
struct xen_evt_dom {
    uint32_t seq;
    uint32_t nr_segs;                /* > XEN_EVT_SEGS: too many, every lookup fails */
    struct xen_evt_seg segs[XEN_EVT_SEGS];
    uint64_t shinfo;                 /* 0: no shared_info */
    uint32_t word, nr_ports, pending_off, mask_off, sel_off, upcall_off;
    uint32_t nr_vcpus;
    struct xen_evt_vcpu vcpus[XEN_EVT_VCPUS];
    uint64_t ports[XEN_EVT_PORTS];   /* kind | vcpu << 8 | remote port << 32 */
    uint8_t blocked[XEN_EVT_VCPUS];
    uint8_t untaken[XEN_EVT_VCPUS];
    int vm_fd;
};
/* The one-shot timers (timers.py keeps its periodic ones and runs the thread that fires
 * both). Per vCPU a word: 0 when no timer is set, else XEN_TIMER_ARMED | the deadline in Xen
 * system time, capped at XEN_TIMER_MAX (some 292 years: never, as a larger one is). The vCPU
 * sets and stops its own (here, or in Python through the same functions); the timer thread
 * takes an expired one with a compare-and-swap, so a deadline set meanwhile is never lost.
 * The thread reads the wake count, publishes the system time it will sleep until (0 while
 * it is awake and will look again before it sleeps), looks once more, and sleeps on the
 * count (a futex) unless it moved; a setter stores its deadline, then, when the deadline
 * comes before that time, bumps the count and wakes the thread. Each side sees the other's
 * store (both sequentially consistent), so no deadline is slept through. Until the thread
 * runs (``running``), C leaves timer calls to Python, which starts it. */
#define XEN_TIMER_ARMED (1ull << 63)
#define XEN_TIMER_MAX (XEN_TIMER_ARMED - 1)
struct xen_timer_dom {
    int64_t boot_ns;                 /* CLOCK_MONOTONIC at system time 0 (timekeeping.Clock) */
    uint32_t running;                /* the timer thread runs */
    uint32_t wake_seq;               /* the futex the thread sleeps on */
    uint64_t sleep_until;
    uint64_t oneshot[XEN_EVT_VCPUS];
};
struct xen_native_dom {
    uint32_t version_word;           /* XENVER_version's answer: major << 16 | minor */
    uint8_t on[XEN_NATIVE_SLOTS];
    struct xen_evt_dom evt;
    struct xen_timer_dom timer;
};
struct xen_native_vcpu {
    struct xen_native_dom *dom;
    uint32_t index;                  /* its vCPU number */
    int vcpu_fd;                     /* for KVM_TRANSLATE; < 0: event calls go to Python */
    uint64_t calls[XEN_NATIVE_COUNTERS];
    uint64_t errors[XEN_NATIVE_COUNTERS];
    uint64_t sends;                  /* EVTCHNOP_send served (EventChannels.sends) */
    uint64_t msi_failures;           /* KVM_SIGNAL_MSI errors, logged by the timer thread */
    int msi_errno;                   /* the last one's errno */
};
static int xen_native_slot(uint64_t op, uint64_t subop) {
    if (op == __HYPERVISOR_xen_version && subop == XENVER_version) return XN_VERSION_VERSION;
    if (op == __HYPERVISOR_xen_version && subop == XENVER_pagesize) return XN_VERSION_PAGESIZE;
    if (op == __HYPERVISOR_sched_op && subop == SCHEDOP_yield) return XN_SCHED_YIELD;
    if (op == __HYPERVISOR_event_channel_op && subop == EVTCHNOP_send) return XN_EVTCHN_SEND;
    if (op == __HYPERVISOR_event_channel_op && subop == EVTCHNOP_unmask) return XN_EVTCHN_UNMASK;
    if (op == __HYPERVISOR_set_timer_op) return XN_SET_TIMER;     /* its argument is no sub-op */
    if (op == __HYPERVISOR_vcpu_op && subop == VCPUOP_set_singleshot_timer) return XN_SSHOT_SET;
    if (op == __HYPERVISOR_vcpu_op && subop == VCPUOP_stop_singleshot_timer) return XN_SSHOT_STOP;
    return -1;
}
/* -- one-shot timers ---------------------------------------------------------------------- */
static uint64_t xen_timer_now(const struct xen_native_dom *d) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec
                      - __atomic_load_n(&d->timer.boot_ns, __ATOMIC_RELAXED));
}
static void xen_timer_kick(struct xen_native_dom *d) {
    __atomic_add_fetch(&d->timer.wake_seq, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &d->timer.wake_seq, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}
static uint32_t xen_timer_seq(struct xen_native_dom *d) {
    return __atomic_load_n(&d->timer.wake_seq, __ATOMIC_SEQ_CST);
}
/* The timer thread (GIL released): sleep until kicked or ``timeout_ns`` passed, unless the
 * wake count is no longer ``seq``. */
static void xen_timer_wait(struct xen_native_dom *d, uint32_t seq, uint64_t timeout_ns) {
    struct timespec ts = {(time_t)(timeout_ns / 1000000000u), (long)(timeout_ns % 1000000000u)};
    syscall(SYS_futex, &d->timer.wake_seq, FUTEX_WAIT_PRIVATE, seq, &ts, NULL, 0);
}
static void xen_timer_set(struct xen_native_dom *d, uint32_t vcpu, uint64_t deadline) {
    if (vcpu >= XEN_EVT_VCPUS)
        return;
    if (deadline > XEN_TIMER_MAX)
        deadline = XEN_TIMER_MAX;
    __atomic_store_n(&d->timer.oneshot[vcpu], XEN_TIMER_ARMED | deadline, __ATOMIC_SEQ_CST);
    if (deadline < __atomic_load_n(&d->timer.sleep_until, __ATOMIC_SEQ_CST))
        xen_timer_kick(d);
}
static void xen_timer_stop(struct xen_native_dom *d, uint32_t vcpu) {
    if (vcpu < XEN_EVT_VCPUS)
        __atomic_store_n(&d->timer.oneshot[vcpu], 0, __ATOMIC_SEQ_CST);
}
static uint64_t xen_timer_get(struct xen_native_dom *d, uint32_t vcpu, int *armed) {
    uint64_t w = vcpu < XEN_EVT_VCPUS ? __atomic_load_n(&d->timer.oneshot[vcpu], __ATOMIC_SEQ_CST) : 0;
    *armed = (w & XEN_TIMER_ARMED) != 0;
    return w & XEN_TIMER_MAX;
}
/* The timer thread: publish the time it means to sleep until (0: it stays awake), then take
 * every one-shot timer of vCPUs [0, n) due at ``now`` (fired[v] = 1), and the earliest
 * deadline still set (UINT64_MAX: none). Returns how many it took. */
static uint32_t xen_timers_due(struct xen_native_dom *d, uint32_t n, uint64_t now,
                               uint64_t sleep_until, uint8_t *fired, uint64_t *next) {
    uint32_t taken = 0;
    __atomic_store_n(&d->timer.sleep_until, sleep_until, __ATOMIC_SEQ_CST);
    *next = UINT64_MAX;
    if (n > XEN_EVT_VCPUS)
        n = XEN_EVT_VCPUS;
    for (uint32_t v = 0; v < n; v++) {
        fired[v] = 0;
        uint64_t w = __atomic_load_n(&d->timer.oneshot[v], __ATOMIC_SEQ_CST);
        if (!(w & XEN_TIMER_ARMED))
            continue;
        uint64_t at = w & XEN_TIMER_MAX;
        if (at <= now && __atomic_compare_exchange_n(&d->timer.oneshot[v], &w, 0, 0,
                                                     __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            fired[v] = 1;
            taken++;
        } else if (at <= now) {
            *next = 0;               /* set again meanwhile: look again at once */
        } else if (at < *next) {
            *next = at;
        }
    }
    return taken;
}
static void xen_store64(uintptr_t addr, uint64_t value) {
    __atomic_store_n((uint64_t *)addr, value, __ATOMIC_SEQ_CST);
}
static void xen_store8(uintptr_t addr, uint8_t value) {
    __atomic_store_n((uint8_t *)addr, value, __ATOMIC_SEQ_CST);
}

#define EVT_LD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define EVT_FALLBACK (-1)            /* nothing done: Python serves the call */
#define EVT_DONE 0
#define EVT_DONE_WAKE 1

/* What one call needs from the sequence-counted part, read once and checked afterwards. */
struct evt_snap {
    uint32_t seq;
    uint64_t shinfo;
    uint32_t word, bits, nr_ports, pending_off, mask_off, sel_off, upcall_off, nr_vcpus;
};
static int evt_snap_begin(const struct xen_evt_dom *e, struct evt_snap *s) {
    s->seq = __atomic_load_n(&e->seq, __ATOMIC_ACQUIRE);
    if (s->seq & 1)
        return 0;
    s->shinfo = EVT_LD(e->shinfo);
    s->word = EVT_LD(e->word);
    s->nr_ports = EVT_LD(e->nr_ports);
    s->pending_off = EVT_LD(e->pending_off);
    s->mask_off = EVT_LD(e->mask_off);
    s->sel_off = EVT_LD(e->sel_off);
    s->upcall_off = EVT_LD(e->upcall_off);
    s->nr_vcpus = EVT_LD(e->nr_vcpus);
    s->bits = s->word * 8;
    return s->shinfo != 0 && (s->word == 4 || s->word == 8) && s->nr_ports <= XEN_EVT_PORTS
           && s->nr_ports == s->word * 8 * s->bits && s->nr_vcpus <= XEN_EVT_VCPUS
           && s->pending_off + s->nr_ports / 8 <= 4096 && s->mask_off + s->nr_ports / 8 <= 4096
           && s->sel_off + s->word <= 64 && s->upcall_off < 64;
}
/* true when nothing under the count changed since evt_snap_begin */
static int evt_snap_valid(const struct xen_evt_dom *e, const struct evt_snap *s) {
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return __atomic_load_n(&e->seq, __ATOMIC_RELAXED) == s->seq;
}
/* The host address of guest-physical [gpa, gpa + len) when it lies in one RAM slot of the
 * memory map (where an overlay laid in place maps its own page), else 0 (an overlay in a
 * slot of its own, a hole, a ballooned page: Python knows what lies there). */
static uint64_t evt_host(const struct xen_evt_dom *e, uint64_t gpa, uint64_t len) {
    uint32_t n = EVT_LD(e->nr_segs);
    if (n > XEN_EVT_SEGS)
        return 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t g = EVT_LD(e->segs[i].gpa), size = EVT_LD(e->segs[i].size);
        if (gpa >= g && gpa - g < size && len <= size - (gpa - g))
            return EVT_LD(e->segs[i].host) + (gpa - g);
    }
    return 0;
}
/* The 4-byte port number a guest pointer names (evtchn_send, evtchn_unmask), read as
 * guestview.py reads it; 0 (Python reads it and answers, -EFAULT or otherwise) when the
 * pointer is not canonical, crosses a page, is not mapped or does not lie in plain RAM. */
static int evt_read(const struct xen_native_vcpu *v, const struct kvm_run *run,
                    const struct xen_evt_dom *e, const struct evt_snap *s, uint64_t gva,
                    uint64_t flags, void *val, uint32_t len) {
    if (flags & XEN_CALL_LONG) {
        uint64_t top = gva >> 47;
        if (top != 0 && top != 0x1ffff)
            return 0;
    } else if (gva > 0xffffffffull - (len - 1)) {
        return 0;
    }
    if ((gva & 0xfff) > 0x1000 - len)
        return 0;
    uint64_t gpa = gva;
    if (run->s.regs.sregs.cr0 & (1ull << 31)) {          /* CR0.PG */
        struct kvm_translation t;
        memset(&t, 0, sizeof t);
        t.linear_address = gva & ~0xfffull;
        if (v->vcpu_fd < 0 || ioctl(v->vcpu_fd, KVM_TRANSLATE, &t) < 0 || !t.valid
            || t.physical_address == ~0ull)
            return 0;
        gpa = (t.physical_address & ~0xfffull) | (gva & 0xfff);
    }
    uint64_t host = evt_host(e, gpa, len);
    if (!host || !evt_snap_valid(e, s))   /* never an address from a half-written map */
        return 0;
    memcpy(val, (const void *)host, len);
    return 1;
}
/* Atomic bit operations on the guest's words (4 or 8 bytes), as evtchn.py's; the old bit. */
static int evt_set_bit(uint64_t addr, uint32_t bit, uint32_t word) {
    if (word == 8)
        return __atomic_fetch_or((uint64_t *)addr, 1ull << bit, __ATOMIC_SEQ_CST) >> bit & 1;
    return __atomic_fetch_or((uint32_t *)addr, 1u << bit, __ATOMIC_SEQ_CST) >> bit & 1;
}
static int evt_clear_bit(uint64_t addr, uint32_t bit, uint32_t word) {
    if (word == 8)
        return __atomic_fetch_and((uint64_t *)addr, ~(1ull << bit), __ATOMIC_SEQ_CST) >> bit & 1;
    return __atomic_fetch_and((uint32_t *)addr, ~(1u << bit), __ATOMIC_SEQ_CST) >> bit & 1;
}
static int evt_test_bit(uint64_t addr, uint32_t bit, uint32_t word) {
    if (word == 8)
        return __atomic_load_n((uint64_t *)addr, __ATOMIC_SEQ_CST) >> bit & 1;
    return __atomic_load_n((uint32_t *)addr, __ATOMIC_SEQ_CST) >> bit & 1;
}
/* Where a vCPU's events go, resolved before anything is written. */
struct evt_target {
    uint32_t vcpu;
    uint64_t vi;                     /* host address of its vcpu_info, 0: none */
    uint32_t upcall;                 /* XEN_UPCALL_* << 8 | vector */
};
static int evt_target(const struct xen_evt_dom *e, const struct evt_snap *s, uint32_t vcpu,
                      struct evt_target *t) {
    if (vcpu >= s->nr_vcpus)
        return 0;
    const struct xen_evt_vcpu *ev = &e->vcpus[vcpu];
    uint32_t kind = EVT_LD(ev->vi_kind);
    t->vcpu = vcpu;
    t->upcall = EVT_LD(ev->upcall);
    if (t->upcall >> 8 != XEN_UPCALL_NONE && t->upcall >> 8 != XEN_UPCALL_MSI)
        return 0;                    /* a GSI: Python raises the line */
    if (kind == XEN_VI_NONE)
        t->vi = 0;
    else if (kind == XEN_VI_SHARED && vcpu < 32)
        t->vi = s->shinfo + vcpu * 64ull;
    else if (kind == XEN_VI_GPA)
        t->vi = evt_host(e, EVT_LD(ev->vi_gpa), 64);
    else
        return 0;
    return kind == XEN_VI_NONE || t->vi != 0;
}
/* hvm.py's Upcalls.inject and retry for a vector delivered as an MSI */
static void evt_inject(struct xen_native_vcpu *v, const struct evt_target *t) {
    struct xen_evt_dom *e = &v->dom->evt;
    if (t->upcall >> 8 != XEN_UPCALL_MSI)
        return;
    struct kvm_msi msi;
    memset(&msi, 0, sizeof msi);
    msi.address_lo = 0xfee00000u | (t->vcpu & 0xff) << 12;
    msi.data = t->upcall & 0xff;
    int r = ioctl(EVT_LD(e->vm_fd), KVM_SIGNAL_MSI, &msi);
    if (r > 0)
        __atomic_store_n(&e->untaken[t->vcpu], 0, __ATOMIC_SEQ_CST);
    else if (r == 0)
        __atomic_store_n(&e->untaken[t->vcpu], 1, __ATOMIC_SEQ_CST);
    else {
        __atomic_store_n(&v->msi_errno, errno, __ATOMIC_RELAXED);
        __atomic_store_n(&v->msi_failures, v->msi_failures + 1, __ATOMIC_RELAXED);
    }
}
static void evt_retry(struct xen_native_vcpu *v, const struct evt_snap *s,
                      const struct evt_target *t) {
    struct xen_evt_dom *e = &v->dom->evt;
    if (!__atomic_load_n(&e->untaken[t->vcpu], __ATOMIC_SEQ_CST))
        return;
    if (t->vi && __atomic_load_n((uint8_t *)(t->vi + s->upcall_off), __ATOMIC_SEQ_CST))
        evt_inject(v, t);
    else
        __atomic_store_n(&e->untaken[t->vcpu], 0, __ATOMIC_SEQ_CST);
}
/* evtchn.py's _flag_vcpu and _flag_upcall: the selector bit, the upcall flag, the upcall */
static void evt_flag_vcpu(struct xen_native_vcpu *v, const struct evt_snap *s,
                          const struct evt_target *t, uint32_t word) {
    if (t->vi && !evt_set_bit(t->vi + s->sel_off, word, s->word)) {
        if (!__atomic_exchange_n((uint8_t *)(t->vi + s->upcall_off), 1, __ATOMIC_SEQ_CST))
            evt_inject(v, t);
        else
            evt_retry(v, s, t);
    } else {
        evt_retry(v, s, t);
    }
}
static uint32_t evt_port_vcpu(const struct xen_evt_dom *e, uint32_t port) {
    return (uint32_t)(__atomic_load_n(&e->ports[port], __ATOMIC_ACQUIRE) >> 8) & 0xffffff;
}
/* EVTCHNOP_send: evtchn.py's send and raise_port for IPI, loopback and unbound ports. Set
 * the bits, then look for a vCPU that may be blocked (it set its flag before looking at the
 * bits, so one of the two sides sees the other). */
static int evt_send(struct xen_native_vcpu *v, uint32_t port, const struct evt_snap *s) {
    struct xen_evt_dom *e = &v->dom->evt;
    if (port == 0 || port >= s->nr_ports)
        return EVT_FALLBACK;
    uint64_t entry = __atomic_load_n(&e->ports[port], __ATOMIC_ACQUIRE);
    uint32_t kind = entry & 0xff, target = port;
    if (kind == XEN_PORT_UNBOUND) {
        if (!evt_snap_valid(e, s))
            return EVT_FALLBACK;
        __atomic_store_n(&v->sends, v->sends + 1, __ATOMIC_RELAXED);
        return EVT_DONE;
    }
    if (kind == XEN_PORT_LOOP)
        target = (uint32_t)(entry >> 32);
    else if (kind != XEN_PORT_IPI)
        return EVT_FALLBACK;
    if (target == 0 || target >= s->nr_ports)
        return EVT_FALLBACK;
    struct evt_target t;
    if (!evt_target(e, s, evt_port_vcpu(e, target), &t) || !evt_snap_valid(e, s))
        return EVT_FALLBACK;
    __atomic_store_n(&v->sends, v->sends + 1, __ATOMIC_RELAXED);
    uint32_t word = target / s->bits, bit = target % s->bits;
    if (!evt_set_bit(s->shinfo + s->pending_off + word * s->word, bit, s->word)
        && !evt_test_bit(s->shinfo + s->mask_off + word * s->word, bit, s->word))
        evt_flag_vcpu(v, s, &t, word);
    for (uint32_t i = 0; i < s->nr_vcpus; i++)
        if (__atomic_load_n(&e->blocked[i], __ATOMIC_SEQ_CST))
            return EVT_DONE_WAKE;
    return EVT_DONE;
}
/* EVTCHNOP_unmask: evtchn.py's unmask */
static int evt_unmask(struct xen_native_vcpu *v, uint32_t port, const struct evt_snap *s) {
    struct xen_evt_dom *e = &v->dom->evt;
    if (port == 0 || port >= s->nr_ports)
        return EVT_FALLBACK;
    struct evt_target t;
    if (!evt_target(e, s, evt_port_vcpu(e, port), &t) || !evt_snap_valid(e, s))
        return EVT_FALLBACK;
    uint32_t word = port / s->bits, bit = port % s->bits;
    evt_clear_bit(s->shinfo + s->mask_off + word * s->word, bit, s->word);
    if (evt_test_bit(s->shinfo + s->pending_off + word * s->word, bit, s->word))
        evt_flag_vcpu(v, s, &t, word);
    return EVT_DONE;
}
static int evt_call(struct xen_native_vcpu *v, const struct kvm_run *run, int slot,
                    const uint64_t *out) {
    const struct xen_evt_dom *e = &v->dom->evt;
    struct evt_snap s;
    uint32_t port;
    if (!evt_snap_begin(e, &s) || !evt_read(v, run, e, &s, out[3], out[1], &port, 4))
        return EVT_FALLBACK;
    return slot == XN_EVTCHN_SEND ? evt_send(v, port, &s) : evt_unmask(v, port, &s);
}
/* set_timer_op and the calling vCPU's one-shot timer (sched.py, vcpu_op.py); -1: Python
 * answers (another vCPU's timer, a pointer C cannot read, a deadline already passed that
 * the caller asked to be refused: the rare cases, with Python's errors and counts). */
static int timer_call(struct xen_native_vcpu *v, const struct kvm_run *run, int slot,
                      const uint64_t *out) {
    struct xen_native_dom *d = v->dom;
    if (!__atomic_load_n(&d->timer.running, __ATOMIC_SEQ_CST))
        return -1;
    if (slot == XN_SET_TIMER) {
        uint64_t t = out[1] & XEN_CALL_LONG ? out[2] : out[3] << 32 | out[2];
        if (t == 0)
            xen_timer_stop(d, v->index);
        else
            xen_timer_set(d, v->index, t);
        return 0;
    }
    if (out[3] != v->index)
        return -1;
    if (slot == XN_SSHOT_STOP) {
        xen_timer_stop(d, v->index);
        return 0;
    }
    const struct xen_evt_dom *e = &d->evt;
    struct evt_snap s;
    uint8_t arg[12];                 /* vcpu_set_singleshot_timer: timeout_abs_ns, flags */
    if (!evt_snap_begin(e, &s) || !evt_read(v, run, e, &s, out[4], out[1], arg, sizeof arg))
        return -1;
    uint64_t at;
    uint32_t flags;
    memcpy(&at, arg, 8);
    memcpy(&flags, arg + 8, 4);
    if ((flags & VCPU_SSHOTTMR_future) && at < xen_timer_now(d))
        return -1;
    xen_timer_set(d, v->index, at);
    return 0;
}

static int xen_native_hook(void *run, uint64_t *out, void *ctx) {
    struct xen_native_vcpu *v = ctx;
    xen_decode_call(run, out, NULL);
    if (v == NULL || (out[1] & XEN_CALL_USER))
        return 0;                    /* Xen refuses a user-mode caller: Python answers */
    int slot = xen_native_slot(out[0], out[2]);
    if (slot < 0 || !__atomic_load_n(&v->dom->on[slot], __ATOMIC_RELAXED))
        return 0;
    int64_t ret = 0;
    int wake = 0;
    switch (slot) {
    case XN_VERSION_VERSION: ret = v->dom->version_word; break;
    case XN_VERSION_PAGESIZE: ret = 4096; break;
    case XN_SCHED_YIELD: sched_yield(); break;
    case XN_SET_TIMER: case XN_SSHOT_SET: case XN_SSHOT_STOP:
        if (timer_call(v, run, slot, out) < 0)
            return 0;
        break;
    default: {                       /* XN_EVTCHN_SEND, XN_EVTCHN_UNMASK */
        int r = evt_call(v, run, slot, out);
        if (r == EVT_FALLBACK)
            return 0;
        wake = r == EVT_DONE_WAKE;
        break;
    }
    }
    uint64_t nr = out[0];            /* < XEN_NATIVE_COUNTERS: every slot's call is */
    __atomic_store_n(&v->calls[nr], v->calls[nr] + 1, __ATOMIC_RELAXED);
    if (ret < 0)
        __atomic_store_n(&v->errors[nr], v->errors[nr] + 1, __ATOMIC_RELAXED);
    if (wake) {                      /* served: Python wakes the vCPUs and returns out[2] */
        out[1] |= XEN_CALL_WAKE;
        out[2] = (uint64_t)ret;
        return 0;
    }
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
