/* A busy guest for control-plane benchmarks: every vCPU spins on a counter in its own
 * register, never exiting. */
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    xorl %eax, %eax
1:  incl %eax
    jmp 1b
