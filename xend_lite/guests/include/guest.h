/* Shared definitions for xend-lite's test and default guests (GNU as, AT&T syntax, run
 * through the C preprocessor). Guests start as the PVH ABI says: 32-bit protected mode,
 * paging off, EBX = hvm_start_info. */
#ifndef XEND_LITE_GUEST_H
#define XEND_LITE_GUEST_H

#define DEBUG_PORT 0xe9
#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define MSR_EFER 0xc0000080

/* GDT selectors laid out by GUEST_GDT below. */
#define SEL_CODE64 0x08
#define SEL_DATA 0x10
#define SEL_CODE32 0x18
#define SEL_UCODE64 0x23
#define SEL_UDATA 0x2b
#define SEL_UCODE32 0x33

/* The PVH entry note: the loader starts the guest at `entry` with EBX = start_info. */
#define PVH_NOTE(entry) \
    .pushsection .note.Xen, "a", @note; .balign 4; \
    .long 4; .long 4; .long XEN_ELFNOTE_PHYS32_ENTRY; .asciz "Xen"; .balign 4; \
    .long entry; .balign 4; .popsection

/* A flat GDT: 64-bit kernel code, data, 32-bit kernel code, and ring-3 variants. */
#define GUEST_GDT \
    .pushsection .data; .balign 16; \
guest_gdt: \
    .quad 0; \
    .quad 0x00af9a000000ffff; \
    .quad 0x00cf92000000ffff; \
    .quad 0x00cf9a000000ffff; \
    .quad 0x00affa000000ffff; \
    .quad 0x00cff2000000ffff; \
    .quad 0x00cffa000000ffff; \
guest_gdt_end: \
    .balign 8; \
guest_gdt_desc: .word guest_gdt_end - guest_gdt - 1; .quad guest_gdt; \
    .popsection

/* Identity page tables for the first 4 GiB with 2 MiB pages (for long mode). */
#define GUEST_PAGE_TABLES \
    .pushsection .data; .balign 4096; \
guest_pml4: .quad guest_pdpt + 0x3; .fill 511, 8, 0; \
guest_pdpt: .quad guest_pd + 0x3; .quad guest_pd + 0x1003; .quad guest_pd + 0x2003; \
    .quad guest_pd + 0x3003; .fill 508, 8, 0; \
guest_pd: .set pd_i, 0; .rept 2048; .quad (pd_i << 21) | 0x87; .set pd_i, pd_i + 1; .endr; \
    .popsection

/* From 32-bit protected mode (paging off) to 64-bit long mode at `target`.
 * Clobbers EAX, ECX, EDX. Needs GUEST_GDT and GUEST_PAGE_TABLES in the image. */
#define ENTER_LONG_MODE(target) \
    lgdt guest_gdt_desc; \
    movl %cr4, %eax; orl $0x20, %eax; movl %eax, %cr4; \
    movl $guest_pml4, %eax; movl %eax, %cr3; \
    movl $MSR_EFER, %ecx; rdmsr; orl $0x100, %eax; wrmsr; \
    movl %cr0, %eax; orl $0x80000000, %eax; movl %eax, %cr0; \
    ljmp $SEL_CODE64, $target

/* Write the NUL-terminated string at `label` to the debug port (64-bit code). */
#define PUTS64(label) \
    pushq %rsi; pushq %rax; pushq %rdx; leaq label(%rip), %rsi; movw $DEBUG_PORT, %dx; \
9001: lodsb; testb %al, %al; jz 9002f; outb %al, %dx; jmp 9001b; \
9002: popq %rdx; popq %rax; popq %rsi

/* The same from 32-bit code. */
#define PUTS32(label) \
    pushl %esi; pushl %eax; pushl %edx; movl $label, %esi; movw $DEBUG_PORT, %dx; \
9003: lodsb; testb %al, %al; jz 9004f; outb %al, %dx; jmp 9003b; \
9004: popl %edx; popl %eax; popl %esi

/* The usual start of a 64-bit test guest: the PVH entry `_start` (32-bit, paging off) sets
 * the stack at `stack_top`, enters long mode and continues at `main64` with flat data
 * segments; the guest's own code follows the macro. */
#define START64 \
    .section .text.entry, "ax"; .code32; .globl _start; \
_start: movl $stack_top, %esp; ENTER_LONG_MODE(main64); \
    .code64; \
