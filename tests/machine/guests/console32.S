/* Console ports: 'A' to 0x12, 'B' to 0xe9, 'C' to the 16550 at 0x3f8 once its LSR says
 * the transmitter is empty, "xyz" to 0xe9 with rep outsb, the word 0x4444 ('D' in its low
 * byte) to 0xe9, then 'Y' (or 'N') to 0xe9 for the Bochs 0xe9 read-back check. */
#include "guest.h"
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movb $'A', %al
    outb %al, $0x12
    movb $'B', %al
    outb %al, $0xe9
    movw $0x3fd, %dx
1:  inb %dx, %al
    testb $0x20, %al
    jz 1b
    movw $0x3f8, %dx
    movb $'C', %al
    outb %al, %dx
    cld
    movl $xyz, %esi
    movl $3, %ecx
    movw $0xe9, %dx
    rep outsb
    movw $0x4444, %ax
    outw %ax, %dx
    inb %dx, %al
    cmpb $0xe9, %al
    movb $'Y', %al
    je 2f
    movb $'N', %al
2:  outb %al, %dx
    cli
    hlt
    jmp .
    .section .rodata
xyz: .ascii "xyz"
PVH_NOTE(_start)
