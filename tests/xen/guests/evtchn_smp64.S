/* Event-channel sends and unmasks as a guest's kernel makes them, on two vCPUs that both
 * start at _start (the host sets vCPU 1 running, as the bench does) and tell themselves
 * apart by APIC ID.
 *
 * vCPU 0 maps shared_info, names VECTOR as the domain's callback, binds an IPI port to
 * itself (P0), one to vCPU 1 (P1) and a loopback pair (LA, LB), then with interrupts on:
 * sends on P0 and waits for its upcall; sends on LB and waits for the upcall LA raises;
 * masks P0, sends on it, spins a while (no upcall may come), unmasks it and waits for the
 * upcall; then ROUNDS times gives vCPU 1 time to wait, sends on P1 and waits for its
 * acknowledgement.
 * vCPU 1, interrupts off, waits in SCHEDOP_poll(P1, no timeout) ROUNDS times, clearing P1's
 * pending bit and acknowledging each time: a send that did not wake it would leave it
 * waiting (a second, each time).
 * The handler counts upcalls per vCPU and clears its own flag and selector and the pending
 * bits of vCPU 0's unmasked ports. Every hypercall's result is kept at RESULTS (u64 each,
 * in order; vCPU 1's at RESULTS1). vCPU 0 signals port 0xf0 at the end.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define SHINFO 0x800000
#define DATA 0x300000
#define COUNT0 (DATA + 0x00)         /* upcalls taken by vCPU 0 */
#define COUNT1 (DATA + 0x08)
#define MASKED_COUNT (DATA + 0x10)   /* vCPU 0's count after the masked send and the spin */
#define ACK (DATA + 0x18)            /* vCPU 1's acknowledgements */
#define READY (DATA + 0x20)          /* vCPU 0 bound the ports */
#define P0 (DATA + 0x28)
#define P1 (DATA + 0x30)
#define LA (DATA + 0x38)
#define LB (DATA + 0x40)
#define OWN0 (DATA + 0x48)           /* pending bits of vCPU 0's ports (word 0) */
#define NRES (DATA + 0x50)
#define RESULTS (DATA + 0x100)
#define RESULTS1 (DATA + 0x800)
#define ARGS (DATA + 0x1000)         /* vCPU 0's structs */
#define ARGS1 (DATA + 0x1800)        /* vCPU 1's */
#define VECTOR 0xf3
#define APIC 0xfee00000
#define PENDING (SHINFO + 2048)
#define MASK (SHINFO + 2048 + 512)
#define ROUNDS 20

    START64_SMP(16384)
    testl %ebx, %ebx
    jnz ap

    INSTALL_HYPERCALL_PAGE(HCPAGE)
    MAP_SHARED_INFO(ARGS, SHINFO, HCPAGE)
    IDT_GATE64(idt, VECTOR, upcall)
    lidt idt_desc(%rip)
    movl $APIC + 0xf0, %edi          /* spurious vector register: software enable */
    orl $0x1ff, (%rdi)
    SET_CALLBACK_VECTOR(ARGS + 0x40, VECTOR, HCPAGE)
    call keep
    /* EVTCHNOP_bind_ipi(0) -> P0, bind_ipi(1) -> P1 */
    movq $ARGS + 0x80, %rsi
    movq $0, 0(%rsi)
    movl $7, %edi
    call evtchn_op
    movl ARGS + 0x84, %eax
    movq %rax, P0
    movq $ARGS + 0x90, %rsi
    movq $1, 0(%rsi)
    movl $7, %edi
    call evtchn_op
    movl ARGS + 0x94, %eax
    movq %rax, P1
    /* alloc_unbound(DOMID_SELF, DOMID_SELF) -> LA; bind_interdomain(DOMID_SELF, LA) -> LB */
    movq $ARGS + 0xa0, %rsi
    movl $0x7ff07ff0, 0(%rsi)
    movl $0, 4(%rsi)
    movl $6, %edi
    call evtchn_op
    movl ARGS + 0xa4, %eax
    movq %rax, LA
    movq $ARGS + 0xb0, %rsi
    movl $0x7ff0, 0(%rsi)
    movl %eax, 4(%rsi)
    movl $0, 8(%rsi)
    movl $0, %edi
    call evtchn_op
    movl ARGS + 0xb8, %eax
    movq %rax, LB
    /* OWN0: the bits of P0, LA and LB */
    xorq %rdx, %rdx
    movq P0, %rcx
    btsq %rcx, %rdx
    movq LA, %rcx
    btsq %rcx, %rdx
    movq LB, %rcx
    btsq %rcx, %rdx
    movq %rdx, OWN0
    movq $1, READY
    sti
    /* to itself */
    movq P0, %rax
    call send
    movq $1, %rbx
    call wait_count
    /* loopback: LB raises LA */
    movq LB, %rax
    call send
    movq $2, %rbx
    call wait_count
    /* masked: pending only; unmasked: delivered */
    movq P0, %rcx
    lock btsq %rcx, MASK
    movq P0, %rax
    call send
    movl $2000000, %ecx
