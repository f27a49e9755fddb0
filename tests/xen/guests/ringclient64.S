/* A guest that speaks to the console and xenstore rings as the host scripts it.
 *
 * It installs the hypercall page, reads HVM_PARAM_STORE_PFN/EVTCHN and CONSOLE_PFN/EVTCHN
 * into CTL, then runs a program the host writes at PROG, one 32-byte op at a time
 * (u64 op, a, b, c), for as long as CTL.count says there are ops; the host may append ops
 * and raise the count at any time. Between ops, and while it waits for more, it drains the
 * xenstore reply ring into CAPTURE (up to CAP_SIZE bytes, counting all) and signals the
 * store event channel when it consumed anything, as a PV driver does.
 *
 * Ops:  1 XS_WRITE a=buffer b=length   bytes into the request ring, with flow control
 *       2 CONS_WRITE a=buffer b=length bytes into the console's out ring, with flow control
 *       3 POKE32 a=address b=value     store a u32 (a guest breaking its own rings)
 *       4 SEND_STORE  5 SEND_CONSOLE   EVTCHNOP_send on that port
 *       6 WAIT_REPLIES a=bytes         until that many reply bytes were consumed in all
 *       7 WAIT32 a=address b=value     until the u32 there is the value (yielding)
 *       8 SIGNAL                       outb to port 0xf0
 *       9 HCALL a=number b=rdi c=rsi   any hypercall; RAX to CTL.result
 *      10 CPUID a=leaf b=subleaf       EAX, EBX, ECX, EDX to CTL.cpuid (u32 each)
 * CTL: +0 count, +8 ops done, +16 reply bytes consumed, +24 bytes captured, +32 store page,
 *      +40 store port, +48 console page, +56 console port, +64 loop count, +72 result,
 *      +80 cpuid.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define CTL 0x300000
#define PARAM 0x300800
#define SENDARG 0x300840
#define PROG 0x301000
#define CAPTURE 0x1000000
#define CAP_SIZE 0x1000000
#define DONE_PORT 0xf0

#define C_COUNT (CTL + 0)
#define C_PC (CTL + 8)
#define C_RSP (CTL + 16)
#define C_CAP (CTL + 24)
#define C_STORE (CTL + 32)
#define C_SPORT (CTL + 40)
#define C_CONS (CTL + 48)
#define C_CPORT (CTL + 56)
#define C_LOOPS (CTL + 64)
#define C_RESULT (CTL + 72)
#define C_CPUID (CTL + 80)

#define HC_SCHED 29
#define HC_EVTCHN 32
#define HC_HVM 34

/* xenstore_domain_interface and xencons_interface offsets */
#define XS_RSP 1024
#define XS_REQ_CONS 2048
#define XS_REQ_PROD 2052
#define XS_RSP_CONS 2056
#define XS_RSP_PROD 2060
#define CO_OUT 1024
#define CO_OUT_CONS 3080
#define CO_OUT_PROD 3084

    START64
    INSTALL_HYPERCALL_PAGE(HCPAGE)
    movl $1, %edi                   /* HVM_PARAM_STORE_PFN */
    call get_param
    shlq $12, %rax
    movq %rax, C_STORE
    movl $2, %edi                   /* HVM_PARAM_STORE_EVTCHN */
    call get_param
    movq %rax, C_SPORT
    movl $17, %edi                  /* HVM_PARAM_CONSOLE_PFN */
    call get_param
    shlq $12, %rax
    movq %rax, C_CONS
    movl $18, %edi                  /* HVM_PARAM_CONSOLE_EVTCHN */
    call get_param
    movq %rax, C_CPORT

run:
    incq C_LOOPS
    call xs_drain
    movq C_PC, %r14
    cmpq C_COUNT, %r14
    jb 1f
    pause
    jmp run
1:  movq %r14, %r15
    shlq $5, %r15
    addq $PROG, %r15                /* r15 = this op */
    movq 0(%r15), %rax
    cmpq $1, %rax
    je op_xs_write
    cmpq $2, %rax
    je op_cons_write
    cmpq $3, %rax
    je op_poke
    cmpq $4, %rax
    je op_send_store
    cmpq $5, %rax
    je op_send_console
    cmpq $6, %rax
    je op_wait_replies
    cmpq $7, %rax
    je op_wait32
    cmpq $8, %rax
    je op_signal
    cmpq $9, %rax
    je op_hcall
    cmpq $10, %rax
    je op_cpuid
next:
    incq C_PC
    jmp run

op_xs_write:
    movq 8(%r15), %r12
    movq 16(%r15), %r13
    call xs_write
    jmp next
op_cons_write:
    movq 8(%r15), %r12
    movq 16(%r15), %r13
    call cons_write
    jmp next
op_poke:
    movq 8(%r15), %rdi
    movl 16(%r15), %eax
    movl %eax, (%rdi)
    jmp next
op_send_store:
    movq C_SPORT, %rdi
    call send
    jmp next
op_send_console:
    movq C_CPORT, %rdi
    call send
    jmp next
op_wait_replies:
    call xs_drain
    movq C_RSP, %rax
    cmpq 8(%r15), %rax
    jae next
    call yield
    jmp op_wait_replies
op_wait32:
    call xs_drain
    movq 8(%r15), %rdi
    movl (%rdi), %eax
    cmpl 16(%r15), %eax
    je next
    call yield
    jmp op_wait32
op_signal:
    movb $1, %al
    outb %al, $DONE_PORT
    jmp next
