/* A guest that misbehaves in one of several ways (32-bit, paging off), chosen at build time:
 *   TRIPLE     empty IDT, then ud2: the fault cannot be delivered -> triple fault
 *   HALT       cli; hlt: halted with interrupts off, nothing can ever wake it
 *   SPIN       a tight loop that never exits to the host
 *   MSR        writes garbage to the hypercall MSR (found through CPUID), each one #GPs; a
 *              #GP handler counts and skips them. Then a valid write, then it prints
 *              "msr gp=<count> page=<first stub byte>" and spins
 *   MSR_NOIDT  one garbage MSR write with an empty IDT: the #GP becomes a triple fault
 * Each writes "start\n" to port 0xe9 first, so the host sees it ran (again, after a reset).
 */
#include "guest.h"

#define HCPAGE 0x200000

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    cli
    movl $stack_top, %esp
    PUTS32(msg_start)
#if defined(TRIPLE)
    lidt idt_empty
    ud2
#elif defined(HALT)
    cli
    hlt
    jmp _start
#elif defined(SPIN)
1:  incl spin_count
    jmp 1b
#elif defined(MSR) || defined(MSR_NOIDT)
    /* our own GDT, so an exception can load a code selector from it */
    lgdt gdt32_desc
    ljmp $SEL_CODE32, $1f
1:  movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    call find_msr
#ifdef MSR_NOIDT
    lidt idt_empty
    movl $0x123, %eax
    xorl %edx, %edx
    movl msr_index, %ecx
    wrmsr
    jmp .
#else
    /* a #GP gate pointing at gp_handler, with the code selector we run on */
    movl $gp_handler, %eax
    movw %ax, idt + 13 * 8
    movw %cs, %ax
    movw %ax, idt + 13 * 8 + 2
    movw $0x8e00, idt + 13 * 8 + 4
    movl $gp_handler, %eax
    shrl $16, %eax
    movw %ax, idt + 13 * 8 + 6
    lidt idt_desc
    movl $garbage, %esi
2:  movl 0(%esi), %eax
    movl 4(%esi), %edx
    cmpl $0xffffffff, 8(%esi)
    je 3f
    movl msr_index, %ecx
    wrmsr                                /* 2 bytes: the handler skips them */
    addl $12, %esi
    jmp 2b
3:  movl $HCPAGE, %eax                   /* now a good one */
    xorl %edx, %edx
    movl msr_index, %ecx
    wrmsr
    PUTS32(msg_gp)
    movl gp_count, %eax
    call put_hex
    PUTS32(msg_page)
    movzbl HCPAGE, %eax
    call put_hex
    movb $'\n', %al
    outb %al, $DEBUG_PORT
4:  pause
    jmp 4b

/* returns without iret: on the nested kvm-pvm backend iret in unpaged protected mode ends
 * in an emulation failure. Same ring, interrupts off: pop the frame by hand. */
gp_handler:
    addl $4, %esp                        /* the error code */
    popl gp_ret
    addl $8, %esp                        /* cs, eflags */
    addl $2, gp_ret                      /* past the wrmsr */
    incl gp_count
    jmp *gp_ret

put_hex:                                 /* EAX as 8 hex digits */
    movl $8, %ecx
5:  roll $4, %eax
    movl %eax, %edx
    andl $0xf, %edx
    movb hexdigits(%edx), %dl
    pushl %eax
    movb %dl, %al
    outb %al, $DEBUG_PORT
    popl %eax
    loop 5b
    ret
#endif

find_msr:
    movl $0x40000000, %esi
1:  movl %esi, %eax
    cpuid
    cmpl $0x566e6558, %ebx
    jne 2f
    leal 2(%esi), %eax
    cpuid
    movl %ebx, msr_index
    ret
2:  addl $0x100, %esi
    cmpl $0x40010000, %esi
    jb 1b
    movl $0x40000000, msr_index
    ret
#else
#error "build with one of TRIPLE HALT SPIN MSR MSR_NOIDT"
#endif

    .section .rodata
msg_start: .asciz "start\n"
msg_gp: .asciz "msr gp="
msg_page: .asciz " page="
hexdigits: .ascii "0123456789abcdef"
    .balign 4
idt_empty: .word 0
    .long 0
    .balign 4
/* garbage hypercall-MSR values: low, high, 0 (a row with 0xffffffff ends the list) */
garbage:
    .long 0x00200123, 0, 0               /* a page index Xen does not have */
    .long 0x00200001, 0, 0
    .long 0xfffff000, 0xffffffff, 0      /* far beyond memory */
    .long 0x7ffff000, 0, 0               /* the hole above RAM */
    .long 0xfee00000, 0, 0               /* the local APIC */
    .long 0, 0x80000000, 0               /* beyond any physical address */
    .long 0xfffbd000, 0, 0               /* KVM's private TSS pages */
    .long 0, 0, 0xffffffff

    .data
    .balign 8
idt: .fill 32, 8, 0
idt_end:
idt_desc: .word idt_end - idt - 1
    .long idt
gp_count: .long 0
gp_ret: .long 0
spin_count: .long 0
msr_index: .long 0
    .balign 16
gdt32: .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff                 /* SEL_DATA */
    .quad 0x00cf9a000000ffff                 /* SEL_CODE32 */
gdt32_end:
gdt32_desc: .word gdt32_end - gdt32 - 1
    .long gdt32
    .bss
    .balign 16
    .space 4096
stack_top:
    PVH_NOTE(_start)
