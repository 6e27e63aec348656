/*
 * Multiboot v1 entry point: 32-bit protected mode -> 64-bit long mode.
 *
 * The loader enters _start32 with EAX = 0x2BADB002, EBX = physical address
 * of the multiboot information structure, flat 32-bit segments, paging off
 * and interrupts disabled.  We must not rely on the loader's GDT or stack.
 *
 * This file is assembled into an ELF64 object; the 32-bit part only uses
 * absolute addresses below 4 GiB, so R_X86_64_32 relocations suffice.
 */
#include "guest.h"

/* Load the flat data segment everywhere (32-bit code). */
.macro DATA_SEGMENTS32
    movl    $GDT_DATA, %eax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movw    %ax, %fs
    movw    %ax, %gs
.endm

/* Load the data segments of long mode: flat DS, ES, SS; null FS, GS. */
.macro DATA_SEGMENTS64
    movl    $GDT_DATA, %eax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    xorl    %eax, %eax
    movw    %ax, %fs
    movw    %ax, %gs
.endm

/* ------------------------------------------------------------------------
 * Multiboot header: its own section, placed first by linker.ld, so that it
 * lies within the first 8 KiB of the image file.  No a.out kludge (flag
 * bit 16): the loader uses the ELF program headers.
 * ---------------------------------------------------------------------- */
    .section .multiboot, "a"
    .balign 4
    .long   MB_HEADER_MAGIC
    .long   MB_HEADER_FLAGS
    .long   -(MB_HEADER_MAGIC + MB_HEADER_FLAGS)

/* ------------------------------------------------------------------------
 * 32-bit entry.
 * ---------------------------------------------------------------------- */
    .section .text.boot, "ax"
    .code32
    .globl  _start32
_start32:
    cli
    cld
    movl    %eax, %esi                  /* multiboot magic */
    movl    %ebx, %ebp                  /* multiboot info address */

    lgdt    gdt_ptr
    ljmp    $GDT_CODE32, $1f
1:  DATA_SEGMENTS32

    /*
     * Clear .bss (PML4, PDPT and stack live there).  The page-directory pool
     * is outside [__bss_start, __bss_end): directories 0-3 are completely
     * written below and the others are cleared by memory.c when first used.
     */
    movl    $__bss_start, %edi
    movl    $__bss_end, %ecx
    subl    %edi, %ecx
    shrl    $2, %ecx
    xorl    %eax, %eax
    rep stosl
    movl    $boot_stack_top, %esp

    /*
     * Identity-map [0, 4 GiB) with 2 MiB pages: pd_pool[0..3] are four
     * consecutive page directories = 2048 PDEs.  [3 GiB, 4 GiB) (PCI hole,
     * IOAPIC, LAPIC) is mapped uncached; memory.c later makes any RAM the
     * memory map reports there write-back.
     */
    movl    $pd_pool, %edi
    xorl    %ecx, %ecx
2:  movl    %ecx, %eax
    shll    $LARGE_PAGE_SHIFT, %eax
    orl     $PTE_LARGE_WB, %eax
    cmpl    $(UC_FROM_GIB * 512), %ecx
    jb      3f
    orl     $(PTE_PCD | PTE_PWT), %eax
3:  movl    %eax, (%edi,%ecx,8)
    movl    $0, 4(%edi,%ecx,8)          /* physical address bits 63:32 */
    incl    %ecx
    cmpl    $(BOOT_MAP_GIB * 512), %ecx
    jb      2b

    /* PDPT[0..3] -> pd_pool[0..3]; PML4[0] -> PDPT. */
    movl    $pdpt, %edi
    movl    $(pd_pool + PTE_TABLE), %eax
    xorl    %ecx, %ecx
4:  movl    %eax, (%edi,%ecx,8)
    addl    $4096, %eax
    incl    %ecx
    cmpl    $BOOT_MAP_GIB, %ecx
    jb      4b
    movl    $(pdpt + PTE_TABLE), pml4
    call    long_mode_on
    ljmp    $GDT_CODE64, $long_entry

/*
 * Enable PAE, load CR3 with the kernel's page tables, set EFER.LME, then
 * enable paging: returns in compatibility mode (a far jump to 64-bit code
 * follows).  Clobbers EAX, ECX, EDX.
 */
long_mode_on:
    movl    %cr4, %eax
    orl     $CR4_PAE, %eax
    movl    %eax, %cr4
    movl    $pml4, %eax
    movl    %eax, %cr3
    movl    $MSR_EFER, %ecx
    rdmsr
    orl     $EFER_LME, %eax
    wrmsr
    movl    %cr0, %eax
    andl    $~(CR0_CD | CR0_NW), %eax   /* make sure caches are on */
    orl     $(CR0_PG | CR0_PE), %eax
    movl    %eax, %cr0
    ret

