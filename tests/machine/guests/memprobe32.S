/* Memory probe, 32-bit flat mode (paging off). Polls port 0x511 for a command from the
 * host; 0 means wait, 0xffffffff means stop. Other commands: bit 1 writes the command to
 * P+16, bit 2 to H+16, bit 3 to Q+16; then the guest reports on port 0x510 (dwords):
 * [P], the sum of P's 1024 dwords, [P+16], [H], [H+16], [Q], [Q+16]; and ends the report
 * with a write to port 0x512. P, H and Q are page addresses given at build time. */
#include "guest.h"
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl $stack_top, %esp
wait:
    movw $0x511, %dx
    inl %dx, %eax
    testl %eax, %eax
    jz wait
    cmpl $0xffffffff, %eax
    je done
    testl $2, %eax
    jz 1f
    movl %eax, P + 16
1:  testl $4, %eax
    jz 1f
    movl %eax, H + 16
1:  testl $8, %eax
    jz 1f
    movl %eax, Q + 16
1:  movw $0x510, %dx
    movl P, %eax
    outl %eax, %dx
    xorl %eax, %eax
    movl $P, %esi
    movl $1024, %ecx
2:  addl (%esi), %eax
    addl $4, %esi
    loop 2b
    outl %eax, %dx
    movl P + 16, %eax
    outl %eax, %dx
    movl H, %eax
    outl %eax, %dx
    movl H + 16, %eax
    outl %eax, %dx
    movl Q, %eax
    outl %eax, %dx
    movl Q + 16, %eax
    outl %eax, %dx
    movw $0x512, %dx
    outl %eax, %dx
    jmp wait
done:
    cli
    hlt
    jmp done
    .section .bss
    .balign 16
    .skip 4096
stack_top:
PVH_NOTE(_start)
