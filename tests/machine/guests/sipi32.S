/* Starts vCPU 1 the way an x86 OS does without any Xen call: INIT then STARTUP IPIs through
 * the xAPIC's ICR, the second vCPU beginning in real mode at a page below 1 MiB.
 *
 * Ports: in 0x5a0 (the BSP waits while it reads 0), out 0x5a1 (the BSP sent INIT/SIPI),
 * out 0x5a2 (what the AP left: its APIC ID from CPUID leaf 1), then the BSP halts with
 * interrupts off (a poweroff). The AP waits with interrupts enabled (no exits). */
#include "guest.h"

#define TRAMPOLINE 0x8000
#define FLAG 0x9000
#define APIC_ICR_LO 0xfee00300
#define APIC_ICR_HI 0xfee00310

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl $stack_top, %esp
    cld
    movl $ap_start, %esi
    movl $TRAMPOLINE, %edi
    movl $(ap_end - ap_start), %ecx
    rep movsb
    movl $0, FLAG
1:  movw $0x5a0, %dx            /* the host looks at vCPU 1 before it is started */
    inl %dx, %eax
    testl %eax, %eax
    jz 1b
    movl $(1 << 24), APIC_ICR_HI
    movl $0x00004500, APIC_ICR_LO   /* INIT, level assert, to APIC ID 1 */
    movl $(1 << 24), APIC_ICR_HI
    movl $(0x00004600 | (TRAMPOLINE >> 12)), APIC_ICR_LO   /* STARTUP at TRAMPOLINE */
    movw $0x5a1, %dx
    outl %eax, %dx
2:  pause
    movl FLAG, %eax
    testl %eax, %eax
    jz 2b
    movw $0x5a2, %dx
    outl %eax, %dx
    movb $'S', %al              /* and on the debug port, for a run under another VMM */
    outb %al, $DEBUG_PORT
    cli
    hlt

    .code16
ap_start:
    xorw %ax, %ax
    movw %ax, %ds
    movl $1, %eax
    cpuid
    shrl $24, %ebx
    orl $0xa9000000, %ebx       /* non-zero even for APIC ID 0 */
    movl %ebx, FLAG
3:  sti
    hlt
    jmp 3b
ap_end:
    .code32

    .section .bss
    .balign 16
    .skip 4096
stack_top:
PVH_NOTE(_start)