/* ------------------------------------------------------------------------
 * 64-bit entry: reload data segments, call kmain(magic, mbi).
 * ---------------------------------------------------------------------- */
    .code64
long_entry:
    DATA_SEGMENTS64
    movl    $boot_stack_top, %esp       /* zero-extends into %rsp */
    movl    %esi, %edi                  /* arg 0: magic */
    movl    %ebp, %esi                  /* arg 1: multiboot info */
    xorl    %ebp, %ebp
    call    kmain
5:  cli
    hlt
    jmp     5b

/* ------------------------------------------------------------------------
 * Application processors.  smp.c copies [ap_tramp, ap_tramp_end) to
 * AP_TRAMP_ADDR and sends INIT, SIPI with vector AP_TRAMP_ADDR >> 12: the
 * AP starts there in real mode with CS = AP_TRAMP_ADDR >> 4.  It loads
 * the kernel's GDT, enters protected mode, then takes the BSP's path to
 * long mode with the BSP's page tables, and calls ap_main() on the stack
 * smp.c left in ap_stack_top.
 * ---------------------------------------------------------------------- */
    .section .text.boot, "ax"
    .code16
    .globl  ap_tramp, ap_tramp_end
ap_tramp:
    cli
    cld
    movw    %cs, %ax
    movw    %ax, %ds
    lgdtl   (ap_gdtr - ap_tramp)
    movl    %cr0, %eax
    orl     $CR0_PE, %eax
    movl    %eax, %cr0
    ljmpl   $GDT_CODE32, $ap_start32
    .balign 8
ap_gdtr:
    .word   gdt_end - gdt - 1
    .long   gdt
ap_tramp_end:

    .code32
ap_start32:
    DATA_SEGMENTS32
    movl    ap_stack_top, %esp          /* below 4 GiB (.bss) */
    call    long_mode_on
    ljmp    $GDT_CODE64, $ap_long

    .code64
ap_long:
    DATA_SEGMENTS64
    movq    ap_stack_top(%rip), %rsp
    xorl    %ebp, %ebp
    call    ap_main
7:  cli
    hlt
    jmp     7b

/* ------------------------------------------------------------------------
 * Interrupt entry points (64-bit IDT gates, installed by cpu.c).
 * ---------------------------------------------------------------------- */
    .text

    /* LAPIC timer (TSC-deadline): acknowledge and return. */
    .globl  timer_isr
timer_isr:
    pushq   %rax
    movl    $LAPIC_EOI_ADDR, %eax       /* zero-extended: no sign extension */
    movl    $0, (%rax)
    popq    %rax
    iretq

    /* Spurious LAPIC interrupt: no EOI required. */
    .globl  spurious_isr
spurious_isr:
    iretq

    /*
     * One 16-byte stub per vector.  Each pushes a dummy error code where
     * the CPU does not push one, then the vector number, and jumps to the
     * common handler.  cpu.c computes stub addresses as isr_stubs + 16*vec.
     */
    .balign 16
    .globl  isr_stubs
isr_stubs:
    .set    vec, 0
    .rept   256
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq   $0
    .endif
    pushq   $vec
    jmp     isr_common
    .set    vec, vec + 1
    .endr

    /*
     * Stack on entry: vector, error code, RIP, CS, RFLAGS, RSP, SS.
     * exception_handler() reports the fault and never returns.
     */
isr_common:
    movq    %rsp, %rdi
    andq    $-16, %rsp
    call    exception_handler
6:  cli
    hlt
    jmp     6b

/* ------------------------------------------------------------------------
 * GDT.  The Accessed bit is preset in every descriptor so the CPU never
 * writes to the table when loading a segment register.
 * ---------------------------------------------------------------------- */
    .section .rodata
    .balign 16
gdt:
    .quad   0                           /* null */
    .quad   0x00AF9B000000FFFF          /* 0x08: 64-bit code, DPL 0 */
    .quad   0x00CF93000000FFFF          /* 0x10: flat data, DPL 0 */
    .quad   0x00CF9B000000FFFF          /* 0x18: 32-bit flat code, DPL 0 */
gdt_end:
    .balign 8
gdt_ptr:
    .word   gdt_end - gdt - 1
    .long   gdt
    .long   0

/* ------------------------------------------------------------------------
 * Paging structures and boot stack.
 * ---------------------------------------------------------------------- */
    .section .bss
    .balign 4096
    .globl  pml4, pdpt
pml4:
    .skip   4096
pdpt:
    .skip   4096
    .balign 16
boot_stack:
    .skip   BOOT_STACK_SIZE
boot_stack_top:

    .section .pagetables, "aw", @nobits
    .balign 4096
    .globl  pd_pool
pd_pool:                                /* one page directory per GiB */
    .skip   4096 * MAP_LIMIT_GIB

    .section .note.GNU-stack, "", @progbits
