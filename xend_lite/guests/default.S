/* xend-lite's default guest: a tiny PVH kernel that finds Xen the way a real guest does.
 *
 * It enters long mode, scans the hypervisor CPUID leaves for "XenVMMXenVMM", installs the
 * hypercall page through the MSR the leaves name, asks xen_version, writes to the Xen
 * console, maps shared_info with XENMEM_add_to_physmap, prints the wall clock, and then
 * sleeps in SCHEDOP_poll with a one-second timeout computed from its vcpu_time_info,
 * printing a heartbeat every ten seconds. Without Xen it says so and idles.
 *
 * Rebuild with: python -m xend_lite.guests.build_default (a test checks default.elf
 * matches this source). */
#include "guest.h"

#define HYPERCALL(nr) call hypercall_page + (nr) * 32
#define HC_MEMORY_OP 12
#define HC_XEN_VERSION 17
#define HC_CONSOLE_IO 18
#define HC_SCHED_OP 29
#define CONSOLEIO_WRITE 0
#define XENVER_VERSION 0
#define XENMEM_ADD_TO_PHYSMAP 7
#define SCHEDOP_POLL 3
#define SHINFO_GPA 0x400000
#define VCPU0_TIME (SHINFO_GPA + 32)
#define WC_SEC (SHINFO_GPA + 3076)
#define HEARTBEAT_EVERY 10

    START64
    PUTS64(banner)

    /* Find the Xen leaves: Xen puts them at 0x40000000 or 0x40000100, in 0x100 steps. */
    movl $0x40000000, %r12d
1:  movl %r12d, %eax
    cpuid
    cmpl $0x566e6558, %ebx          /* "XenV" */
    jne 2f
    cmpl $0x65584d4d, %ecx          /* "MMXe" */
    jne 2f
    cmpl $0x4d4d566e, %edx          /* "nVMM" */
    je found_xen
2:  addl $0x100, %r12d
    cmpl $0x40010000, %r12d
    jb 1b
    PUTS64(no_xen)
idle:
    pause
    jmp idle

found_xen:
    leal 2(%r12), %eax              /* leaf base+2: EAX pages, EBX the MSR */
    cpuid
    movl %ebx, %ecx
    leaq hypercall_page(%rip), %rax
    xorl %edx, %edx
    wrmsr

    movl $XENVER_VERSION, %edi
    xorl %esi, %esi
    HYPERCALL(HC_XEN_VERSION)
    movl %eax, %r13d                /* major << 16 | minor */

    PUTS64(found_msg)
    movl %r13d, %eax
    shrl $16, %eax
    call put_dec
    movb $'.', %al
    outb %al, $DEBUG_PORT
    movl %r13d, %eax
    andl $0xffff, %eax
    call put_dec
    movb $'\n', %al
    outb %al, $DEBUG_PORT

    movl $CONSOLEIO_WRITE, %edi
    movl $(hello_end - hello), %esi
    leaq hello(%rip), %rdx
    HYPERCALL(HC_CONSOLE_IO)

    movl $XENMEM_ADD_TO_PHYSMAP, %edi
    leaq xatp(%rip), %rsi
    HYPERCALL(HC_MEMORY_OP)
    testq %rax, %rax
    jnz no_shinfo
    PUTS64(wc_msg)
    movl WC_SEC, %eax
    call put_dec
    movb $'\n', %al
    outb %al, $DEBUG_PORT

    xorl %r14d, %r14d               /* seconds slept */
heartbeat:
    call system_time                /* RAX = ns since boot */
    addq $1000000000, %rax
    movq %rax, poll_timeout(%rip)
    movl $SCHEDOP_POLL, %edi
    leaq sched_poll(%rip), %rsi
    HYPERCALL(HC_SCHED_OP)
    incl %r14d
    movl %r14d, %eax
    xorl %edx, %edx
    movl $HEARTBEAT_EVERY, %ecx
    divl %ecx
    testl %edx, %edx
    jnz heartbeat
    PUTS64(alive_msg)
    movl %r14d, %eax
    call put_dec
    PUTS64(alive_end)
    jmp heartbeat

no_shinfo:
    PUTS64(no_shinfo_msg)
    jmp idle

/* RAX = Xen system time in ns from vCPU 0's vcpu_time_info (version-checked read). */
system_time:
    pushq %rcx
    pushq %rdx
    pushq %r8
    pushq %r9
1:  movl VCPU0_TIME, %r8d           /* version */
    testl $1, %r8d
    jnz 1b
    lfence
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    subq VCPU0_TIME + 8, %rax       /* - tsc_timestamp */
    movsbl VCPU0_TIME + 28, %ecx    /* tsc_shift */
    testl %ecx, %ecx
    js 2f
    shlq %cl, %rax
    jmp 3f
2:  negl %ecx
    shrq %cl, %rax
3:  movl VCPU0_TIME + 24, %r9d      /* tsc_to_system_mul */
    mulq %r9
    shrdq $32, %rdx, %rax
    addq VCPU0_TIME + 16, %rax      /* + system_time */
    lfence
    cmpl VCPU0_TIME, %r8d
    jne 1b
    popq %r9
    popq %r8
    popq %rdx
    popq %rcx
    ret

/* Print EAX in decimal on the debug port. */
put_dec:
    pushq %rbx
    pushq %rcx
    pushq %rdx
    movl $10, %ebx
    xorl %ecx, %ecx
1:  xorl %edx, %edx
    divl %ebx
    addb $'0', %dl
    pushq %rdx
    incl %ecx
    testl %eax, %eax
    jnz 1b
2:  popq %rax
    outb %al, $DEBUG_PORT
    loop 2b
    popq %rdx
    popq %rcx
    popq %rbx
    ret

    .section .rodata
banner: .asciz "xend-lite default guest: booting\n"
no_xen: .asciz "xend-lite default guest: no Xen hypervisor leaves found, idling\n"
found_msg: .asciz "xend-lite default guest: Xen "
hello: .ascii "xend-lite default guest: hello through the Xen console\n"
hello_end:
wc_msg: .asciz "xend-lite default guest: shared_info mapped, wallclock seconds "
no_shinfo_msg: .asciz "xend-lite default guest: mapping shared_info failed, idling\n"
alive_msg: .asciz "xend-lite default guest: alive, "
alive_end: .asciz " s\n"

    .section .data
    .balign 8
xatp:                                   /* struct xen_add_to_physmap */
    .word 0x7ff0                        /* domid = DOMID_SELF */
    .word 0                             /* size */
    .long 0                             /* space = XENMAPSPACE_shared_info */
    .quad 0                             /* idx */
    .quad SHINFO_GPA >> 12              /* gpfn */
sched_poll:                             /* struct sched_poll: no ports, just the timeout */
    .quad 0
    .long 0
    .long 0
poll_timeout:
    .quad 0

    .section .bss
    .balign 4096
hypercall_page:
    .skip 4096
    .skip 16384
stack_top:

GUEST_GDT
GUEST_PAGE_TABLES
PVH_NOTE(_start)
