//! `smp`: bring up every AP with INIT-SIPI-SIPI; each AP enters long mode,
//! drops to ring 3 and reports its APIC ID; then every AP runs a small ring-3
//! job posted through its mailbox (woken by an IPI).

use core::sync::atomic::{AtomicU64, Ordering};

use super::{fail, Ctx, Fail, Report, Scenario};
use crate::layout::MAX_CPUS;
use crate::rt::{clock, smp};

pub const SCENARIO: Scenario = Scenario { name: "smp", run };

/// Result slot of the per-AP job.
static JOB_RESULT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// The job's value for a CPU index: a short integer loop run in ring 3.
fn job_value(index: usize) -> u64 {
    let mut x = index as u64 ^ 0x9e37_79b9_7f4a_7c15;
    for _ in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

fn job(index: usize) {
    JOB_RESULT[index].store(job_value(index), Ordering::Release);
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let expected = ctx.topo.count;
    let timeout_ms = ctx.param("smp_timeout_ms", 5000)?;
    let up = smp::start_aps(ctx.boot, &mut ctx.phys, expected, timeout_ms * 1_000_000);
    let online = 1 + smp::online_aps();
    r.kv("cpus", online);
    let mut ids = [u32::MAX; MAX_CPUS];
    for (i, id) in ids.iter_mut().enumerate().take(online) {
        *id = smp::apic_id_of(i).unwrap_or(u32::MAX);
    }
    ids[..online].sort_unstable();
    r.list("apic_ids", ids[..online].iter().map(|&id| u64::from(id)));
    let up = match up {
        Ok(up) => up,
        Err(why) => fail!(
            "{why} (expected {expected} cpus from {})",
            ctx.topo.source.name()
        ),
    };
    r.kv("boot_us", up.elapsed_ns / 1000);
    if up.trampoline != 0 {
        r.hex("trampoline", up.trampoline);
    }

    // One ring-3 job per AP through the mailbox + wakeup IPI.
    let t0 = clock::now_ns();
    let mut done_before = [0u64; MAX_CPUS];
    for (i, slot) in done_before.iter_mut().enumerate().take(online).skip(1) {
        *slot = smp::jobs_done(i);
        JOB_RESULT[i].store(0, Ordering::Release);
        if let Err(why) = smp::run_on(i, job) {
            fail!("cpu {i}: {why}");
        }
    }
    let mut jobs = 0;
    for (i, &before) in done_before.iter().enumerate().take(online).skip(1) {
        while smp::jobs_done(i) == before {
            if clock::now_ns().wrapping_sub(t0) > timeout_ms * 1_000_000 {
                fail!("cpu {i} did not finish its job");
            }
            core::hint::spin_loop();
        }
        if JOB_RESULT[i].load(Ordering::Acquire) != job_value(i) {
            fail!("cpu {i} computed a wrong job result");
        }
        jobs += 1;
    }
    r.kv("jobs", jobs);
    r.kv("jobs_us", clock::now_ns().wrapping_sub(t0) / 1000);
    if online != expected {
        fail!("{online} of {expected} cpus online");
    }
    Ok(())
}
