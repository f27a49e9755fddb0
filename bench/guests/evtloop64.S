/* The event-channel round-trip guest: every vCPU sends on an IPI port bound to itself and
 * waits for the upcall that send raises, forever.
 *
 * A 64-bit PVH image; every vCPU starts at _start (the host sets them all running) and
 * tells itself apart by APIC ID. vCPU 0 installs the hypercall page, maps shared_info and
 * names VECTOR as the domain's callback, then lets the others go on; each vCPU binds its
 * port with EVTCHNOP_bind_ipi and enables interrupts. A round: EVTCHNOP_send, then wait
 * until the handler has counted the upcall. The handler clears the vCPU's upcall flag, its
 * selector and its port's pending bit, EOIs and counts at COUNT + 8 * APIC ID, which the host
 * samples. BAD counts a send that did not return 0.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define SHINFO 0x800000
#define DATA 0x300000
#define COUNT (DATA + 0x00)          /* u64 per vCPU */
#define PORTS (DATA + 0x100)         /* u64 per vCPU */
#define READY (DATA + 0x200)
#define BAD (DATA + 0x208)
#define ARGS (DATA + 0x1000)         /* 0x100 per vCPU */
#define VECTOR 0xf3
#define APIC 0xfee00000
#define PENDING (SHINFO + 2048)

    START64_SMP(8192)
    movq %rbx, %r15                  /* r15: this vCPU */
    movq %r15, %r14
    shlq $8, %r14
    addq $ARGS, %r14                 /* r14: its structs */
    testq %r15, %r15
    jnz 2f
    INSTALL_HYPERCALL_PAGE(HCPAGE)
    MAP_SHARED_INFO(ARGS + 0x40, SHINFO, HCPAGE)
    IDT_GATE64(idt, VECTOR, upcall)
    SET_CALLBACK_VECTOR(ARGS + 0x80, VECTOR, HCPAGE)
    movq $1, READY
2:  cmpq $0, READY
    je 2b
    lidt idt_desc(%rip)
    movl $APIC + 0xf0, %edi          /* spurious vector register: software enable */
    orl $0x1ff, (%rdi)
    /* EVTCHNOP_bind_ipi(this vCPU) */
    movl %r15d, 0(%r14)
    movl $0, 4(%r14)
    movq %r14, %rsi
    movl $7, %edi
    call HCPAGE + 32 * 32
    movl 4(%r14), %eax
    movq %rax, PORTS(, %r15, 8)
    movl %eax, 0x10(%r14)            /* the evtchn_send struct */
    sti
3:  movq COUNT(, %r15, 8), %r13
    leaq 0x10(%r14), %rsi
    movl $4, %edi
    call HCPAGE + 32 * 32
    testq %rax, %rax
    jz 4f
    lock incq BAD
4:  cmpq %r13, COUNT(, %r15, 8)
    jne 3b
    pause
    jmp 4b

upcall:
    pushq %rax
    pushq %rcx
    pushq %rdi
    movl $APIC + 0x20, %edi
    movl (%rdi), %ecx
    shrl $24, %ecx                   /* this vCPU */
    movq %rcx, %rdi
    shlq $6, %rdi
    movb $0, SHINFO(%rdi)            /* its evtchn_upcall_pending */
    xorl %eax, %eax
    xchgq %rax, SHINFO + 8(%rdi)     /* its evtchn_pending_sel */
    movq PORTS(, %rcx, 8), %rax
    lock btrq %rax, PENDING          /* its port */
    incq COUNT(, %rcx, 8)
    movl $APIC + 0xb0, %edi          /* EOI */
    movl $0, (%rdi)
    popq %rdi
    popq %rcx
    popq %rax
    iretq

    END64_IDT(8192 * 4)
