/* Hostile-guest fuzz loop, 64-bit (long mode) or 32-bit (protected mode, paging off).
 *
 * Unlike a one-shot table guest this one never stops: it runs the table the host planted,
 * reports, then spins until the host bumps a generation number and runs the next table.
 * So a soak of many thousand hypercalls needs one boot, not one boot per table.
 *
 * Table at TABLE (guest-physical; 64-bit pointers may also go through the alias at
 * ALIAS + address, a second PML4 slot, so they need real translation):
 *   +0  u64 count of entries        +8  u64 value to write to the hypercall MSR (0: skip)
 *   +16 u64 entries done (written)  +24 u64 MSR base found in CPUID (written)
 *   +32 u64 Xen version leaf EAX    +40 u64 highest Xen leaf (written)
 *   +48 u64 generation (host bumps) +56 u64 generation finished (written)
 *   +64 entries, 256 bytes each: u64 nr, u64 arg1..arg5, u64 unused, u64 result (out),
 *       then the registers after the call (out): 64-bit rbx rcx rbp r9 r11 r12 r13 r14 r15
 *       rdi rsi rdx r10 r8; 32-bit ebx ecx edx esi edi ebp (one u64 slot each)
 * A number below 128 is called through its stub in the hypercall page; a larger one through
 * the guest's own copy of a stub (`out %al, $0xe4; ret` with EAX = nr), as a guest that
 * ignores the page would. After each table the guest writes the finished generation and
 * signals port 0xf1.
 */
#include "guest.h"

#define TABLE 0x300000
#define HCPAGE 0x200000
#define DONE_PORT 0xf1
#define HC_PORT 0xe4
#define ENTRY_SIZE 256

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    cli
    movl $stack_top, %esp
#ifdef __x86_64__
    ENTER_LONG_MODE(main64)

    .code64
main64:
    movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    leaq stack_top(%rip), %rsp
    movq guest_pml4(%rip), %rax         /* alias: PML4[1] = PML4[0] */
    movq %rax, guest_pml4 + 8(%rip)
    movq %cr3, %rax
    movq %rax, %cr3
    call find_xen
    movq $TABLE, %r15
    movq 8(%r15), %rax
    testq %rax, %rax
    jz wait64
    movq %rax, %rdx
    shrq $32, %rdx
    movl 24(%r15), %ecx
    wrmsr
wait64:
    movq $TABLE, %r15
    movq 48(%r15), %rax
    cmpq 56(%r15), %rax
    jne run64
    pause
    jmp wait64
run64:
    movq %rax, gen_seen(%rip)
    xorq %r14, %r14
next64:
    cmpq 0(%r15), %r14
    jae end64
    movq %r14, %r13
    shlq $8, %r13
    leaq 64(%r15, %r13), %r13           /* r13 = entry */
    pushq %r13
    pushq %r14
    pushq %r15
    movq 0(%r13), %rax
    leaq raw_stub(%rip), %rcx
    cmpq $128, %rax
    jae 1f
    movq %rax, %rcx
    shlq $5, %rcx
    addq $HCPAGE, %rcx
1:  movq %rcx, hc_target(%rip)
    movq 8(%r13), %rdi
    movq 16(%r13), %rsi
    movq 24(%r13), %rdx
    movq 32(%r13), %r10
    movq 40(%r13), %r8
    movl 0(%r13), %eax                  /* EAX = nr (the page's stub sets it again) */
    FILL_PATTERNS64
    call *hc_target(%rip)
    RECORD_CALL64
    incq %r14
    movq %r14, 16(%r15)
    jmp next64
end64:
    movq gen_seen(%rip), %rax
    movq %rax, 56(%r15)
    movb $1, %al
    outb %al, $DONE_PORT
    jmp wait64

raw_stub:
    outb %al, $HC_PORT
    ret

find_xen:
    FIND_XEN64(TABLE)
#else
    call find_xen32
    movl $TABLE, %edi
    movl 8(%edi), %eax
    testl %eax, %eax
    jz wait32
    movl 12(%edi), %edx
    movl 24(%edi), %ecx
    wrmsr
wait32:
    movl TABLE + 48, %eax
    cmpl TABLE + 56, %eax
    jne run32
    pause
    jmp wait32
run32:
    movl %eax, gen_seen
    movl $0, entry_index
next32:
    movl entry_index, %eax
    cmpl TABLE, %eax
    jae end32
    shll $8, %eax
    leal TABLE + 64(%eax), %eax
    movl %eax, entry_ptr
    movl 0(%eax), %edx
    movl $raw_stub32, %ecx
    cmpl $128, %edx
    jae 1f
    cmpl $0, 4(%eax)
    jne 1f
    movl %edx, %ecx
    shll $5, %ecx
    addl $HCPAGE, %ecx
1:  movl %ecx, hc_target
    movl 8(%eax), %ebx
    movl 16(%eax), %ecx
    movl 24(%eax), %edx
    movl 32(%eax), %esi
    movl 40(%eax), %edi
    movl $0x33333333, %ebp
    movl entry_ptr, %eax
    movl 0(%eax), %eax
    call *hc_target
    RECORD_CALL32(TABLE)
    jmp next32
end32:
    movl gen_seen, %eax
    movl %eax, TABLE + 56
    movl $0, TABLE + 60
    movb $1, %al
    outb %al, $DONE_PORT
    jmp wait32

raw_stub32:
    outb %al, $HC_PORT
    ret

find_xen32:
    FIND_XEN32(TABLE)
#endif

    .data
    HARNESS_DATA
    .balign 8
gen_seen: .quad 0
#ifdef __x86_64__
    GUEST_GDT
    GUEST_PAGE_TABLES
#endif
    .bss
    .balign 16
    .space 16384
stack_top:
    PVH_NOTE(_start)
