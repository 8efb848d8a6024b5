//! The ring-0 side in Rust: the syscall dispatcher (a small "privileged
//! instruction server" for ring 3) and the exception reporter.
//!
//! Everything in this file runs in ring 0, which the development host emulates
//! instruction by instruction. Rules for this file:
//! - every function lives in `.text.ring0` (checked by `check-ring0.sh`);
//! - integer code only, no calls into `core` functions that are not inlined,
//!   no panicking paths, no loops over memory;
//! - interrupts stay disabled (syscalls arrive through interrupt gates, IF=0),
//!   except inside the `sti; hlt; cli` of `nr::HALT` (interrupts use IST1).

use core::arch::asm;
use core::sync::atomic::{AtomicU32, AtomicU64};

use crate::layout::{EXIT_EXCEPTION, MAX_CPUS, PORT_COM1, PORT_EXIT};

// ---------------------------------------------------------------------------
// Globals shared between the assembly, ring 0 and ring 3 (all identity mapped
// and user accessible).

/// Physical address of `hvm_start_info` (PVH) or `boot_params` (Linux).
#[no_mangle]
pub static BOOT_INFO_PADDR: AtomicU64 = AtomicU64::new(0);
/// `BOOT_PVH` or `BOOT_LINUX64`.
#[no_mangle]
pub static BOOT_PROTOCOL: AtomicU32 = AtomicU32::new(0);
/// Next CPU index handed to an AP arriving in long mode (BSP is 0).
#[no_mangle]
pub static AP_NEXT_INDEX: AtomicU32 = AtomicU32::new(1);
/// APs with an index at or above this park immediately (no stacks prepared).
#[no_mangle]
pub static AP_MAX_INDEX: AtomicU32 = AtomicU32::new(0);
/// Per-CPU ring-0 stack tops (also the IST1 interrupt stack).
#[no_mangle]
pub static AP_KSTACK_TOPS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per-CPU ring-3 stack tops.
#[no_mangle]
pub static AP_USTACK_TOPS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// LAPIC timer interrupts taken (any CPU).
#[no_mangle]
pub static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);
/// Interrupts on vectors without a dedicated handler.
#[no_mangle]
pub static UNEXPECTED_IRQS: AtomicU64 = AtomicU64::new(0);
/// Resume address for an expected #GP in ring 0 (rdmsr/wrmsr probing), or 0.
#[no_mangle]
pub static R0_FIXUP: AtomicU64 = AtomicU64::new(0);

extern "C" {
    fn r0_rdmsr_safe(msr: u32, out: *mut u64) -> u64;
    fn r0_wrmsr_safe(msr: u32, value: u64) -> u64;
}

/// Syscall numbers (rax) of `int $0x80`. Arguments in rdi, rsi, rdx, r10;
/// results in rax, rdx.
pub mod nr {
    /// `cli; hlt` forever.
    pub const HALT_FOREVER: u64 = 0;
    /// rdmsr a0 -> (0 ok / 1 #GP, value).
    pub const RDMSR: u64 = 1;
    /// wrmsr a0 = a1 -> 0 ok / 1 #GP.
    pub const WRMSR: u64 = 2;
    /// cpuid leaf a0, subleaf a1 -> [eax, ebx, ecx, edx] written to a2.
    pub const CPUID: u64 = 3;
    /// `sti; hlt; cli`: wait for the next interrupt. If a0 is not 0 it is the
    /// address of a u64 mailbox: the CPU only sleeps while that word is 0
    /// (checked with interrupts off, so a wakeup IPI cannot be missed).
    pub const HALT: u64 = 4;
    /// a1 times `out` of byte a2 to port a0.
    pub const PIO_WRITE_LOOP: u64 = 5;
    /// a1 times a 32-bit write of a2 to physical address a0.
    pub const MMIO_WRITE_LOOP: u64 = 6;
    /// Reload CR3 (flush the TLB after ring 3 edited the page tables).
    pub const FLUSH_TLB: u64 = 7;
    /// Read CR0 (a0=0), CR2, CR3, CR4 (a0=2..4).
    pub const READ_CR: u64 = 8;
    /// Set (a0=1) or clear (a0=0) RFLAGS.IF of the calling ring-3 code.
    pub const SET_IF: u64 = 9;
    /// Jump to the 64-bit entry a0 with RSI = a1, as a Linux 64-bit boot
    /// loader would (self-test of the `linux64` entry). Does not return.
    pub const REENTER: u64 = 10;
}

