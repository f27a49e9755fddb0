/* Events through a per-vCPU upcall vector (HVMOP_set_evtchn_upcall_vector), as Linux takes
 * them when CPUID leaf 4 offers XEN_HVM_CPUID_UPCALL_VECTOR: the handler EOIs at the local
 * APIC like any interrupt's.
 *
 * As Linux does, the guest names its vector while its local APIC is still software-disabled
 * and an event is already flagged (an IPI it sent itself). KVM drops an interrupt for a
 * disabled APIC, where Xen's APIC keeps it pending: the upcall must still arrive once the
 * guest enables the APIC and halts. Then a second IPI. The handler counts at COUNT, clears
 * the upcall flag, the selector and word 0 of the pending bits, and EOIs. The guest stores
 * the count and signals port 0xf0.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define SHINFO 0x800000
#define XATP 0x300100
#define VEC 0x300200
#define IPI 0x300300
#define SEND 0x300310
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
    /* EVTCHNOP_bind_ipi(vcpu 0) and a send: the upcall is flagged, with nowhere to go */
    movq $IPI, %rsi
    movl $0, 0(%rsi)
    movl $7, %edi
    call HCPAGE + 32 * 32
    movl IPI + 4, %eax
    movq %rax, PORT
    call send
    /* HVMOP_set_evtchn_upcall_vector(vcpu 0, VECTOR), the APIC still disabled */
    movq $VEC, %rsi
    movl $0, 0(%rsi)
    movb $VECTOR, 4(%rsi)
    movl $23, %edi
    call HCPAGE + 34 * 32
    movl $APIC + 0xf0, %edi          /* spurious vector register: software enable */
    orl $0x1ff, (%rdi)
    sti
    movq $1, %rbx
    call wait_count
    call send
    movq $2, %rbx
    call wait_count
    movb $1, %al
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

wait_count:                          /* halt until COUNT >= %rbx (HLT returns on any interrupt) */
    movl $2000, %ecx
1:  cmpq %rbx, COUNT
    jae 2f
    hlt
    loop 1b
2:  ret

upcall:
    pushq %rax
    pushq %rdi
    incq COUNT
    movb $0, SHINFO                  /* vcpu0 evtchn_upcall_pending */
    xorl %eax, %eax
    xchgq %rax, SHINFO + 8           /* its evtchn_pending_sel */
    xorl %eax, %eax
    xchgq %rax, PENDING              /* ports 0-63 */
    movl $APIC + 0xb0, %edi          /* EOI */
    movl $0, (%rdi)
    popq %rdi
    popq %rax
    iretq

    END64_IDT(8192)
