/* Powers off at once: SCHEDOP_shutdown(SHUTDOWN_poweroff) through the hypercall page. */
#include "guest.h"

#define HCPAGE 0x200000
#define REASON 0x300000

    START64
    INSTALL_HYPERCALL_PAGE(HCPAGE)
    movl $0, REASON                 /* SHUTDOWN_poweroff */
    movl $2, %edi                   /* SCHEDOP_shutdown */
    movq $REASON, %rsi
    call HCPAGE + 29 * 32
    IDLE

    END64(8192)
