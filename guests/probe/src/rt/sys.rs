//! Ring-3 wrappers for the ring-0 syscalls (see `ring0::nr`).

use core::arch::asm;

pub use crate::ring0::nr;

/// Raw syscall with up to four arguments; returns (rax, rdx).
#[inline(always)]
pub fn syscall(number: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> (u64, u64) {
    let r0: u64;
    let r1: u64;
    // SAFETY: `int80_entry` (or, on the development host, the #UD path in
    // `ring0_exception`) preserves everything but the C caller-saved registers
    // (declared via clobber_abi); it runs on the TSS.RSP0 stack, not ours.
    unsafe {
        asm!(
            "int 0x80",
            inlateout("rax") number => r0,
            inlateout("rdi") a0 => _,
            inlateout("rsi") a1 => _,
            inlateout("rdx") a2 => r1,
            inlateout("r10") a3 => _,
            clobber_abi("C"),
        );
    }
    (r0, r1)
}

/// Stop this CPU for good (`cli; hlt`).
pub fn halt_forever() -> ! {
    syscall(nr::HALT_FOREVER, 0, 0, 0, 0);
    // Not reached; keep the compiler and any broken ring 0 happy.
    loop {
        core::hint::spin_loop();
    }
}

/// Sleep until the next interrupt on this CPU.
pub fn halt() {
    syscall(nr::HALT, 0, 0, 0, 0);
}

pub fn rdmsr(msr: u32) -> Option<u64> {
    let (status, value) = syscall(nr::RDMSR, u64::from(msr), 0, 0, 0);
    (status == 0).then_some(value)
}

pub fn wrmsr(msr: u32, value: u64) -> bool {
    syscall(nr::WRMSR, u64::from(msr), value, 0, 0).0 == 0
}

/// CPUID executed in ring 0 (for comparison with ring 3).
pub fn cpuid_ring0(leaf: u32, subleaf: u32) -> [u32; 4] {
    let mut out = [0u32; 4];
    syscall(
        nr::CPUID,
        u64::from(leaf),
        u64::from(subleaf),
        out.as_mut_ptr() as u64,
        0,
    );
    out
}

pub fn read_cr(n: u64) -> u64 {
    syscall(nr::READ_CR, n, 0, 0, 0).0
}

pub fn flush_tlb() {
    syscall(nr::FLUSH_TLB, 0, 0, 0, 0);
}

/// Enable or disable interrupts for the calling ring-3 code.
pub fn set_interrupts(on: bool) {
    syscall(nr::SET_IF, u64::from(on), 0, 0, 0);
}
