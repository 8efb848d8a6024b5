//! Local APIC in xAPIC (MMIO) mode, driven from ring 3: every access is an
//! MMIO exit handled by the VMM's (in-kernel) LAPIC.

use super::io::{mmio_read32, mmio_write32};
use crate::layout::LAPIC_BASE;

pub const REG_ID: u32 = 0x020;
pub const REG_VERSION: u32 = 0x030;
pub const REG_EOI: u32 = 0x0b0;
pub const REG_SVR: u32 = 0x0f0;
pub const REG_ESR: u32 = 0x280;
pub const REG_ICR_LO: u32 = 0x300;
pub const REG_ICR_HI: u32 = 0x310;
pub const REG_LVT_TIMER: u32 = 0x320;
pub const REG_TIMER_INIT: u32 = 0x380;
pub const REG_TIMER_CUR: u32 = 0x390;
pub const REG_TIMER_DIV: u32 = 0x3e0;

pub const LVT_MASKED: u32 = 1 << 16;
pub const LVT_PERIODIC: u32 = 1 << 17;
/// Divide configuration value for "divide by 1".
pub const DIV_BY_1: u32 = 0xb;

const ICR_PENDING: u32 = 1 << 12;

pub fn read(reg: u32) -> u32 {
    // SAFETY: LAPIC registers are identity mapped at LAPIC_BASE.
    unsafe { mmio_read32(LAPIC_BASE + u64::from(reg)) }
}

pub fn write(reg: u32, value: u32) {
    // SAFETY: LAPIC registers are identity mapped at LAPIC_BASE.
    unsafe { mmio_write32(LAPIC_BASE + u64::from(reg), value) }
}

/// This CPU's APIC ID (xAPIC: bits 31:24 of the ID register).
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Software-enable the LAPIC with the spurious vector.
pub fn enable(spurious_vector: u8) {
    write(REG_SVR, 0x100 | u32::from(spurious_vector));
}

fn wait_icr_idle() {
    let mut spins = 0;
    while read(REG_ICR_LO) & ICR_PENDING != 0 && spins < 1000 {
        spins += 1;
        core::hint::spin_loop();
    }
}

/// Send an IPI: `icr_lo` holds vector, delivery mode and shorthand.
pub fn send_ipi(dest_apic_id: u32, icr_lo: u32) {
    wait_icr_idle();
    write(REG_ICR_HI, dest_apic_id << 24);
    write(REG_ICR_LO, icr_lo);
    wait_icr_idle();
}

/// INIT to all other CPUs (shorthand "all excluding self", level assert).
pub const ICR_INIT_ALL_BUT_SELF: u32 = 0x000c_4500;
/// STARTUP to all other CPUs; OR in the trampoline page number.
pub const ICR_SIPI_ALL_BUT_SELF: u32 = 0x000c_4600;
/// Fixed-delivery interrupt to one CPU; OR in the vector.
pub const ICR_FIXED: u32 = 0x0000_4000;

pub fn eoi() {
    write(REG_EOI, 0);
}
