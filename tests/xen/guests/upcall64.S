/* An event reaches the guest as an interrupt, as a Linux HVM guest receives its events.
 *
 * Maps shared_info, installs an IDT gate for vector 0xf3, enables the local APIC, names
 * 0xf3 as its upcall vector (HVM_PARAM_CALLBACK_IRQ, vector type), binds an IPI event
 * channel, enables interrupts and sends on the port. The handler counts at COUNT, clears
 * the upcall flag and EOIs. The guest waits for the count, stores the port at PORT and
 * signals port 0xf0.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define SHINFO 0x800000
#define XATP 0x300100
#define PARAM 0x300200
#define IPI 0x300300
#define SEND 0x300310
#define COUNT 0x300000
#define PORT 0x300008
#define VECTOR 0xf3
#define APIC 0xfee00000

    START64
    INSTALL_HYPERCALL_PAGE(HCPAGE)
    MAP_SHARED_INFO(XATP, SHINFO, HCPAGE)
    IDT_GATE64(idt, VECTOR, upcall)
    lidt idt_desc(%rip)
    movl $APIC + 0xf0, %edi          /* spurious vector register: software enable */
    orl $0x1ff, (%rdi)
    SET_CALLBACK_VECTOR(PARAM, VECTOR, HCPAGE)
    /* EVTCHNOP_bind_ipi(vcpu 0) */
    movq $IPI, %rsi
    movl $0, 0(%rsi)
    movl $7, %edi
    call HCPAGE + 32 * 32
    movl IPI + 4, %eax
    movq %rax, PORT
    sti
    /* EVTCHNOP_send(port) */
    movq $SEND, %rsi
    movl %eax, 0(%rsi)
    movl $4, %edi
    call HCPAGE + 32 * 32
    movl $100000000, %ecx
1:  cmpq $0, COUNT
    jne 2f
    pause
    loop 1b
2:  movb $1, %al
    outb %al, $0xf0
3:  pause
    jmp 3b

upcall:
    incq COUNT
    movb $0, SHINFO                  /* vcpu0 evtchn_upcall_pending */
    pushq %rdi
    movl $APIC + 0xb0, %edi          /* EOI */
    movl $0, (%rdi)
    popq %rdi
    iretq

    END64_IDT(8192)
