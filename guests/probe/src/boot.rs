//! Ring-0 assembly: boot entries (PVH 32-bit, Linux 64-bit), the AP real-mode
//! trampoline, page tables, GDT, the syscall entry and the interrupt stubs.
//!
//! Ring 0 is emulated instruction by instruction on the development host (~1.2 µs
//! each), so everything here is as short as possible: no loops over memory, no
//! SSE. Page tables and GDT are assembled statically; the IDT and TSS contents
//! are computed by ring 3 (`rt::cpu`); `cpu_setup` only loads them.

use crate::layout::{
    BOOT_LINUX64, BOOT_PVH, GDT_SLOTS, KERNEL_CS, KERNEL_DS, MILESTONE_ENTRY, MILESTONE_LONG_MODE,
    PORT_DEBUG, TSS_SEL0, TSS_SIZE, USER_CS, USER_DS,
};

core::arch::global_asm!(
    r#"
/* ------------------------------------------------------------------ PVH note */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                      /* namesz: "Xen\0" */
    .long 8                      /* descsz */
    .long 18                     /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_entry
    .balign 4

/* ------------------------------------------------------------ page tables */
/* Identity map of the first 4 GiB with 2 MiB pages, user accessible (ring 3
   does all the work; there is nothing to protect). The last GiB (LAPIC, IOAPIC,
   MMIO) is mapped uncached. */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd0 + 0x7
    .quad pd0 + 0x1007
    .quad pd0 + 0x2007
    .quad pd0 + 0x3007
    .fill 508, 8, 0
pd0:
    .set __pg_i, 0
    .rept 1536
    .quad (__pg_i << 21) | 0x87
    .set __pg_i, __pg_i + 1
    .endr
    .rept 512
    .quad (__pg_i << 21) | 0x9f
    .set __pg_i, __pg_i + 1
    .endr

/* -------------------------------------------------------------------- GDT */
    .section .data.gdt, "aw"
    .balign 16
    .globl gdt
gdt:
    .quad 0                      /* 0x00 null */
    .quad 0x00af9b000000ffff     /* 0x08 kernel code, 64-bit */
    .quad 0x00cf93000000ffff     /* 0x10 kernel data */
    .quad 0x00cff3000000ffff     /* 0x18 user data (DPL 3) */
    .quad 0x00affb000000ffff     /* 0x20 user code, 64-bit (DPL 3) */
    .quad 0                      /* 0x28 unused */
    .fill {gdt_slots} - 6, 8, 0  /* 0x30.. TSS descriptors, written by cpu_setup */
gdt_end:
    .balign 8
    .globl gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 8
idt_ptr:                         /* the IDT itself is filled by ring 3 */
    .word 256 * 16 - 1
    .quad IDT

/* ----------------------------------------------------------------- stacks */
    .section .stack.boot, "aw", @nobits
    .balign 4096
    .globl boot_kstack_top, boot_istack_top, boot_estack_top, boot_ustack_top
boot_kstack:                     /* BSP ring-0 stack (boot, then TSS.RSP0) */
    .skip 16384
boot_kstack_top:
boot_istack:                     /* BSP interrupt stack (TSS.IST1) */
    .skip 8192
boot_istack_top:
boot_estack:                     /* BSP exception stack (TSS.IST2) */
    .skip 8192
boot_estack_top:
boot_ustack:
    .skip 65536
boot_ustack_top:

/* ------------------------------------------------------------ PVH entry */
    .section .text.entry, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    movb ${m_entry}, %al
    movw ${port_debug}, %dx
    outb %al, %dx
    cli
    movl %ebx, %edi              /* hvm_start_info (physical) */
    lgdtl gdt_ptr
    movl ${kds}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $boot_kstack_top, %esp  /* the loader's ESP is not valid */
    movl %cr4, %eax
    orl $0x20, %eax              /* CR4.PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx       /* EFER */
    rdmsr
    orl $0x100, %eax             /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax        /* CR0.PG | CR0.PE */
    movl %eax, %cr0
    movl ${boot_pvh}, %esi
    ljmpl ${kcs}, $long_entry

/* ------------------------------------------------ Linux 64-bit entry (e_entry) */
    .code64
    .globl linux64_entry
linux64_entry:
    movb ${m_entry}, %al
    movw ${port_debug}, %dx
    outb %al, %dx
    cli
    movq %rsi, %rdi              /* boot_params (zero page, physical) */
    movl ${boot_linux64}, %esi
    movq $boot_kstack_top, %rsp  /* do not rely on the loader's stack */
    lgdt gdt_ptr(%rip)
    movq $pml4, %rax             /* our identity map also covers this code */
    movq %rax, %cr3
    pushq ${kcs}
    pushq $long_entry
    lretq

/* ------------------------------------- common BSP long-mode path (ring 0) */
long_entry:
    movl ${kds}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movq $boot_kstack_top, %rsp
    movb ${m_long}, %al
    movw ${port_debug}, %dx
    outb %al, %dx
    movq %rdi, BOOT_INFO_PADDR(%rip)
    movl %esi, BOOT_PROTOCOL(%rip)
    movb $0xff, %al              /* mask both legacy PICs */
    outb %al, $0x21
    outb %al, $0xa1
    xorl %ebx, %ebx              /* CPU index 0 */
    call cpu_setup
    movq $boot_ustack_top, %rax
    pushq ${uds}                 /* SS */
    pushq %rax                   /* RSP */
    pushq $0x3002                /* RFLAGS: IOPL=3, IF=0 */
    pushq ${ucs}                 /* CS */
    pushq $bsp_user_main         /* RIP */
    iretq

/* Per-CPU setup (BSP and APs), rbx = CPU index: control registers, IDT, and
   the TSS descriptor + ltr for TSS_ARRAY[rbx]. Runs once per CPU before its
   first drop to ring 3 (ring 3 needs the TSS for syscalls, interrupts and,
   on the development host, port I/O). Clobbers rax, rcx, rdx, rsi. */
cpu_setup:
    movq %cr0, %rax
    andq $-13, %rax              /* clear EM (bit 2) and TS (bit 3) */
    orq $0x22, %rax              /* MP | NE: SSE usable in ring 3 */
    movq %rax, %cr0
    movq %cr4, %rax
    orq $0x620, %rax             /* PAE | OSFXSR | OSXMMEXCPT */
    movq %rax, %cr4
    lidt idt_ptr(%rip)
    imulq ${tss_size}, %rbx, %rax
    leaq TSS_ARRAY(%rip), %rsi
    addq %rsi, %rax              /* rax = TSS base */
    movq %rax, %rcx              /* descriptor low: limit, base, type 0x89 */
    andl $0xffffff, %ecx
    shlq $16, %rcx
    movabsq $0x0000890000000000, %rdx
    orq %rdx, %rcx
    imull ${tss_size}, %ebx, %edx /* limit: up to the end of the shared I/O bitmap */
    negl %edx
    addl ${tss_limit0}, %edx
    orq %rdx, %rcx
    movq %rax, %rdx
    shrq $24, %rdx
    andl $0xff, %edx
    shlq $56, %rdx
    orq %rdx, %rcx
    movq %rbx, %rsi
    shlq $4, %rsi                /* 16 bytes per TSS descriptor */
    leaq gdt + {tss_sel0}(%rip), %rdx
    movq %rcx, (%rdx,%rsi)
    shrq $32, %rax
    movq %rax, 8(%rdx,%rsi)
    addl ${tss_sel0}, %esi
    ltr %si
    ret

/* ----------------------------------------------- AP real-mode trampoline */
/* Copied by ring 3 to a page below 1 MiB; position independent (CS-relative). */
    .code16
    .globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_tramp_gdtr - ap_tramp_start
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmpl ${kcs}, $ap_long_entry
    .balign 8
ap_tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

    .code64
ap_long_entry:
    movl ${kds}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movl $1, %eax
    lock xaddl %eax, AP_NEXT_INDEX(%rip)
    cmpl AP_MAX_INDEX(%rip), %eax
    jae ap_park
    movl %eax, %ebx
    movq AP_KSTACK_TOPS(,%rbx,8), %rsp
    call cpu_setup               /* rbx = CPU index */
    movq AP_USTACK_TOPS(,%rbx,8), %rax
    movl %ebx, %edi              /* ap_user_main(cpu_index) */
    pushq ${uds}
    pushq %rax
    pushq $0x3002
    pushq ${ucs}
    pushq $ap_user_main
    iretq
ap_park:                         /* more CPUs than prepared for: stay halted */
    cli
    hlt
    jmp ap_park

/* ------------------------------------------------------ syscall entry */
/* `int $0x80` from ring 3 (DPL-3 interrupt gate, no IST: runs on TSS.RSP0 with
   IF=0). rax = number, rdi/rsi/rdx/r10 = args; returns rax, rdx; the C
   caller-saved registers are clobbered. On the development host's KVM,
   `int $0x80` in ring 3 raises #UD instead; `ring0_exception` recognises that
   and performs the same call. (`syscall` cannot be used there at all: its
   handler runs without ring-0 privileges. See README.) */
    .balign 16
    .globl int80_entry
int80_entry:
    pushq %rbp                   /* the CPU aligned RSP to 16 before the frame */
    movq %rsp, %rbp
    movq %r10, %rcx
    movq %rax, %r8
    leaq 24(%rbp), %r9           /* &frame.rflags (SET_IF edits it) */
    cld
    call ring0_syscall
    popq %rbp
    iretq

/* ------------------------------------------------------ exception stubs */
    .macro EXC_STUB vec, has_err
    .balign 16
exc_stub_\vec:
    .if \has_err == 0
    pushq $0
    .endif
    pushq $\vec
    jmp exc_common
    .endm

    EXC_STUB 0, 0
    EXC_STUB 1, 0
    EXC_STUB 2, 0
    EXC_STUB 3, 0
    EXC_STUB 4, 0
    EXC_STUB 5, 0
    EXC_STUB 6, 0
    EXC_STUB 7, 0
    EXC_STUB 8, 1
    EXC_STUB 9, 0
    EXC_STUB 10, 1
    EXC_STUB 11, 1
    EXC_STUB 12, 1
    EXC_STUB 13, 1
    EXC_STUB 14, 1
    EXC_STUB 15, 0
    EXC_STUB 16, 0
    EXC_STUB 17, 1
    EXC_STUB 18, 0
    EXC_STUB 19, 0
    EXC_STUB 20, 0
    EXC_STUB 21, 1
    EXC_STUB 22, 0
    EXC_STUB 23, 0
    EXC_STUB 24, 0
    EXC_STUB 25, 0
    EXC_STUB 26, 0
    EXC_STUB 27, 0
    EXC_STUB 28, 0
    EXC_STUB 29, 1
    EXC_STUB 30, 1
    EXC_STUB 31, 0

exc_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call ring0_exception
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

/* ------------------------------------------------------ interrupt stubs */
    .balign 16
    .globl irq_timer
irq_timer:
    pushq %rax
    incq TIMER_TICKS(%rip)
    movl $0xfee000b0, %eax       /* LAPIC EOI */
    movl $0, (%rax)
    popq %rax
    iretq

    .balign 16
    .globl irq_wake
irq_wake:
    pushq %rax
    movl $0xfee000b0, %eax
    movl $0, (%rax)
    popq %rax
    iretq

    .balign 16
    .globl irq_other
irq_other:
    pushq %rax
    incq UNEXPECTED_IRQS(%rip)
    movl $0xfee000b0, %eax
    movl $0, (%rax)
    popq %rax
    iretq

    .balign 16
    .globl irq_spurious
irq_spurious:
    iretq

/* ------------------------------------------------ MSR access with #GP fixup */
    .globl r0_rdmsr_safe
r0_rdmsr_safe:                   /* (msr, *mut u64) -> 0 ok, 1 faulted */
    leaq 1f(%rip), %rax
    movq %rax, R0_FIXUP(%rip)
    movl %edi, %ecx
    rdmsr
    movq $0, R0_FIXUP(%rip)
    shlq $32, %rdx
    movl %eax, %eax
    orq %rdx, %rax
    movq %rax, (%rsi)
    xorl %eax, %eax
    ret
1:
    movq $0, R0_FIXUP(%rip)
    movl $1, %eax
    ret

    .globl r0_wrmsr_safe
r0_wrmsr_safe:                   /* (msr, value) -> 0 ok, 1 faulted */
    leaq 2f(%rip), %rax
    movq %rax, R0_FIXUP(%rip)
    movl %edi, %ecx
    movl %esi, %eax
    movq %rsi, %rdx
    shrq $32, %rdx
    wrmsr
    movq $0, R0_FIXUP(%rip)
    xorl %eax, %eax
    ret
2:
    movq $0, R0_FIXUP(%rip)
    movl $1, %eax
    ret

/* ------------------------------------------------- exception stub table */
    .section .rodata.exc_stub_table, "a"
    .balign 8
    .globl exc_stub_table
exc_stub_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_stub_\v
    .endr

    .text
"#,
    gdt_slots = const GDT_SLOTS,
    tss_size = const TSS_SIZE,
    tss_sel0 = const TSS_SEL0,
    tss_limit0 = const crate::rt::cpu::TSS0_LIMIT,
    m_entry = const MILESTONE_ENTRY,
    m_long = const MILESTONE_LONG_MODE,
    port_debug = const PORT_DEBUG,
    kcs = const KERNEL_CS,
    kds = const KERNEL_DS,
    ucs = const USER_CS,
    uds = const USER_DS,
    boot_pvh = const BOOT_PVH,
    boot_linux64 = const BOOT_LINUX64,
    options(att_syntax)
);

extern "C" {
    /// Start/end of the AP trampoline (copied below 1 MiB before INIT/SIPI).
    pub static ap_tramp_start: u8;
    pub static ap_tramp_end: u8;
    /// Top of the BSP's ring-0 stack (boot, then TSS.RSP0).
    pub static boot_kstack_top: u8;
    /// Top of the BSP's interrupt stack (TSS.IST1).
    pub static boot_istack_top: u8;
    /// Top of the BSP's exception stack (TSS.IST2).
    pub static boot_estack_top: u8;
    /// Addresses of the 32 exception stubs.
    pub static exc_stub_table: [u64; 32];
    pub fn irq_timer();
    pub fn irq_wake();
    pub fn irq_other();
    pub fn irq_spurious();
    pub fn int80_entry();
}
