/* Reads Xen time through shared_info, as a Linux guest's pvclock does.
 *
 * Installs the hypercall page, maps shared_info at SHINFO with XENMEM_add_to_physmap, then
 * takes SAMPLES readings of system time: under the odd/even version protocol it reads
 * tsc_timestamp, system_time, mul and shift from vcpu0's vcpu_time_info, reads the TSC, and
 * computes system_time + scale(tsc - tsc_timestamp). Each reading goes to OUT + 8*i, the
 * wallclock seconds to RESULT, the number of readings that went backwards to RESULT + 8,
 * and the number of retries on a torn read to RESULT + 16. Then it signals port 0xf0.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define SHINFO 0x800000
#define XATP 0x300000
#define RESULT 0x300100
#define OUT 0x310000
#define SAMPLES 2000
#define TIME (SHINFO + 32)

    START64
    INSTALL_HYPERCALL_PAGE(HCPAGE)
    /* xen_add_to_physmap {DOMID_SELF, 0, shared_info, idx 0, gpfn SHINFO>>12} */
    MAP_SHARED_INFO(XATP, SHINFO, HCPAGE)
    movq $0, RESULT + 8
    movq $0, RESULT + 16
    movl SHINFO + 3076, %eax        /* wc_sec */
    movq %rax, RESULT
    xorq %r12, %r12                 /* sample index */
    xorq %r13, %r13                 /* previous reading */
1:  movl TIME, %r8d                 /* version */
    testl $1, %r8d
    jnz 3f
    lfence
    movq TIME + 8, %r9              /* tsc_timestamp */
    movq TIME + 16, %r10            /* system_time */
    movl TIME + 24, %r11d           /* mul */
    movsbl TIME + 28, %ecx          /* shift */
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    subq %r9, %rax                  /* delta */
    testl %ecx, %ecx
    js 4f
    shlq %cl, %rax
    jmp 5f
4:  negl %ecx
    shrq %cl, %rax
5:  mulq %r11                       /* rdx:rax = delta * mul */
    shrdq $32, %rdx, %rax
    addq %r10, %rax
    lfence
    cmpl TIME, %r8d
    jne 3f
    cmpq %r13, %rax
    jae 6f
    incq RESULT + 8
6:  movq %rax, %r13
    movq %rax, OUT(, %r12, 8)
    incq %r12
    cmpq $SAMPLES, %r12
    jb 1b
    movb $1, %al
    outb %al, $0xf0
7:  pause
    jmp 7b
3:  incq RESULT + 16
    jmp 1b

    END64(8192)
