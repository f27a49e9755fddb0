/* Boot-protocol probe. Reports on ports 0x5e0.. (dwords): which entry ran (0x9f9f9f9f for
 * pvh_start, 0xe0e0e0e0 for the ELF entry _start), EBX, and when EBX is set the magic and
 * the first four bytes of the command line it points at. The 64-bit build then enters long
 * mode and reports 64 and the magic again through RBX. Built with NO_PVH, it has no PVH
 * note, so only the ELF entry can run it; pvh_start is first so a flat load runs it. */
#include "guest.h"
    .section .text.entry, "ax"
    .code32
    .globl pvh_start
pvh_start:
    movl $0x9f9f9f9f, %eax
    jmp common
    .globl _start
_start:
    movl $0xe0e0e0e0, %eax
common:
    movl $stack_top, %esp
    movw $0x5e0, %dx
    outl %eax, %dx
    movl %ebx, %eax
    movw $0x5e1, %dx
    outl %eax, %dx
    testl %ebx, %ebx
    jz 1f
    movl (%ebx), %eax
    movw $0x5e2, %dx
    outl %eax, %dx
    movl 24(%ebx), %esi          /* cmdline_paddr, low half */
    movl (%esi), %eax
    movw $0x5e3, %dx
    outl %eax, %dx
1:
#ifdef __x86_64__
    movl %ebx, %edi
    ENTER_LONG_MODE(long64)
    .code64
long64:
    movq $64, %rax
    movw $0x5e4, %dx
    outl %eax, %dx
    movl %edi, %ebx
    testq %rbx, %rbx
    jz 2f
    movl (%rbx), %eax
    movw $0x5e2, %dx
    outl %eax, %dx
2:
#endif
    cli
    hlt
    jmp .
    .section .bss
    .balign 16
    .skip 4096
stack_top:
#ifdef __x86_64__
GUEST_GDT
GUEST_PAGE_TABLES
#endif
#ifndef NO_PVH
PVH_NOTE(pvh_start)
#endif
