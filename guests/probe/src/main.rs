//! probe: a tiny x86_64 kernel that tests a VMM (tern) from the inside.
//!
//! Ring 0 only sets up paging, descriptor tables and the syscall/interrupt
//! entries (`boot.rs`, `ring0.rs`); everything else, including the scenarios,
//! runs in ring 3 with IOPL=3 (`rt/`, `scenarios/`). See README.md.

#![no_std]
#![no_main]
// There is no heap: a scenario failure carries its message inline (rare path).
#![allow(clippy::result_large_err)]

mod boot;
mod layout;
mod ring0;
// The runtime is the API for scenarios; not every helper has a user yet.
#[allow(dead_code)]
mod rt;
mod scenarios;

use core::fmt::Write;
use core::sync::atomic::Ordering;

use layout::{EXIT_BAD_BOOT, EXIT_PANIC, MILESTONE_FIRST_LINE, MILESTONE_RING3, VEC_SPURIOUS};
use rt::bootinfo::{self, BootError};
use rt::cmdline::Params;
use rt::phys::PhysAlloc;
use rt::{apic, clock, cpu, milestone, serial, smp};

/// Ring-3 entry of the bootstrap CPU (from `long_entry` in boot.rs).
#[no_mangle]
extern "C" fn bsp_user_main() -> ! {
    milestone(MILESTONE_RING3);
    cpu::build_idt();
    // Only the addresses of the asm stack symbols are taken.
    let (kstack_top, istack_top, estack_top) = (
        &raw const boot::boot_kstack_top as u64,
        &raw const boot::boot_istack_top as u64,
        &raw const boot::boot_estack_top as u64,
    );
    cpu::prepare_tss(0, kstack_top, istack_top, estack_top);
    apic::enable(VEC_SPURIOUS);
    smp::register_bsp();
    serial::init();

    let boot = match bootinfo::parse() {
        Ok(b) => b,
        Err(e) => {
            milestone(MILESTONE_FIRST_LINE);
            match e {
                BootError::BadPvhMagic(m) => {
                    println!("probe: hello FAIL bad hvm_start_info magic {m:#x}")
                }
                BootError::UnknownProtocol(p) => {
                    println!("probe: hello FAIL unknown boot protocol {p}")
                }
            }
            rt::exit(EXIT_BAD_BOOT);
        }
    };
    let clock = clock::init_bsp();
    let params = Params::new(boot.cmdline());
    let cpus = params.get("cpus").and_then(rt::cmdline::parse_u64);
    let topo = smp::discover(&boot, cpus);
    let phys = PhysAlloc::new(&boot);

    milestone(MILESTONE_FIRST_LINE);
    let mut ctx = scenarios::Ctx {
        boot: &boot,
        params,
        phys,
        topo,
        clock,
    };
    let status = scenarios::run_all(&mut ctx);
    if ctx.params.get("reenter") == Some("linux64") {
        println!("probe: done status={status} (first run)");
        if let Err(why) = rt::reenter::linux64(&boot, &mut ctx.phys) {
            println!("probe: reenter FAIL {why}");
        }
    }
    rt::exit(status)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    static PANICKING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
    if !PANICKING.swap(true, Ordering::SeqCst) {
        // Bypass the print lock: the panicking code may hold it.
        let _ = writeln!(serial::Serial, "\nprobe: PANIC {info}");
        let _ = writeln!(serial::Serial, "probe: done status={EXIT_PANIC}");
        rt::io::outb(layout::PORT_EXIT, EXIT_PANIC);
        rt::io::outb(layout::PORT_SLEEP_CONTROL, layout::SLEEP_S5);
        rt::io::outb(0x64, 0xfe);
    }
    rt::sys::halt_forever()
}

// The C memory functions LLVM may call (there is no libc). `rep movsb` /
// `rep stosb` are fast in ring 3; ring-0 code does not call these.

/// # Safety
/// Standard `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees valid, non-overlapping ranges.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
            options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dst is below src or disjoint.
        unsafe { memcpy(dst, src, n) };
    } else if n > 0 {
        // SAFETY: backward copy for dst overlapping above src; DF restored.
        unsafe {
            core::arch::asm!("std", "rep movsb", "cld", inout("rcx") n => _,
                inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _, options(nostack));
        }
    }
    dst
}

/// # Safety
/// Standard `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees a valid range.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
            options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges are readable.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Referenced by the precompiled `core` (built with unwinding) in non-LTO
/// builds; never called since panics abort.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
