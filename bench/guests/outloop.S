/* The exit-loop guest: writes EAX to port 0x510 forever. The host answers each write by
 * setting RAX (in the modes that do), so EAX counts the round trips the guest has seen. */
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl $0x510, %edx
    xorl %eax, %eax
1:  outl %eax, %dx
    jmp 1b
