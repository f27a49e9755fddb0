/* Loops on the hypercalls served natively, for pause and counter tests.
 *
 * Installs the hypercall page, then forever: xen_version(XENVER_version) with its result
 * kept at COUNT + 8, sched_op(SCHEDOP_yield) with its result at COUNT + 16, COUNT += 1.
 * It makes no other exit once looping.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define COUNT 0x300000

    START64
    INSTALL_HYPERCALL_PAGE(HCPAGE)
1:  xorl %edi, %edi
    call HCPAGE + 17 * 32           /* xen_version(XENVER_version) */
    movq %rax, COUNT + 8
    xorl %edi, %edi                 /* SCHEDOP_yield */
    xorl %esi, %esi
    call HCPAGE + 29 * 32           /* sched_op */
    movq %rax, COUNT + 16
    incq COUNT
    jmp 1b

    END64(8192)