op_hcall:
    movq 8(%r15), %rax
    shlq $5, %rax
    addq $HCPAGE, %rax
    movq 16(%r15), %rdi
    movq 24(%r15), %rsi
    call *%rax
    movq %rax, C_RESULT
    jmp next

op_cpuid:
    movl 8(%r15), %eax
    movl 16(%r15), %ecx
    cpuid
    movl %eax, C_CPUID
    movl %ebx, C_CPUID + 4
    movl %ecx, C_CPUID + 8
    movl %edx, C_CPUID + 12
    jmp next

/* rax = HVMOP_get_param(DOMID_SELF, index edi) */
get_param:
    movq $PARAM, %rsi
    movw $0x7ff0, 0(%rsi)
    movw $0, 2(%rsi)
    movl %edi, 4(%rsi)
    movq $0, 8(%rsi)
    movl $1, %edi                   /* HVMOP_get_param */
    call HCPAGE + HC_HVM * 32
    movq PARAM + 8, %rax
    ret

/* EVTCHNOP_send(port rdi) */
send:
    movl %edi, SENDARG
    movl $4, %edi
    movq $SENDARG, %rsi
    call HCPAGE + HC_EVTCHN * 32
    ret

yield:
    xorl %edi, %edi                 /* SCHEDOP_yield */
    xorl %esi, %esi
    call HCPAGE + HC_SCHED * 32
    ret

/* Take every reply byte waiting, into CAPTURE while there is room; signal if any. */
xs_drain:
    movq C_STORE, %rbx
    movl XS_RSP_CONS(%rbx), %ecx
    movl XS_RSP_PROD(%rbx), %edx
    xorl %r11d, %r11d               /* consumed anything */
1:  cmpl %edx, %ecx
    je 3f
    movl %edx, %eax
    subl %ecx, %eax                 /* waiting */
    cmpl $1024, %eax
    ja 3f                           /* impossible indices: leave them */
    movl %ecx, %r8d
    andl $1023, %r8d
    movl $1024, %r9d
    subl %r8d, %r9d                 /* to the end of the ring */
    cmpl %r9d, %eax
    cmova %r9d, %eax
    movl %eax, %r10d                /* chunk */
    movq C_CAP, %rdi
    leaq (%rdi, %r10), %rsi
    cmpq $CAP_SIZE, %rsi
    ja 2f                           /* capture full: count only */
    pushq %rcx
    leaq XS_RSP(%rbx, %r8), %rsi
    addq $CAPTURE, %rdi
    movl %r10d, %ecx
    cld
    rep movsb
    popq %rcx
    addq %r10, C_CAP
2:  addq %r10, C_RSP
    addl %r10d, %ecx
    movl $1, %r11d
    jmp 1b
3:  movl %ecx, XS_RSP_CONS(%rbx)
    testl %r11d, %r11d
    jz 4f
    movq C_SPORT, %rdi
    call send
4:  ret

/* r12 = buffer, r13 = length, into the request ring; a full ring (or indices that make no
 * sense) is waited out: signal, drain, yield, look again. */
xs_write:
    testq %r13, %r13
    jz 9f
    movq C_STORE, %rbx
    movl XS_REQ_CONS(%rbx), %ecx
    movl XS_REQ_PROD(%rbx), %edx
    movl %edx, %eax
    subl %ecx, %eax                 /* used */
    movl $1024, %r9d
    subl %eax, %r9d                 /* room (wraps huge if the indices are broken) */
    testl %r9d, %r9d
    jz 8f
    cmpl $1024, %r9d
    ja 8f
    movl %edx, %r8d
    andl $1023, %r8d
    movl $1024, %r10d
    subl %r8d, %r10d
    cmpl %r10d, %r9d
    cmova %r10d, %r9d
    cmpq %r9, %r13
    cmovb %r13, %r9                 /* chunk = min(room, to end, left) */
    movq %r12, %rsi
    leaq (%rbx, %r8), %rdi
    movl %r9d, %ecx
    cld
    rep movsb
    addl %r9d, %edx
    movl %edx, XS_REQ_PROD(%rbx)
    addq %r9, %r12
    subq %r9, %r13
    movq C_SPORT, %rdi
    call send
    call xs_drain
    jmp xs_write
8:  movq C_SPORT, %rdi
    call send
    call xs_drain
    call yield
    jmp xs_write
9:  ret

/* r12 = buffer, r13 = length, into the console's out ring. */
cons_write:
    testq %r13, %r13
    jz 9f
    movq C_CONS, %rbx
    movl CO_OUT_CONS(%rbx), %ecx
    movl CO_OUT_PROD(%rbx), %edx
    movl %edx, %eax
    subl %ecx, %eax
    movl $2048, %r9d
    subl %eax, %r9d
    testl %r9d, %r9d
    jz 8f
    cmpl $2048, %r9d
    ja 8f
    movl %edx, %r8d
    andl $2047, %r8d
    movl $2048, %r10d
    subl %r8d, %r10d
    cmpl %r10d, %r9d
    cmova %r10d, %r9d
    cmpq %r9, %r13
    cmovb %r13, %r9
    movq %r12, %rsi
    leaq CO_OUT(%rbx, %r8), %rdi
    movl %r9d, %ecx
    cld
    rep movsb
    addl %r9d, %edx
    movl %edx, CO_OUT_PROD(%rbx)
    addq %r9, %r12
    subq %r9, %r13
    movq C_CPORT, %rdi
    call send
    jmp cons_write
8:  movq C_CPORT, %rdi
    call send
    call yield
    jmp cons_write
9:  ret

    END64(16384)