/// Two-register syscall result (rax, rdx).
#[repr(C)]
pub struct Ret2 {
    pub a: u64,
    pub b: u64,
}

const ENOSYS: u64 = u64::MAX;

#[no_mangle]
#[link_section = ".text.ring0"]
extern "C" fn ring0_syscall(
    a0: u64,
    a1: u64,
    a2: u64,
    _a3: u64,
    number: u64,
    user_rflags: *mut u64,
) -> Ret2 {
    let mut ret = Ret2 { a: 0, b: 0 };
    match number {
        nr::HALT_FOREVER => halt_forever(),
        nr::RDMSR => {
            let mut value = 0u64;
            // SAFETY: a #GP on an unknown MSR is caught by the fixup in
            // `ring0_exception`; `value` is a valid local.
            ret.a = unsafe { r0_rdmsr_safe(a0 as u32, &mut value) };
            ret.b = value;
        }
        // SAFETY: as above; the MSRs written are chosen by trusted ring-3 code.
        nr::WRMSR => ret.a = unsafe { r0_wrmsr_safe(a0 as u32, a1) },
        nr::CPUID => {
            let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
            // SAFETY: cpuid has no side effects; rbx is saved around it because
            // LLVM reserves it.
            unsafe {
                asm!(
                    "mov {t:r}, rbx",
                    "cpuid",
                    "xchg {t:r}, rbx",
                    t = out(reg) ebx,
                    inout("eax") a0 as u32 => eax,
                    inout("ecx") a1 as u32 => ecx,
                    out("edx") edx,
                    options(nostack, nomem, preserves_flags),
                );
                let out = a2 as *mut u32;
                out.write_volatile(eax);
                out.add(1).write_volatile(ebx);
                out.add(2).write_volatile(ecx);
                out.add(3).write_volatile(edx);
            }
        }
        nr::HALT => {
            // SAFETY: a0 is 0 or the address of a mailbox word given by ring 3.
            if a0 == 0 || unsafe { (a0 as *const u64).read_volatile() } == 0 {
                // SAFETY: interrupts use IST stacks, so enabling them here
                // cannot clobber this stack; `sti` delays interrupts by one
                // instruction, so a pending wakeup ends the `hlt`.
                unsafe { asm!("sti", "hlt", "cli", options(nostack, nomem)) }
            }
        }
        nr::PIO_WRITE_LOOP => {
            let mut n = a1;
            while n != 0 {
                // SAFETY: writes to a port chosen by the caller (test port).
                unsafe {
                    asm!("out dx, al", in("dx") a0 as u16, in("al") a2 as u8, options(nostack, nomem, preserves_flags))
                };
                n -= 1;
            }
        }
        nr::MMIO_WRITE_LOOP => {
            let mut n = a1;
            while n != 0 {
                // SAFETY: the address is identity mapped; the caller picks an
                // unclaimed MMIO address (writes are discarded by the VMM).
                unsafe { (a0 as *mut u32).write_volatile(a2 as u32) };
                n -= 1;
            }
        }
        // SAFETY: reloading CR3 with its own value only flushes the TLB.
        nr::FLUSH_TLB => unsafe {
            asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack, nomem, preserves_flags))
        },
        nr::READ_CR => {
            let v: u64;
            // SAFETY: reading control registers has no side effects.
            unsafe {
                match a0 {
                    0 => asm!("mov {}, cr0", out(reg) v, options(nostack, nomem, preserves_flags)),
                    2 => asm!("mov {}, cr2", out(reg) v, options(nostack, nomem, preserves_flags)),
                    3 => asm!("mov {}, cr3", out(reg) v, options(nostack, nomem, preserves_flags)),
                    4 => asm!("mov {}, cr4", out(reg) v, options(nostack, nomem, preserves_flags)),
                    _ => v = ENOSYS,
                }
            }
            ret.a = v;
        }
        nr::SET_IF => {
            // SAFETY: `syscall_entry` passes the address of the saved user
            // RFLAGS (restored into r11 before sysret).
            unsafe {
                let f = user_rflags.read();
                user_rflags.write(if a0 != 0 { f | 0x200 } else { f & !0x200 });
            }
        }
        nr::REENTER => {
            // SAFETY: a0 is the probe's own 64-bit entry; the identity map and
            // long mode it needs are in place. It resets everything it uses.
            unsafe { asm!("cli", "jmp {e}", e = in(reg) a0, in("rsi") a1, options(noreturn)) }
        }
        _ => ret.a = ENOSYS,
    }
    ret
}

