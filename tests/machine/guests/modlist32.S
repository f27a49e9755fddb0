/* Module probe (32-bit, paging off). Reads hvm_start_info at EBX and reports on ports
 * 0x5f0.. (dwords): nr_modules; and, when there is one, modlist_paddr, the first entry's
 * paddr and size (low halves), the OR of their high halves with its cmdline_paddr and
 * reserved field, and a hash of the module's bytes (h = h * 31 + byte, from 0). */
#include "guest.h"
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl $stack_top, %esp
    movl 12(%ebx), %eax          /* nr_modules */
    movw $0x5f0, %dx
    outl %eax, %dx
    testl %eax, %eax
    jz done
    movl 16(%ebx), %esi          /* modlist_paddr, low half */
    movl %esi, %eax
    movw $0x5f1, %dx
    outl %eax, %dx
    movl 0(%esi), %eax           /* paddr */
    movw $0x5f2, %dx
    outl %eax, %dx
    movl 8(%esi), %eax           /* size */
    movw $0x5f3, %dx
    outl %eax, %dx
    movl 4(%esi), %eax
    orl 12(%esi), %eax
    orl 16(%esi), %eax
    orl 20(%esi), %eax
    orl 24(%esi), %eax
    orl 28(%esi), %eax
    movw $0x5f5, %dx
    outl %eax, %dx
    movl 0(%esi), %edi
    movl 8(%esi), %ecx
    xorl %eax, %eax
1:  testl %ecx, %ecx
    jz 2f
    imull $31, %eax, %eax
    movzbl (%edi), %edx
    addl %edx, %eax
    incl %edi
    decl %ecx
    jmp 1b
2:  movw $0x5f4, %dx
    outl %eax, %dx
done:
    cli
    hlt
    jmp .
    .section .bss
    .balign 16
    .skip 4096
stack_top:
PVH_NOTE(_start)
