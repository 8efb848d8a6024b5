//! `timer`: LAPIC timer in periodic mode at `probe.timer_hz` (default 1000) for
//! `probe.timer_ms` (default 200) of the reference clock; the ring-0 handler
//! counts ticks. Fails when the measured rate is off by more than 10%.

use core::sync::atomic::Ordering;

use super::{fail, Ctx, Fail, Report, Scenario};
use crate::layout::VEC_TIMER;
use crate::ring0::TIMER_TICKS;
use crate::rt::{apic, clock, sys};

pub const SCENARIO: Scenario = Scenario { name: "timer", run };

/// LAPIC timer input frequency (after "divide by 1"), measured against the
/// reference clock over `ns` nanoseconds.
fn calibrate(ns: u64) -> u64 {
    apic::write(apic::REG_LVT_TIMER, apic::LVT_MASKED | u32::from(VEC_TIMER));
    apic::write(apic::REG_TIMER_DIV, apic::DIV_BY_1);
    apic::write(apic::REG_TIMER_INIT, u32::MAX);
    let t0 = clock::now_ns();
    let c0 = apic::read(apic::REG_TIMER_CUR);
    clock::delay_ns(ns);
    let c1 = apic::read(apic::REG_TIMER_CUR);
    let t1 = clock::now_ns();
    apic::write(apic::REG_TIMER_INIT, 0);
    let counts = u64::from(c0.saturating_sub(c1));
    counts * 1_000_000_000 / (t1 - t0).max(1)
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let hz = ctx.param("timer_hz", 1000)?;
    let ms = ctx.param("timer_ms", 200)?;
    if hz == 0 || ms == 0 {
        fail!("probe.timer_hz and probe.timer_ms must be positive");
    }
    r.kv("hz", hz);
    let lapic_hz = calibrate(20_000_000);
    r.kv("lapic_hz", lapic_hz);
    let initial = lapic_hz / hz;
    if initial == 0 || initial > u64::from(u32::MAX) {
        fail!("timer_hz {hz} out of range for a {lapic_hz} Hz LAPIC timer");
    }

    TIMER_TICKS.store(0, Ordering::SeqCst);
    sys::set_interrupts(true);
    apic::write(
        apic::REG_LVT_TIMER,
        apic::LVT_PERIODIC | u32::from(VEC_TIMER),
    );
    apic::write(apic::REG_TIMER_INIT, initial as u32);
    let t0 = clock::now_ns();
    let ticks0 = TIMER_TICKS.load(Ordering::SeqCst);
    // Sleep between ticks (`hlt`) rather than spin: a halted vCPU is
    // scheduled promptly when its timer fires even on a busy host, where a
    // spinning one would be preempted and its ticks coalesced.
    while clock::now_ns().wrapping_sub(t0) < ms * 1_000_000 {
        sys::halt();
    }
    let ticks = TIMER_TICKS.load(Ordering::SeqCst) - ticks0;
    let t1 = clock::now_ns();
    apic::write(apic::REG_LVT_TIMER, apic::LVT_MASKED | u32::from(VEC_TIMER));
    apic::write(apic::REG_TIMER_INIT, 0);
    sys::set_interrupts(false);

    let elapsed = (t1 - t0).max(1);
    // Rounded to the nearest Hz; tenths are added for short runs.
    let milli_hz = u128::from(ticks) * 1_000_000_000_000 / u128::from(elapsed);
    let measured = ((milli_hz + 500) / 1000) as u64;
    r.kv("measured_hz", measured);
    r.kv("ticks", ticks);
    r.kv("elapsed_us", elapsed / 1000);
    let err = measured.abs_diff(hz);
    if err * 10 > hz {
        fail!("measured {measured} Hz, expected {hz} Hz (+-10%)");
    }
    Ok(())
}
