/* Enters long mode from the PVH entry, prints, writes memory, does port I/O, then halts
 * with interrupts off. */
#include "guest.h"
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl $stack_top, %esp
    movl %ebx, %edi            /* keep the start_info pointer */
    ENTER_LONG_MODE(long64)
    .code64
long64:
    movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %ss
    PUTS64(msg)
    movq $0x1122334455667788, %rax
    movq %rax, 0x200000        /* RAM the host reads back */
    movl %edi, %eax
    movw $0x500, %dx
    outl %eax, %dx             /* report start_info's address */
    movw $0x501, %dx
    inl %dx, %eax              /* the host answers */
    addl $1, %eax
    movw $0x502, %dx
    outl %eax, %dx             /* and sees its answer + 1 */
    cli
    hlt
    jmp .
    .section .rodata
msg: .asciz "hello from long mode\n"
    .section .bss
    .balign 16
    .skip 8192
stack_top:
GUEST_GDT
GUEST_PAGE_TABLES
PVH_NOTE(_start)
