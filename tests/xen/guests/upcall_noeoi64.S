/* Events through the domain's callback vector (HVM_PARAM_CALLBACK_IRQ, vector type), taken as
 * a Linux guest without a per-vCPU upcall vector takes them: the handler never writes the
 * local APIC's EOI register, because Xen does not deliver this vector through the APIC.
 *
 * Three upcalls must arrive: an IPI sent to itself, the same again once the first was
 * handled (a vector stuck in the APIC's in-service register would block it), and the
 * VIRQ_TIMER of a one-shot timer already due while the guest sits in HLT. The handler
 * counts at COUNT and clears the upcall flag, the selector and word 0 of the pending bits.
 * Each wait is bounded; the guest stores the count and signals port 0xf0.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define SHINFO 0x800000
#define XATP 0x300100
#define PARAM 0x300200
#define IPI 0x300300
#define SEND 0x300310
#define VIRQ 0x300320
#define TIMER 0x300340
#define COUNT 0x300000
#define PORT 0x300008
#define VECTOR 0xf3
#define APIC 0xfee00000
#define PENDING (SHINFO + 2048)

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
    call send
    movq $1, %rbx
    call wait_count
    call send
    movq $2, %rbx
    call wait_count
    /* EVTCHNOP_bind_virq(VIRQ_TIMER, vcpu 0), then a one-shot timer at system time 0 */
    movq $VIRQ, %rsi
    movl $0, 0(%rsi)
    movl $0, 4(%rsi)
    movl $1, %edi
    call HCPAGE + 32 * 32
    movq $TIMER, %rdx
    movq $0, 0(%rdx)
    movl $0, 8(%rdx)
    movl $8, %edi                    /* VCPUOP_set_singleshot_timer */
    movl $0, %esi
    call HCPAGE + 24 * 32
    movl $2000, %ecx                 /* bounded: HLT returns on any interrupt */
1:  cmpq $3, COUNT
    jae 2f
    hlt
    loop 1b
2:  movb $1, %al
    outb %al, $0xf0
3:  pause
    jmp 3b

send:                                /* EVTCHNOP_send(PORT) */
    movq $SEND, %rsi
    movq PORT, %rax
    movl %eax, 0(%rsi)
    movl $4, %edi
    call HCPAGE + 32 * 32
    ret

wait_count:                          /* spin until COUNT >= %rbx, bounded */
    movl $100000000, %ecx
1:  cmpq %rbx, COUNT
    jae 2f
    pause
    loop 1b
2:  ret

upcall:
    pushq %rax
    incq COUNT
    movb $0, SHINFO                  /* vcpu0 evtchn_upcall_pending */
    xorl %eax, %eax
    xchgq %rax, SHINFO + 8           /* its evtchn_pending_sel */
    xorl %eax, %eax
    xchgq %rax, PENDING              /* ports 0-63 */
    popq %rax
    iretq

    END64_IDT(8192)
