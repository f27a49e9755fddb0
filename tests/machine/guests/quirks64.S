/* The instructions a software KVM may give up on, run at CPL 0 in long mode (see
 * xend_lite/machine/quirks.py). Each step reports on port 0xf0 with the step's number once
 * it got past its instruction; results go to RESULT for the host to read.
 *
 * INT3: an IDT whose gate 3 is an interrupt gate on IST 1 (GATE=0x8e, IST=1) or a trap gate
 *   on the current stack (GATE=0x8f, IST=0). With IF set, the guest runs int3 with a known
 *   RSP; the handler stores its RSP, the 5-quadword frame and its RFLAGS at RESULT, then
 *   returns with iretq. Reports 1 (in the handler) and 2 (after the return).
 * FWAIT: fninit then fwait. Reports 3.
 * LDMXCSR: ldmxcsr from a RIP-relative operand (MXCSR1), then from 4(%rsp) (MXCSR2), each
 *   followed by a report (4, 5) so the host can read MXCSR in between. */
#include "guest.h"

#define RESULT 0x300000
#define IST_STACK_TOP 0x280000
#define INT3_RSP 0x2ffff8

    START64
    movq %cr4, %rax
    orq $0x600, %rax              /* OSFXSR, OSXMMEXCPT: SSE on */
    movq %rax, %cr4
#ifdef INT3
    /* the TSS descriptor (GDT entries 7-8) and TR */
    leaq tss(%rip), %rax
    movq %rax, %rdx
    movw $0x67, gdt_tss(%rip)
    movw %dx, gdt_tss + 2(%rip)
    shrq $16, %rdx
    movb %dl, gdt_tss + 4(%rip)
    movb $0x89, gdt_tss + 5(%rip)
    movb %dh, gdt_tss + 7(%rip)
    shrq $16, %rdx
    movl %edx, gdt_tss + 8(%rip)
    lgdt quirk_gdt_desc(%rip)
    movw $0x38, %ax
    ltr %ax
    /* gate 3 */
    leaq bp_handler(%rip), %rax
    movw %ax, idt + 48(%rip)
    movw $SEL_CODE64, idt + 50(%rip)
    movb $IST, idt + 52(%rip)
    movb $GATE, idt + 53(%rip)
    shrq $16, %rax
    movw %ax, idt + 54(%rip)
    shrq $16, %rax
    movl %eax, idt + 56(%rip)
    lidt idt_desc(%rip)
    movq %rsp, %r15
    movq $INT3_RSP, %rsp
    sti
    int3
    cli
    movq %rsp, RESULT + 64
    movq %r15, %rsp
    movb $2, %al
    outb %al, $0xf0
#endif
#ifdef FWAIT
    fninit
    fwait
    movb $3, %al
    outb %al, $0xf0
#endif
#ifdef LDMXCSR
    ldmxcsr mxcsr1(%rip)
    movb $4, %al
    outb %al, $0xf0
    subq $16, %rsp
    movl $MXCSR2, 4(%rsp)
    ldmxcsr 4(%rsp)
    addq $16, %rsp
    movb $5, %al
    outb %al, $0xf0
#endif
    movb $0xff, %al
    outb %al, $0xf0
    cli
    hlt

bp_handler:
    movq %rsp, RESULT
    movq 0(%rsp), %rax
    movq %rax, RESULT + 8
    movq 8(%rsp), %rax
    movq %rax, RESULT + 16
    movq 16(%rsp), %rax
    movq %rax, RESULT + 24
    movq 24(%rsp), %rax
    movq %rax, RESULT + 32
    movq 32(%rsp), %rax
    movq %rax, RESULT + 40
    pushfq
    popq %rax
    movq %rax, RESULT + 48
    movb $1, %al
    outb %al, $0xf0
    iretq

    .data
    .balign 16
quirk_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cf9a000000ffff
    .quad 0x00affa000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00cffa000000ffff
gdt_tss:
    .quad 0
    .quad 0
quirk_gdt_end:
quirk_gdt_desc: .word quirk_gdt_end - quirk_gdt - 1; .quad quirk_gdt
    .balign 16
idt: .fill 32, 16, 0
idt_desc: .word 32 * 16 - 1; .quad idt
    .balign 16
tss: .long 0; .quad 0, 0, 0; .quad 0; .quad IST_STACK_TOP; .fill 6, 8, 0; .quad 0; .word 0, 0x68
#ifdef LDMXCSR
    .balign 4
mxcsr1: .long MXCSR1
#endif
END64(8192)
