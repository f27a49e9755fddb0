/* A guest that waits for an event the operator injects, and shows its view of memory.
 *
 * Maps shared_info at SHINFO, writes MARK words into its evtchn_mask array (ports 3840 and
 * up, which nothing uses) and copies them back, as it reads them, to SEEN. Then installs an
 * upcall vector (0xf3, HVM_PARAM_CALLBACK_IRQ vector type), allocates an unbound port
 * (remote domain 0), stores it at PORT and blocks (SCHEDOP_block, events enabled) until the
 * upcall handler has counted at COUNT; STATE is 1 while it waits, 2 once the event came, when
 * it also prints "upcall port N arrived" to the debug console.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define SHINFO 0x800000
#define XATP 0x300100
#define PARAM 0x300200
#define UNBOUND 0x300300
#define COUNT 0x300000
#define PORT 0x300008
#define STATE 0x300010
#define SEEN 0x300040
#define MARKS (SHINFO + 2560 + 60 * 8)
#define VECTOR 0xf3
#define APIC 0xfee00000

    START64
    INSTALL_HYPERCALL_PAGE(HCPAGE)
    MAP_SHARED_INFO(XATP, SHINFO, HCPAGE)
    movabsq $0x5a17c0de00000000, %rax
    movq $MARKS, %rdi
    movl $4, %ecx
1:  movq %rax, (%rdi)
    incq %rax
    addq $8, %rdi
    loop 1b
    movq $MARKS, %rsi
    movq $SEEN, %rdi
    movl $4, %ecx
    rep movsq
    IDT_GATE64(idt, VECTOR, upcall)
    lidt idt_desc(%rip)
    movl $APIC + 0xf0, %edi
    orl $0x1ff, (%rdi)
    movq $PARAM, %rsi
    movw $0x7ff0, 0(%rsi)
    movw $0, 2(%rsi)
    movl $0, 4(%rsi)
    movabsq $(2 << 56 | VECTOR), %rax
    movq %rax, 8(%rsi)
    movl $0, %edi                    /* HVMOP_set_param */
    call HCPAGE + 34 * 32
    /* EVTCHNOP_alloc_unbound(DOMID_SELF, remote 0) */
    movq $UNBOUND, %rsi
    movw $0x7ff0, 0(%rsi)
    movw $0, 2(%rsi)
    movl $0, 4(%rsi)
    movl $6, %edi
    call HCPAGE + 32 * 32
    movl UNBOUND + 4, %eax
    movq %rax, PORT
wait:
    cli
    cmpq $0, COUNT
    jne arrived
    movq $1, STATE
    sti
    movl $1, %edi                    /* SCHEDOP_block */
    xorl %esi, %esi
    call HCPAGE + 29 * 32
    jmp wait
arrived:
    movq $2, STATE
    PUTS64(msg)
    movq PORT, %rax
    addb $'0', %al
    outb %al, $DEBUG_PORT
    PUTS64(msg2)
    IDLE

upcall:
    incq COUNT
    movb $0, SHINFO                  /* vcpu0 evtchn_upcall_pending */
    pushq %rdi
    movl $APIC + 0xb0, %edi          /* EOI */
    movl $0, (%rdi)
    popq %rdi
    iretq

    .data
msg: .asciz "upcall port "
msg2: .asciz " arrived\n"
    .balign 8
idt_desc: .word 256 * 16 - 1
    .quad idt
    GUEST_GDT
    GUEST_PAGE_TABLES
    .bss
    .balign 16
idt: .space 256 * 16
    .space 8192
stack_top:
    PVH_NOTE(_start)
