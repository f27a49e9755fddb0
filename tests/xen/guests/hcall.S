/* Hypercall harness guest, 64-bit (long mode) or 32-bit (protected mode, paging off).
 *
 * The host plants a table at TABLE (guest-physical; in 64-bit mode also visible through the
 * alias at ALIAS + address, a second PML4 slot, so pointers need real translation):
 *   +0  u64 count of entries        +8  u64 value to write to the hypercall MSR (0: skip)
 *   +16 u64 entries done (written)  +24 u64 MSR base found in CPUID (written)
 *   +32 u64 Xen version leaf EAX    +40 u64 highest Xen leaf (written)
 *   +64 entries, 256 bytes each: u64 nr, u64 arg1..arg5, u64 unused, u64 result (out),
 *       then the registers after the call (out): 64-bit rbx rcx rbp r9 r11 r12 r13 r14 r15
 *       rdi rsi rdx r10 r8; 32-bit ebx ecx edx esi edi ebp (one u64 slot each)
 * For each entry the guest loads the arguments in its mode's convention, fills every other
 * register with a known pattern, calls hypercall_page + nr * 32 and records RAX and every
 * other register. Then it writes the done count and signals port 0xf0.
 */
#include "guest.h"

#define TABLE 0x300000
#define HCPAGE 0x200000
#define DONE_PORT 0xf0
#define ENTRY_SIZE 256

#ifdef __x86_64__
    START64
    /* alias: PML4[1] = PML4[0], so 0x8000000000 + x reaches physical x */
    movq guest_pml4(%rip), %rax
    movq %rax, guest_pml4 + 8(%rip)
    movq %cr3, %rax
    movq %rax, %cr3
    call find_xen
    movq $TABLE, %r15
    movq 8(%r15), %rax
    testq %rax, %rax
    jz 1f
    movq %rax, %rdx
    shrq $32, %rdx
    movl 24(%r15), %ecx
    wrmsr
1:  xorq %r14, %r14                 /* entry index */
2:  cmpq 0(%r15), %r14
    jae done64
    movq %r14, %r13
    shlq $8, %r13
    leaq 64(%r15, %r13), %r13       /* r13 = entry */
    pushq %r13
    pushq %r14
    pushq %r15
    movq 0(%r13), %rax
    shlq $5, %rax
    addq $HCPAGE, %rax
    movq %rax, hc_target(%rip)
    movq 8(%r13), %rdi
    movq 16(%r13), %rsi
    movq 24(%r13), %rdx
    movq 32(%r13), %r10
    movq 40(%r13), %r8
    FILL_PATTERNS64
    movq $0xabcdef, %rax
    call *hc_target(%rip)
    RECORD_CALL64
    incq %r14
    movq %r14, 16(%r15)
    jmp 2b
done64:
    movb $1, %al
    outb %al, $DONE_PORT
3:  pause
    jmp 3b

find_xen:
    FIND_XEN64(TABLE)
#else
    .section .text.entry, "ax"
    .globl _start
_start:                             /* the loader's flat 32-bit segments stay as they are */
    movl $stack_top, %esp
    call find_xen32
    movl $TABLE, %edi
    movl 8(%edi), %eax
    testl %eax, %eax
    jz 1f
    movl 12(%edi), %edx
    movl 24(%edi), %ecx
    wrmsr
1:  movl $0, entry_index
2:  movl entry_index, %eax
    cmpl TABLE, %eax
    jae done32
    shll $8, %eax
    leal TABLE + 64(%eax), %eax
    movl %eax, entry_ptr
    movl 0(%eax), %ecx
    shll $5, %ecx
    addl $HCPAGE, %ecx
    movl %ecx, hc_target
    movl 8(%eax), %ebx
    movl 16(%eax), %ecx
    movl 24(%eax), %edx
    movl 32(%eax), %esi
    movl 40(%eax), %edi
    movl $0x33333333, %ebp
    movl $0xabcdef, %eax
    call *hc_target
    RECORD_CALL32(TABLE)
    jmp 2b
done32:
    movb $1, %al
    outb %al, $DONE_PORT
3:  pause
    jmp 3b

find_xen32:
    FIND_XEN32(TABLE)
#endif

    .data
    HARNESS_DATA
#ifdef __x86_64__
    GUEST_GDT
    GUEST_PAGE_TABLES
#endif
    .bss
    .balign 16
    .space 16384
stack_top:
    PVH_NOTE(_start)
