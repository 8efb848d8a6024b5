//! `count`: a ring-3 counter that keeps counting and says so. For `probe.count_ms` (default
//! 3000) ms it increments a counter in a tight loop and, every `probe.count_tick_ms` (default
//! 100) ms, prints `probe: count tick=K value=V`. Tick numbers count lines, not time, so a VM
//! paused between two ticks resumes at the next number; the value only ever grows. The host
//! uses it to check that a paused VM really stops and continues where it was.

use super::{fail, Ctx, Fail, Report, Scenario};
use crate::rt::clock;

pub const SCENARIO: Scenario = Scenario { name: "count", run };

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let total_ns = ctx.param("count_ms", 3000)? * 1_000_000;
    let tick_ns = ctx.param("count_tick_ms", 100)? * 1_000_000;
    if tick_ns == 0 {
        fail!("probe.count_tick_ms must be positive");
    }
    let start = clock::now_ns();
    let mut next = start + tick_ns;
    let mut value: u64 = 0;
    let mut ticks: u64 = 0;
    loop {
        // Work between clock reads, so the counter runs mostly in ring 3 arithmetic.
        for _ in 0..1000 {
            value = core::hint::black_box(value + 1);
        }
        let now = clock::now_ns();
        if now >= next {
            ticks += 1;
            crate::println!("probe: count tick={ticks} value={value}");
            next = now + tick_ns;
        }
        if now - start >= total_ns {
            break;
        }
    }
    r.kv("ticks", ticks);
    r.kv("value", value);
    Ok(())
}
