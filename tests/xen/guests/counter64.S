/* Counts in memory and makes hypercalls, for save/restore tests.
 *
 * Installs the hypercall page, maps shared_info at SHINFO, then loops forever: COUNTER += 1,
 * and every 256 iterations one xen_version hypercall, counted at COUNTER + 8 and its result
 * kept at COUNTER + 16. A restored guest goes on from the values it had.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define SHINFO 0x800000
#define XATP 0x300100
#define COUNTER 0x300000

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl $stack_top, %esp
    ENTER_LONG_MODE(main64)

    .code64
main64:
    movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    leaq stack_top(%rip), %rsp
    movl $0x40000002, %eax
    cpuid
    movl %ebx, %ecx
    movl $HCPAGE, %eax
    xorl %edx, %edx
    wrmsr
    movq $XATP, %rsi
    movw $0x7ff0, 0(%rsi)
    movw $0, 2(%rsi)
    movl $0, 4(%rsi)
    movq $0, 8(%rsi)
    movq $(SHINFO >> 12), 16(%rsi)
    movl $7, %edi
    call HCPAGE + 12 * 32
1:  incq COUNTER
    testb $0xff, COUNTER
    jnz 1b
    xorl %edi, %edi
    call HCPAGE + 17 * 32
    movq %rax, COUNTER + 16
    incq COUNTER + 8
    jmp 1b

    .data
    GUEST_GDT
    GUEST_PAGE_TABLES
    .bss
    .balign 16
    .space 8192
stack_top:
    PVH_NOTE(_start)