1:  pause
    loop 1b
    movq COUNT0, %rax
    movq %rax, MASKED_COUNT
    movq P0, %rax
    call unmask
    movq $3, %rbx
    call wait_count
    /* to vCPU 1, waiting in SCHEDOP_poll */
    movq $1, %r12
2:  movl $50000, %ecx                /* time for vCPU 1 to be waiting */
6:  pause
    loop 6b
    movq P1, %rax
    call send
3:  cmpq %r12, ACK
    jae 4f
    pause
    jmp 3b
4:  incq %r12
    cmpq $ROUNDS, %r12
    jbe 2b
    movb $1, %al
    outb %al, $0xf0
5:  pause
    jmp 5b

ap:
    lidt idt_desc(%rip)
    movl $APIC + 0xf0, %edi
    orl $0x1ff, (%rdi)
1:  cmpq $0, READY
    je 1b
    movq $1, %r12
2:  /* SCHEDOP_poll({&P1 as u32, 1, 0}) */
    movq P1, %rax
    movl %eax, ARGS1 + 0x40
    movq $ARGS1, %rsi
    movq $ARGS1 + 0x40, 0(%rsi)
    movq $1, 8(%rsi)
    movq $0, 16(%rsi)
    movl $3, %edi
    call HCPAGE + 29 * 32
    movq %r12, %rcx
    movq %rax, RESULTS1(, %rcx, 8)
    movq P1, %rcx
    lock btrq %rcx, PENDING
    jnc 2b                           /* woken with nothing pending: wait again */
    movq %r12, ACK
    incq %r12
    cmpq $ROUNDS, %r12
    jbe 2b
3:  pause
    jmp 3b

/* EVTCHNOP_send / EVTCHNOP_unmask on the port in %rax, from vCPU 0 */
send:
    movl $4, %edi
    jmp 1f
unmask:
    movl $9, %edi
1:  movq NRES, %rcx
    leaq ARGS + 0x200(, %rcx, 8), %rsi
    movl %eax, 0(%rsi)
    jmp evtchn_op

evtchn_op:                           /* the result kept at RESULTS */
    call HCPAGE + 32 * 32
keep:
    movq NRES, %rcx
    movq %rax, RESULTS(, %rcx, 8)
    incq NRES
    ret

wait_count:                          /* until COUNT0 >= %rbx */
    movl $200000000, %ecx
1:  cmpq %rbx, COUNT0
    jae 2f
    pause
    loop 1b
2:  ret

upcall:
    pushq %rax
    pushq %rcx
    pushq %rdi
    movl $APIC + 0x20, %edi
    movl (%rdi), %ecx
    shrl $24, %ecx                   /* this vCPU */
    incq COUNT0(, %rcx, 8)
    movq %rcx, %rdi
    shlq $6, %rdi
    movb $0, SHINFO(%rdi)            /* its evtchn_upcall_pending */
    xorl %eax, %eax
    xchgq %rax, SHINFO + 8(%rdi)     /* its evtchn_pending_sel */
    testq %rcx, %rcx
    jnz 1f
    movq MASK, %rax                  /* vCPU 0: its ports that are pending and unmasked */
    notq %rax
    andq OWN0, %rax
    andq PENDING, %rax
    notq %rax
    lock andq %rax, PENDING
1:  movl $APIC + 0xb0, %edi         /* EOI */
    movl $0, (%rdi)
    popq %rdi
    popq %rcx
    popq %rax
    iretq

    END64_IDT(32768)