main64: movw $SEL_DATA, %ax; movw %ax, %ds; movw %ax, %es; movw %ax, %ss; \
    leaq stack_top(%rip), %rsp

/* The usual end of a 64-bit test guest: its GDT and page tables, `bytes` of stack below
 * `stack_top`, and the PVH note naming `_start`. */
#define END64(bytes) \
    .data; GUEST_GDT; GUEST_PAGE_TABLES; \
    .bss; .balign 16; .space bytes; \
stack_top: ; \
    PVH_NOTE(_start)

/* The start of a 64-bit guest that every vCPU enters (the host sets them all running): each
 * takes `per_cpu` bytes of stack below `stack_top` by its APIC ID, enters long mode and
 * continues at `main64` with flat data segments and its APIC ID in %rbx. */
#define START64_SMP(per_cpu) \
    .section .text.entry, "ax"; .code32; .globl _start; \
_start: movl $1, %eax; cpuid; shrl $24, %ebx; imull $(per_cpu), %ebx, %eax; \
    movl $stack_top, %esp; subl %eax, %esp; ENTER_LONG_MODE(main64); \
    .code64; \
main64: movw $SEL_DATA, %ax; movw %ax, %ds; movw %ax, %es; movw %ax, %ss; \
    movl $1, %eax; cpuid; shrl $24, %ebx

/* The end of a 64-bit guest that takes interrupts: the IDT's descriptor, the GDT and page
 * tables, a 256-gate IDT at `idt`, `bytes` of stack below `stack_top`, the PVH note. */
#define END64_IDT(bytes) \
    .data; .balign 8; \
idt_desc: .word 256 * 16 - 1; .quad idt; GUEST_GDT; GUEST_PAGE_TABLES; \
    .bss; .balign 16; \
idt: .space 256 * 16; .space bytes; \
stack_top: ; \
    PVH_NOTE(_start)

/* HVMOP_set_param(DOMID_SELF, HVM_PARAM_CALLBACK_IRQ, vector type | `vector`): events
 * through the domain's callback vector. The struct is built at `args`; through the
 * hypercall page at `hcpage` (64-bit code); clobbers RAX, RSI, RDI. */
#define SET_CALLBACK_VECTOR(args, vector, hcpage) \
    movq $args, %rsi; movw $0x7ff0, 0(%rsi); movw $0, 2(%rsi); movl $0, 4(%rsi); \
    movabsq $(2 << 56 | (vector)), %rax; movq %rax, 8(%rsi); movl $0, %edi; \
    call hcpage + 34 * 32

/* Idle forever (a guest that is done). */
#define IDLE \
9005: pause; jmp 9005b

/* Install the hypercall page at guest-physical `page` through the MSR that the Xen leaf at
 * 0x40000002 names (guests that know Xen sits at the first base). */
#define INSTALL_HYPERCALL_PAGE(page) \
    movl $0x40000002, %eax; cpuid; movl %ebx, %ecx; movl $page, %eax; xorl %edx, %edx; wrmsr

/* XENMEM_add_to_physmap(DOMID_SELF, XENMAPSPACE_shared_info, 0, gpa >> 12) with the 24-byte
 * struct built at `xatp`, through the hypercall page at `hcpage` (64-bit code). */
#define MAP_SHARED_INFO(xatp, gpa, hcpage) \
    movq $xatp, %rsi; movw $0x7ff0, 0(%rsi); movw $0, 2(%rsi); movl $0, 4(%rsi); \
    movq $0, 8(%rsi); movq $((gpa) >> 12), 16(%rsi); movl $7, %edi; call hcpage + 12 * 32

/* Hypercall harness guests: routine bodies (ending in ret) that scan the hypervisor CPUID
 * leaves (0x40000000 up, 0x100 apart) for "XenVMMXenVMM" and record, in the table at `table`,
 * its highest leaf (+40), the version leaf's EAX (+32) and the hypercall MSR (+24); nothing
 * when no Xen is found. 64-bit: clobbers r12 and, when found, sets r15 = table. 32-bit:
 * clobbers esi. */
/* A present 64-bit interrupt gate for ``vector`` in the 16-byte-entry table at ``idt``
 * (a label), leading to ``handler`` (a label); clobbers %rax and %rdi. */
#define IDT_GATE64(idt, vector, handler) \
    leaq handler(%rip), %rax; leaq idt + (vector) * 16(%rip), %rdi; movw %ax, 0(%rdi); \
    movw $SEL_CODE64, 2(%rdi); movw $0x8e00, 4(%rdi); shrq $16, %rax; movw %ax, 6(%rdi); \
    shrq $16, %rax; movl %eax, 8(%rdi); movl $0, 12(%rdi)

