/* Everything the PVH start_info hands a guest, read the way a guest reads it.
 *
 * From 32-bit protected mode with paging off, EBX = hvm_start_info: copies the struct to
 * OUT, module 0's list entry to OUT + 0x40 and its first 256 bytes to OUT + 0x2000, the
 * memory map table (at most 64 entries) to OUT + 0x100, the command line (at most 4095
 * bytes) to OUT + 0x1000. Writes a marker (0x5a5a0000 + entry index) into the last four
 * bytes of every RAM entry below 4 GiB. Asks XENMEM_memory_map for the same map (at most
 * 64 entries into OUT + 0x800; rc at OUT + 0x80) and signals port 0xf0.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define OUT 0x300000
#define MAXMAP 64
#define DONE_PORT 0xf0

    .section .text.entry, "ax"
    .globl _start
_start:
    movl $stack_top, %esp
    movl %ebx, %ebp                 /* start_info */
    cld
    movl %ebp, %esi
    movl $OUT, %edi
    movl $56, %ecx
    rep movsb
    /* module 0: its list entry and its first bytes */
    cmpl $0, 12(%ebp)
    je 1f
    movl 16(%ebp), %esi
    movl $OUT + 0x40, %edi
    movl $32, %ecx
    rep movsb
    movl OUT + 0x40, %esi
    movl $OUT + 0x2000, %edi
    movl $256, %ecx
    rep movsb
1:  /* the memory map table */
    movl 48(%ebp), %ecx
    cmpl $MAXMAP, %ecx
    jbe 2f
    movl $MAXMAP, %ecx
2:  imull $24, %ecx
    movl 40(%ebp), %esi
    movl $OUT + 0x100, %edi
    rep movsb
    /* the command line, up to its NUL */
    movl 24(%ebp), %esi
    movl $OUT + 0x1000, %edi
    movl $4095, %ecx
3:  lodsb
    stosb
    testb %al, %al
    jz 4f
    loop 3b
    movb $0, (%edi)
4:  /* a marker at the end of every RAM entry below 4 GiB */
    movl 48(%ebp), %ecx
    cmpl $MAXMAP, %ecx
    jbe 5f
    movl $MAXMAP, %ecx
5:  xorl %edx, %edx
6:  cmpl %ecx, %edx
    jae 8f
    imull $24, %edx, %edi
    addl $OUT + 0x100, %edi
    cmpl $1, 16(%edi)               /* type: RAM */
    jne 7f
    movl 0(%edi), %eax              /* end = addr + size, below 4 GiB only */
    movl 4(%edi), %esi
    addl 8(%edi), %eax
    adcl 12(%edi), %esi
    testl %esi, %esi
    jnz 7f
    movl %edx, %esi
    orl $0x5a5a0000, %esi
    movl %esi, -4(%eax)
7:  incl %edx
    jmp 6b
8:  /* XENMEM_memory_map into OUT + 0x800 */
    INSTALL_HYPERCALL_PAGE(HCPAGE)
    movl $MAXMAP, OUT + 0x90
    movl $OUT + 0x800, OUT + 0x94
    movl $9, %ebx                   /* XENMEM_memory_map */
    movl $OUT + 0x90, %ecx
    call HCPAGE + 12 * 32
    movl %eax, OUT + 0x80
    movb $1, %al
    outb %al, $DONE_PORT
    IDLE

    .bss
    .balign 16
    .space 8192
stack_top:
    PVH_NOTE(_start)
