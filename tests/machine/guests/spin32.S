/* Two vCPUs, each incrementing its own counter in a tight loop with no exits:
 * vCPU 0 enters at _start (counter at C0), vCPU 1 at ap_start (counter at C1). */
#include "guest.h"
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    movl $C0, %ebx
1:  incl (%ebx)
    jmp 1b
    .globl ap_start
ap_start:
    movl $C1, %ebx
1:  incl (%ebx)
    jmp 1b
PVH_NOTE(_start)
