/* Counts in memory and makes hypercalls, for save/restore tests.
 *
 * Installs the hypercall page, maps shared_info at SHINFO, then loops forever: COUNTER += 1,
 * and every 256 iterations one xen_version hypercall, counted at COUNTER + 8 and its result
 * kept at COUNTER + 16. A restored guest goes on from the values it had.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define SHINFO 0x800000
#define XATP 0x300100
#define COUNTER 0x300000

    START64
    INSTALL_HYPERCALL_PAGE(HCPAGE)
    MAP_SHARED_INFO(XATP, SHINFO, HCPAGE)
1:  incq COUNTER
    testb $0xff, COUNTER
    jnz 1b
    xorl %edi, %edi
    call HCPAGE + 17 * 32
    movq %rax, COUNTER + 16
    incq COUNTER + 8
    jmp 1b

    END64(8192)
