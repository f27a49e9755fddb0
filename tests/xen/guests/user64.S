/* A hypercall from ring 3 must get -EPERM, as Xen gives a guest's user space.
 *
 * Installs the hypercall page, then IRETQs to 64-bit user code (IOPL 3, so its port writes
 * reach the host) which calls xen_version through the stub page, stores RAX at RESULT and
 * signals port 0xf0. */
#include "guest.h"

#define HCPAGE 0x200000
#define RESULT 0x300000

    START64
    INSTALL_HYPERCALL_PAGE(HCPAGE)
    /* kernel-mode call first: it must succeed */
    xorl %edi, %edi
    call HCPAGE + 17 * 32
    movq %rax, RESULT + 8
    /* let ring 3 use the identity map: the U/S bit on the upper levels too */
    orq $4, guest_pml4(%rip)
    orq $4, guest_pdpt(%rip)
    orq $4, guest_pdpt + 8(%rip)
    orq $4, guest_pdpt + 16(%rip)
    orq $4, guest_pdpt + 24(%rip)
    movq %cr3, %rax
    movq %rax, %cr3
    leaq user_stack_top(%rip), %rax
    pushq $SEL_UDATA
    pushq %rax
    pushq $0x3002                   /* IOPL 3, IF clear */
    pushq $SEL_UCODE64
    leaq user(%rip), %rax
    pushq %rax
    iretq
user:
    xorl %edi, %edi
    call HCPAGE + 17 * 32
    movq %rax, RESULT
    movb $1, %al
    outb %al, $0xf0
    IDLE

    .data
    GUEST_GDT
    GUEST_PAGE_TABLES
    .bss
    .balign 16
    .space 8192
stack_top:
    .space 8192
user_stack_top:
    PVH_NOTE(_start)
