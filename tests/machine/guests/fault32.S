/* Ends the run: with TRIPLE, an empty IDT turns ud2 into a triple fault; otherwise
 * hlt with interrupts off. Writes 'z' to 0xe9 first so the host sees it ran. */
#include "guest.h"
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movb $'z', %al
    outb %al, $0xe9
#ifdef TRIPLE
    lidt idt_empty
    ud2
#else
    cli
    hlt
#endif
    jmp .
    .section .rodata
idt_empty: .word 0
    .long 0
PVH_NOTE(_start)