/// Register frame built by `exc_common` (lowest address first).
#[repr(C)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// CPU exception handler.
/// - #UD on an `int $0x80` in ring 3 (the development host's KVM turns
///   `int n` in ring 3 into #UD): perform the syscall and skip the instruction.
/// - #GP in ring 0 with `R0_FIXUP` set (MSR probing): resume at the fixup.
/// - anything else is fatal: report on COM1 and exit with status 3.
#[no_mangle]
#[link_section = ".text.ring0"]
extern "C" fn ring0_exception(frame: &mut TrapFrame) {
    if frame.vector == 6 && frame.cs & 3 == 3 {
        // SAFETY: rip is the ring-3 instruction that faulted, in mapped memory.
        let insn = unsafe { (frame.rip as *const u16).read_unaligned() };
        if insn == 0x80cd {
            let r = ring0_syscall(
                frame.rdi,
                frame.rsi,
                frame.rdx,
                frame.r10,
                frame.rax,
                &mut frame.rflags,
            );
            frame.rax = r.a;
            frame.rdx = r.b;
            frame.rip += 2;
            return;
        }
    }
    let fixup = R0_FIXUP.load(core::sync::atomic::Ordering::Relaxed);
    if frame.vector == 13 && frame.cs & 3 == 0 && fixup != 0 {
        frame.rip = fixup;
        return;
    }
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nostack, nomem, preserves_flags)) };
    r0_puts(b"\nprobe: PANIC cpu exception vector=");
    r0_hex(frame.vector);
    r0_puts(b" error=");
    r0_hex(frame.error);
    r0_puts(b" rip=");
    r0_hex(frame.rip);
    r0_puts(b" cs=");
    r0_hex(frame.cs);
    r0_puts(b" rsp=");
    r0_hex(frame.rsp);
    r0_puts(b" cr2=");
    r0_hex(cr2);
    r0_puts(b" rax=");
    r0_hex(frame.rax);
    r0_puts(b"\nprobe: done status=3\n");
    r0_outb(PORT_EXIT, EXIT_EXCEPTION);
    r0_outb(0x64, 0xfe);
    halt_forever();
}

#[link_section = ".text.ring0"]
fn halt_forever() -> ! {
    loop {
        // SAFETY: stops this CPU; nothing else to do.
        unsafe { asm!("cli", "hlt", options(nostack, nomem)) };
    }
}

#[inline(always)]
fn r0_outb(port: u16, value: u8) {
    // SAFETY: port I/O to the fixed devices of the hardware contract.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem, preserves_flags))
    };
}

#[inline(always)]
fn r0_inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O to the fixed devices of the hardware contract.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nostack, nomem, preserves_flags))
    };
    v
}

#[link_section = ".text.ring0"]
fn r0_putc(c: u8) {
    let mut spins = 0u32;
    while r0_inb(PORT_COM1 + 5) & 0x20 == 0 && spins < 10_000 {
        spins += 1;
    }
    r0_outb(PORT_COM1, c);
}

#[link_section = ".text.ring0"]
fn r0_puts(s: &[u8]) {
    let mut i = 0;
    while i < s.len() {
        r0_putc(s[i]);
        i += 1;
    }
}

#[link_section = ".text.ring0"]
fn r0_hex(v: u64) {
    r0_putc(b'0');
    r0_putc(b'x');
    let mut shift = 64;
    while shift != 0 {
        shift -= 4;
        let d = ((v >> shift) & 0xf) as u8;
        r0_putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
    }
}
