/* A flat 32-bit guest the host drives through ports: each `in` from 0x511 returns a
 * command: 1 = read the dword at 0x500000 and report it on 0x510; 2 = write the value from
 * port 0x512 to 0x500000 and report it back; anything else = ask again. */
#include "guest.h"
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl $stack_top, %esp
1:  movw $0x511, %dx
    inl %dx, %eax
    cmpl $1, %eax
    je 2f
    cmpl $2, %eax
    je 3f
    pause
    jmp 1b
2:  movl 0x500000, %eax
    movw $0x510, %dx
    outl %eax, %dx
    jmp 1b
3:  movw $0x512, %dx
    inl %dx, %eax
    movl %eax, 0x500000
    movw $0x510, %dx
    outl %eax, %dx
    jmp 1b
    .section .bss
    .balign 16
    .skip 4096
stack_top:
PVH_NOTE(_start)
