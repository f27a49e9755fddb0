/* Xen hypercalls made as Linux 6.1.120 and later makes them: no hypercall page, but three
 * routines laid out as in its xen-head.S. xen_hypercall_hvm saves the argument registers,
 * asks `pick` for the vendor's routine, compares it with xen_hypercall_amd and jumps to one;
 * xen_hypercall_amd is `vmmcall` and a return, xen_hypercall_intel `vmcall` and a return, each
 * at a 16-byte boundary. The return is `ret; int3`, or with RETHUNK a jump to a return thunk
 * that is `ret; int3`; with ENDBR each routine starts with endbr64 (endbr32).
 *
 * It calls xen_version(XENVER_version) through intel, amd and hvm (PICK_AMD picks amd) and
 * reports each EAX on port 0xe0 (dword); then an inline vmcall, shaped as KVM's
 * kvm_hypercall (not a routine, so never rewritten), only with INLINE defined, reported the
 * same way; then port 0xf0 says done. Builds 64-bit and 32-bit.
 *
 * Shapes the rewrite must refuse: TWO_INTEL adds a second vmcall routine, INDIRECT makes the
 * dispatcher jump through a register (nothing names the routines), APART puts 256 bytes
 * between the two routines. INLINE also leaves an unreached rep vmmcall (SEV's vmgexit). */
#include "guest.h"

#define XEN_VERSION 17
#define REPORT_PORT 0xe0
#define DONE_PORT 0xf0

#ifdef RETHUNK   /* always the 5-byte jump, as the kernel's return sites are */
#define RET .byte 0xe9; .long return_thunk - . - 4
#else
#define RET ret; int3
#endif
#ifdef ENDBR
#ifdef __x86_64__
#define ENDBR_INSN endbr64
#else
#define ENDBR_INSN endbr32
#endif
#else
#define ENDBR_INSN
#endif

#ifdef __x86_64__
#define ARG1 %edi
#define AX %rax
#define CX %rcx
    START64
#else
#define ARG1 %ebx
#define AX %eax
#define CX %ecx
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl $stack_top, %esp
#endif
    movl $XEN_VERSION, %eax
    xorl ARG1, ARG1
    call xen_hypercall_intel
    outl %eax, $REPORT_PORT
    movl $XEN_VERSION, %eax
    xorl ARG1, ARG1
    call xen_hypercall_amd
    outl %eax, $REPORT_PORT
    movl $XEN_VERSION, %eax
    xorl ARG1, ARG1
    call xen_hypercall_hvm
    outl %eax, $REPORT_PORT
#ifdef INLINE
    movl $XEN_VERSION, %eax
    xorl ARG1, ARG1
    vmcall
    outl %eax, $REPORT_PORT
#endif
    outb %al, $DONE_PORT
    IDLE
#ifdef INLINE
    rep; vmmcall
#endif

    .text
pick:
#ifdef PICK_AMD
    mov $xen_hypercall_amd, AX
#else
    mov $xen_hypercall_intel, AX
#endif
    ret

    .fill 256, 1, 0xcc     /* the calls above are not the dispatcher's jumps */
    .p2align 4
    .globl xen_hypercall_hvm
xen_hypercall_hvm:
    ENDBR_INSN
#ifdef INDIRECT
    call pick
    jmp *AX
#else
#ifdef __x86_64__
    push %rax; push %rcx; push %rdx; push %rdi; push %rsi; push %r11; push %r10; push %r9; push %r8
    call pick
    lea xen_hypercall_amd(%rip), %rcx
    cmp %rax, %rcx
    pop %r8; pop %r9; pop %r10; pop %r11; pop %rsi; pop %rdi; pop %rdx; pop %rcx; pop %rax
#else
    push %eax; push %ebx; push %ecx; push %edx; push %esi; push %edi
    call pick
    lea xen_hypercall_amd, %ebx
    cmp %eax, %ebx
    pop %edi; pop %esi; pop %edx; pop %ecx; pop %ebx; pop %eax
#endif
    jz xen_hypercall_amd
    jmp xen_hypercall_intel
#endif

    .p2align 4
    .globl xen_hypercall_amd
xen_hypercall_amd:
    ENDBR_INSN
    vmmcall
    RET

#ifdef APART
    .fill 256, 1, 0xcc
#endif
    .p2align 4
    .globl xen_hypercall_intel
xen_hypercall_intel:
    ENDBR_INSN
    vmcall
    RET
    int3; int3; int3; int3
#ifdef TWO_INTEL
    .p2align 4
another_intel:
    vmcall
    RET
#endif

#ifdef RETHUNK
    .p2align 4
return_thunk:
    ret
    int3
#endif

#ifdef __x86_64__
    END64(8192)
#else
    .section .bss
    .balign 16
    .skip 4096
stack_top:
PVH_NOTE(_start)
#endif
