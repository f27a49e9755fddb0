/* Two vCPUs hammer guest RAM around an overlay page while the host moves the page.
 *
 * Runs unpaged in 32-bit protected mode; ESI holds the vCPU index (the host sets it). Each
 * vCPU counts, writes its count to its own slot in the RAM pages just below and just above
 * OVL (0x800000), and to its slot inside OVL itself (which is the overlay page or RAM,
 * whichever is mapped at that moment), then reads the two RAM slots back: any mismatch is
 * a lost write, counted at ERRORS + 8 * index. The count is published at COUNTS + 8 * index.
 */
#define OVL 0x800000
#define BELOW (OVL - 0x1000 + 0x800)
#define ABOVE (OVL + 0x1000 + 0x800)
#define INSIDE (OVL + 0x800)
#define COUNTS 0x300000
#define ERRORS 0x300100

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    xorl %ecx, %ecx                 /* count */
    leal (, %esi, 8), %edi          /* slot offset */
1:  incl %ecx
    movl %ecx, BELOW(%edi)
    movl %ecx, ABOVE(%edi)
    movl %ecx, INSIDE(%edi)
    cmpl BELOW(%edi), %ecx
    jne 2f
    cmpl ABOVE(%edi), %ecx
    jne 2f
3:  movl %ecx, COUNTS(%edi)
    jmp 1b
2:  incl ERRORS(%edi)
    jmp 3b

#define XEN_ELFNOTE_PHYS32_ENTRY 18
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4, 4, XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .long _start
    .popsection
