/* An ELF32 PVH guest: reports the start_info pointer and its magic, then powers off by
 * halting with interrupts disabled. */
#include "guest.h"
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl $stack_top, %esp
    PUTS32(msg)
    movl %ebx, %eax
    movw $0x500, %dx
    outl %eax, %dx              /* start_info address */
    movl (%ebx), %eax
    movw $0x503, %dx
    outl %eax, %dx              /* its magic */
    cli
    hlt
    .section .rodata
msg: .asciz "hello from 32-bit protected mode\n"
    .section .bss
    .balign 16
    .skip 4096
stack_top:
PVH_NOTE(_start)