#define FIND_XEN64(table) \
    movl $0x40000000, %r12d; \
9010: movl %r12d, %eax; cpuid; cmpl $0x566e6558, %ebx; jne 9011f; \
    movq $table, %r15; movl %eax, 40(%r15); \
    leal 1(%r12d), %eax; cpuid; movl %eax, 32(%r15); \
    leal 2(%r12d), %eax; cpuid; movl %ebx, 24(%r15); ret; \
9011: addl $0x100, %r12d; cmpl $0x40010000, %r12d; jb 9010b; ret

#define FIND_XEN32(table) \
    movl $0x40000000, %esi; \
9012: movl %esi, %eax; cpuid; cmpl $0x566e6558, %ebx; jne 9013f; \
    movl %eax, table + 40; \
    leal 1(%esi), %eax; cpuid; movl %eax, table + 32; \
    leal 2(%esi), %eax; cpuid; movl %ebx, table + 24; ret; \
9013: addl $0x100, %esi; cmpl $0x40010000, %esi; jb 9012b; ret

/* Hypercall harness guests (64-bit): fill every register a hypercall must keep with a
 * known pattern before the call ... */
#define FILL_PATTERNS64 \
    movq $0x1111111111111111, %rbx; movq $0x2222222222222222, %rcx; \
    movq $0x3333333333333333, %rbp; movq $0x4444444444444444, %r9; \
    movq $0x5555555555555555, %r11; movq $0x6666666666666666, %r12; \
    movq $0x7777777777777777, %r13; movq $0x8888888888888888, %r14; \
    movq $0x9999999999999999, %r15

/* ... and after it: RAX and the 14 registers into the table entry at 0(%rsp)+16 (pushed
 * r13), through the guest's own hc_result and regs_save (15 quadwords); pops r15, r14, r13. */
#define RECORD_CALL64 \
    movq %rax, hc_result(%rip); \
    movq %rbx, regs_save + 0(%rip); movq %rcx, regs_save + 8(%rip); \
    movq %rbp, regs_save + 16(%rip); movq %r9, regs_save + 24(%rip); \
    movq %r11, regs_save + 32(%rip); movq %r12, regs_save + 40(%rip); \
    movq %r13, regs_save + 48(%rip); movq %r14, regs_save + 56(%rip); \
    movq %r15, regs_save + 64(%rip); movq %rdi, regs_save + 72(%rip); \
    movq %rsi, regs_save + 80(%rip); movq %rdx, regs_save + 88(%rip); \
    movq %r10, regs_save + 96(%rip); movq %r8, regs_save + 104(%rip); \
    popq %r15; popq %r14; popq %r13; \
    leaq regs_save(%rip), %rsi; leaq 64(%r13), %rdi; movl $14, %ecx; cld; rep movsq; \
    movq hc_result(%rip), %rax; movq %rax, 56(%r13)

/* The variables RECORD_CALL64 / RECORD_CALL32 use (put in .data of a harness guest). */
#define HARNESS_DATA \
    .balign 8; hc_target: .quad 0; hc_result: .quad 0; regs_save: .fill 16, 8, 0; \
    entry_index: .long 0; entry_ptr: .long 0

/* The same for 32-bit harness guests: RAX and the six registers a 32-bit call keeps into the
 * table entry at entry_ptr (each zero-extended to a quadword), then entry_index is advanced
 * and stored as the done count at table + 16. */
#define RECORD_CALL32(table) \
    movl %eax, hc_result; \
    movl %ebx, regs_save + 0; movl %ecx, regs_save + 8; movl %edx, regs_save + 16; \
    movl %esi, regs_save + 24; movl %edi, regs_save + 32; movl %ebp, regs_save + 40; \
    movl entry_ptr, %ebx; movl $0, %ecx; \
9014: movl regs_save(,%ecx,8), %eax; movl %eax, 64(%ebx,%ecx,8); movl $0, 68(%ebx,%ecx,8); \
    incl %ecx; cmpl $6, %ecx; jb 9014b; \
    movl hc_result, %eax; movl %eax, 56(%ebx); movl $0, 60(%ebx); \
    incl entry_index; movl entry_index, %eax; movl %eax, table + 16

#endif
