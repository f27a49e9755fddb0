/* The x87 FIP width the domain advertises (HVM_PARAM_X87_FIP_WIDTH) against what its
 * saved state keeps.
 *
 * Reads the param (rc to OUT, value to OUT + 8). Loads, with FXRSTOR64, an FPU image whose
 * last x87 instruction and operand pointers (FIP, FDP) need all 64 bits (FIP to OUT + 16,
 * FDP to OUT + 24), reads them back with FXSAVE64 (OUT + 32, OUT + 40) and signals port
 * 0xf0. (The x87 arithmetic instructions that would set them stop this host's KVM, so
 * the image is loaded instead.) Then it waits for OUT + 64 to become non-zero (the host
 * saves and restores the domain meanwhile), reads them again (OUT + 48, OUT + 56) and
 * signals again.
 */
#include "guest.h"

#define HCPAGE 0x200000
#define OUT 0x300000
#define PARAM 0x300800
#define FXAREA 0x301000
#define FIP 0x00007abc12345678
#define FDP 0x00006def87654321
#define DONE_PORT 0xf0

    START64
    INSTALL_HYPERCALL_PAGE(HCPAGE)
    movq $PARAM, %rsi
    movw $0x7ff0, 0(%rsi)           /* DOMID_SELF */
    movw $0, 2(%rsi)
    movl $36, 4(%rsi)               /* HVM_PARAM_X87_FIP_WIDTH */
    movq $0, 8(%rsi)
    movl $1, %edi                   /* HVMOP_get_param */
    call HCPAGE + 34 * 32
    movq %rax, OUT
    movq PARAM + 8, %rax
    movq %rax, OUT + 8
    fxsave64 FXAREA                 /* a valid image to start from */
    movabsq $FIP, %rax
    movq %rax, FXAREA + 8
    movq %rax, OUT + 16
    movabsq $FDP, %rax
    movq %rax, FXAREA + 16
    movq %rax, OUT + 24
    fxrstor64 FXAREA
    movq $0, FXAREA + 8
    movq $0, FXAREA + 16
    fxsave64 FXAREA
    movq FXAREA + 8, %rax
    movq %rax, OUT + 32
    movq FXAREA + 16, %rax
    movq %rax, OUT + 40
    movb $1, %al
    outb %al, $DONE_PORT
1:  cmpq $0, OUT + 64
    jne 2f
    pause
    jmp 1b
2:  movq $0, FXAREA + 8
    movq $0, FXAREA + 16
    fxsave64 FXAREA
    movq FXAREA + 8, %rax
    movq %rax, OUT + 48
    movq FXAREA + 16, %rax
    movq %rax, OUT + 56
    movb $2, %al
    outb %al, $DONE_PORT
    IDLE

    END64(8192)
