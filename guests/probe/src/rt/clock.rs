//! Reference clock: KVM paravirtual clock (kvmclock), read from ring 3 with
//! `rdtsc`; falls back to the TSC with a CPUID-reported frequency, and then to
//! the TSC calibrated against the i8254 PIT (e.g. QEMU TCG, which has neither).
//!
//! kvmclock gives nanoseconds as
//! `system_time + (((tsc - tsc_timestamp) << / >> shift) * mul) >> 32`.

use core::sync::atomic::{compiler_fence, AtomicU64, AtomicU8, Ordering};

use super::io::{inb, outb, rdtsc};
use super::{cpuid, sys, RacyCell};
use crate::layout::MAX_CPUS;

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;

#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

const PVCLOCK_EMPTY: PvClock = PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

/// One time-info area per CPU (KVM updates it; page-crossing is impossible at align 32).
static PVCLOCK: RacyCell<[PvClock; MAX_CPUS]> = RacyCell::new([PVCLOCK_EMPTY; MAX_CPUS]);

const KIND_NONE: u8 = 0;
const KIND_KVMCLOCK: u8 = 1;
const KIND_TSC: u8 = 2;
static KIND: AtomicU8 = AtomicU8::new(KIND_NONE);
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    None,
    KvmClock,
    Tsc,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::KvmClock => "kvmclock",
            Source::Tsc => "tsc",
        }
    }
}

pub fn source() -> Source {
    match KIND.load(Ordering::Relaxed) {
        KIND_KVMCLOCK => Source::KvmClock,
        KIND_TSC => Source::Tsc,
        _ => Source::None,
    }
}

fn area(cpu: usize) -> *const PvClock {
    // SAFETY: in bounds (callers pass cpu < MAX_CPUS); only a pointer is formed.
    unsafe { (*PVCLOCK.as_ptr()).as_ptr().add(cpu) }
}

/// Register this CPU's kvmclock area. Returns whether kvmclock works here.
pub fn register_cpu(cpu: usize) -> bool {
    let paddr = area(cpu) as u64;
    let ok = sys::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, paddr | 1)
        || sys::wrmsr(MSR_KVM_SYSTEM_TIME, paddr | 1);
    if !ok {
        return false;
    }
    // SAFETY: the area is a valid PvClock that KVM now updates.
    let (version, mul) = unsafe {
        let p = area(cpu);
        (
            (&raw const (*p).version).read_volatile(),
            (&raw const (*p).tsc_to_system_mul).read_volatile(),
        )
    };
    version != 0 && mul != 0
}

/// Pick the reference clock (on the BSP, CPU 0).
pub fn init_bsp() -> Source {
    if register_cpu(0) {
        KIND.store(KIND_KVMCLOCK, Ordering::Relaxed);
        return Source::KvmClock;
    }
    if let Some(khz) = cpuid::tsc_khz().or_else(pit_tsc_khz) {
        TSC_KHZ.store(khz, Ordering::Relaxed);
        KIND.store(KIND_TSC, Ordering::Relaxed);
        return Source::Tsc;
    }
    Source::None
}

/// TSC frequency measured over ~10 ms of PIT channel 2 (mode 0), if a PIT
/// answers at the legacy ports.
fn pit_tsc_khz() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const COUNT: u16 = 11_932; // ~10 ms
    let gate = inb(0x61);
    if gate == 0xff {
        return None;
    }
    outb(0x61, (gate & !0x02) | 0x01); // channel 2 gate on, speaker off
    outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(0x42, COUNT as u8);
    outb(0x42, (COUNT >> 8) as u8);
    let t0 = rdtsc();
    let mut polls = 0u32;
    while inb(0x61) & 0x20 == 0 {
        polls += 1;
        if polls > 10_000_000 {
            outb(0x61, gate);
            return None;
        }
    }
    let ticks = rdtsc() - t0;
    outb(0x61, gate);
    let khz = ticks * PIT_HZ / u64::from(COUNT) / 1000;
    (khz > 0).then_some(khz)
}

fn kvmclock_ns(cpu: usize) -> u64 {
    let p = area(cpu);
    loop {
        // SAFETY: `p` points into PVCLOCK; fields are read volatile because
        // the hypervisor updates them concurrently (version protocol).
        unsafe {
            let v1 = (&raw const (*p).version).read_volatile();
            compiler_fence(Ordering::Acquire);
            let tsc_ts = (&raw const (*p).tsc_timestamp).read_volatile();
            let sys_time = (&raw const (*p).system_time).read_volatile();
            let mul = (&raw const (*p).tsc_to_system_mul).read_volatile();
            let shift = (&raw const (*p).tsc_shift).read_volatile();
            let tsc = rdtsc();
            compiler_fence(Ordering::Acquire);
            let v2 = (&raw const (*p).version).read_volatile();
            if v1 & 1 != 0 || v1 != v2 {
                core::hint::spin_loop();
                continue;
            }
            let mut delta = tsc.wrapping_sub(tsc_ts);
            if shift >= 0 {
                delta <<= shift as u32;
            } else {
                delta >>= (-shift) as u32;
            }
            return sys_time.wrapping_add(((u128::from(delta) * u128::from(mul)) >> 32) as u64);
        }
    }
}

/// Nanoseconds of the reference clock (0 if there is none).
///
/// Uses CPU 0's kvmclock area: valid on every CPU when KVM reports a stable
/// TSC (flag bit 0), which both tern and QEMU do on this host.
pub fn now_ns() -> u64 {
    match KIND.load(Ordering::Relaxed) {
        KIND_KVMCLOCK => kvmclock_ns(0),
        KIND_TSC => {
            let khz = TSC_KHZ.load(Ordering::Relaxed).max(1);
            ((u128::from(rdtsc()) * 1_000_000) / u128::from(khz)) as u64
        }
        _ => 0,
    }
}

/// kvmclock flags of CPU 0 (bit 0: TSC stable).
pub fn kvmclock_flags() -> u8 {
    // SAFETY: reading a field of the registered area.
    unsafe { (&raw const (*area(0)).flags).read_volatile() }
}

/// Busy-wait for `ns` nanoseconds of the reference clock.
pub fn delay_ns(ns: u64) {
    let start = now_ns();
    while now_ns().wrapping_sub(start) < ns {
        core::hint::spin_loop();
    }
}
