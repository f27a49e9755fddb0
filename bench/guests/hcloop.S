/* The hypercall-loop guest: xen_version(XENVER_version) through a hypercall page, forever;
 * built with -DTIMER=1, set_timer_op with a deadline some 13 days away (answer 0) instead.
 *
 * A flat 32-bit image loaded at 0x100000. It carries its own copy of the daemon's stub page
 * (mov $nr,%eax; out %al,$0xe4; ret), so the C host and xend-lite run the very same guest
 * code; a test checks the copy matches the daemon's page. ESI counts round trips (a hypercall
 * keeps every register but EAX); when it reaches the u32 at WARM or TOTAL the guest writes
 * port 0xf1 or 0xf2, which xend-lite's side uses as start and stop marks (zero: never). */
#define WARM 0x180000
#define TOTAL 0x180004
#define BAD 0x180008

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl $0x170000, %esp
    xorl %esi, %esi
#if TIMER
1:  movl $0, %ebx               /* the deadline: 2^50 ns, low word then high word */
    movl $0x40000, %ecx
    call hypercall_page + 15 * 32
    testl %eax, %eax
#else
1:  xorl %ebx, %ebx
    call hypercall_page + 17 * 32
    cmpl $0x40010, %eax
#endif
    jne 3f
2:  incl %esi
    cmpl WARM, %esi
    je 4f
    cmpl TOTAL, %esi
    je 5f
    jmp 1b
3:  incl BAD
    jmp 2b
4:  outb %al, $0xf1
    jmp 1b
5:  outb %al, $0xf2
    jmp 1b

    .balign 4096
hypercall_page:
    .set nr, 0
    .rept 128
    .byte 0xb8
    .long nr
    .byte 0xe6, 0xe4, 0xc3
    .fill 24, 1, 0xcc
    .set nr, nr + 1
    .endr
