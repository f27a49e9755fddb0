/* MSR traps: reads and writes two MSRs the host registers (A answers, B refuses) with a #GP
 * handler that reports vector 13 on port 0x5f2 and resumes past the faulting rdmsr/wrmsr.
 * Values go out on port 0x5f1 (dwords). */
#include "guest.h"
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl $stack_top, %esp
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $gp_handler, %eax           /* interrupt gate 13 -> gp_handler */
    movw %ax, idt + 13 * 8
    movw $0x08, idt + 13 * 8 + 2
    movw $0x8e00, idt + 13 * 8 + 4
    shrl $16, %eax
    movw %ax, idt + 13 * 8 + 6
    lidt idt_desc
    movl $MSR_A, %ecx                /* 1: read A */
    movl $0xdead, %eax
    rdmsr
    movl %edx, %ebx
    movw $0x5f1, %dx
    outl %eax, %dx
    movl %ebx, %eax
    outl %eax, %dx
    movl $MSR_B, %ecx                /* 2: read B: #GP */
    movl $0xdead, %eax
    rdmsr
    movw $0x5f1, %dx
    outl %eax, %dx
    movl $MSR_A, %ecx                /* 3: write A */
    movl $0x11111111, %eax
    movl $0x22222222, %edx
    wrmsr
    movl $0x600d, %eax
    movw $0x5f1, %dx
    outl %eax, %dx
    movl $MSR_B, %ecx                /* 4: write B: #GP */
    movl $0x33333333, %eax
    movl $0x44444444, %edx
    wrmsr
    movl $0x0bad, %eax
    movw $0x5f1, %dx
    outl %eax, %dx
    cli
    hlt
    jmp .
gp_handler:                          /* no iret: some backends cannot emulate it here */
    movl %eax, saved_eax
    movl %edx, saved_edx
    movl 4(%esp), %eax               /* the faulting EIP, above the error code */
    addl $2, %eax                    /* past the two-byte rdmsr/wrmsr */
    movl %eax, resume
    addl $16, %esp                   /* error code, EIP, CS, EFLAGS */
    movl $13, %eax
    movw $0x5f2, %dx
    outl %eax, %dx
    movl saved_eax, %eax
    movl saved_edx, %edx
    jmp *resume
    .section .data
    .balign 8
gdt: .quad 0
    .quad 0x00cf9a000000ffff         /* 0x08: flat 32-bit code */
    .quad 0x00cf92000000ffff         /* 0x10: flat data */
gdt_desc: .word 3 * 8 - 1
    .long gdt
    .balign 8
saved_eax: .long 0
saved_edx: .long 0
resume: .long 0
    .balign 8
idt: .fill 32, 8, 0
idt_desc: .word 32 * 8 - 1
    .long idt
    .section .bss
    .balign 16
    .skip 4096
stack_top:
PVH_NOTE(_start)
