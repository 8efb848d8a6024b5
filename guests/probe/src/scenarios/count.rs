//! `count`: a ring-3 counter that keeps counting and says so. For `probe.count_ms` (default
//! 3000) ms it increments a counter in a tight loop and, every `probe.count_tick_ms` (default
//! 100) ms, prints `probe: count tick=K value=V`. Tick numbers count lines, not time, so a VM
//! paused between two ticks resumes at the next number; the value only ever grows. The host
//! uses it to check that a paused VM really stops and continues where it was.
//!
//! Options, for snapshots:
//! - `probe.count_mem_mb=N`: fills N MiB of RAM with a pattern at the start and checks it at
//!   the end (`mem_mb=N mem=ok`); it also records every tick in a log page of its own and
//!   checks at the end that each tick's entry is there. A mismatch fails the scenario (memory
//!   lost or mixed up across a snapshot and restore).
//! - `probe.count_blk=1`: at every tick, writes the tick's pattern to sector `tick % 64` of
//!   the first virtio-blk device, reads it back and checks it (`blk_ok=K`), and prints
//!   `probe: count blk tick=K sector=S fnv=H` (FNV-1a 64 of the sector). It also reads the
//!   sector into the tick's slot of a 64-page device log that only the device writes, and
//!   checks every slot at the end (`devlog=ok`): memory only a device wrote must survive a
//!   snapshot too. Request failures fail the scenario.
//! - `probe.count_dirty_mb=N`: keeps writing N MiB of RAM while it counts, one page after
//!   the other (a word naming the page and the pass over the region), and checks at the end
//!   that every page holds the last word written to it (`dirty_mb=N dirty=ok`): a live
//!   migration must send pages again as the guest rewrites them. It writes as fast as it
//!   can (16 pages between two clock reads) unless
//! - `probe.count_dirty_rate_mb=R` (with `count_dirty_mb`): paces those writes to R MiB/s of
//!   distinct pages (R × 256 page writes per second of the probe's clock since counting
//!   began; behind schedule it catches up at most 16 pages between clock reads). The host
//!   benchmarks live migration against a known dirty rate this way. `dirty_writes=K` at the
//!   end counts the page writes in either mode.
//! - `probe.count_gen=1`: reads the 16-byte VM generation ID at [`VMGENID_ADDR`] at the start
//!   and at every tick, and prints `probe: count generation=<32 hex digits>` (bytes in memory
//!   order) at the start and whenever it changed (`gen_changes=K`). tern gives a VM restored
//!   from a snapshot a new one, so each clone prints its own.

use super::{fail, Ctx, Fail, Report, Scenario};
use crate::rt::clock;
use crate::rt::virtio::blk::{self, Blk, SECTOR};
use crate::rt::virtio::ID_BLK;

pub const SCENARIO: Scenario = Scenario { name: "count", run };

/// Where tern puts the VM generation ID (tern's `arch::layout::VMGENID_ADDR`, which its DSDT
/// names in `\_SB_.VGEN.ADDR`): a page of the BIOS area, identity mapped and user accessible
/// like all low memory.
const VMGENID_ADDR: u64 = 0xe_f000;

/// The VM generation ID, read as one 128-bit number whose hex digits follow memory order.
fn generation() -> u128 {
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        // SAFETY: the generation ID page is mapped (the identity map of low memory) and only
        // read; volatile, since tern rewrites it behind the guest's back.
        *b = unsafe { core::ptr::read_volatile((VMGENID_ADDR + i as u64) as *const u8) };
    }
    u128::from_be_bytes(id)
}

/// Pattern word at physical address `a`.
fn mem_word(a: u64) -> u64 {
    a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x636f_756e_7421
}

/// Entries in the tick log (one u64 each; 16 pages).
const TICK_LOG: u64 = 8192;

/// Tick `t`'s log entry.
fn tick_word(t: u64) -> u64 {
    t ^ 0x7469_636b_0000_0000
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let total_ns = ctx.param("count_ms", 3000)? * 1_000_000;
    let tick_ns = ctx.param("count_tick_ms", 100)? * 1_000_000;
    let mem_mb = ctx.param("count_mem_mb", 0)?;
    let use_blk = ctx.param("count_blk", 0)? != 0;
    let use_gen = ctx.param("count_gen", 0)? != 0;
    let dirty_mb = ctx.param("count_dirty_mb", 0)?;
    // Page writes per second (0: as fast as it goes).
    let dirty_pps = ctx.param("count_dirty_rate_mb", 0)?.saturating_mul(256);
    if tick_ns == 0 {
        fail!("probe.count_tick_ms must be positive");
    }
    // Memory pattern.
    let mem = if mem_mb > 0 {
        let len = mem_mb << 20;
        let Some(base) = ctx.phys.alloc(len, 4096) else {
            fail!("no memory for probe.count_mem_mb={mem_mb}");
        };
        for a in (base..base + len).step_by(8) {
            // SAFETY: [base, base+len) is RAM of ours that nothing else uses.
            unsafe { core::ptr::write_volatile(a as *mut u64, mem_word(a)) };
        }
        let Some(log) = ctx.phys.alloc(TICK_LOG * 8, 4096) else {
            fail!("no memory for the tick log");
        };
        Some((base, len, log))
    } else {
        None
    };
    // Disk.
    let mut disk = None;
    if use_blk {
        let timeout_ns = super::virtio_timeout_ns(ctx)?;
        let devs = super::discover_virtio(ctx)?;
        let Some(d) = devs.iter().find(|d| d.kind == ID_BLK) else {
            fail!("probe.count_blk=1 but there is no virtio-blk device");
        };
        let b = match Blk::start(d, &mut ctx.phys, blk::MAX_QUEUE, timeout_ns) {
            Ok(b) => b,
            Err(e) => fail!("virtio-blk start: {e}"),
        };
        if b.read_only() {
            fail!("probe.count_blk=1 needs a writable disk");
        }
        let (Some(buf), Some(devlog)) = (
            ctx.phys.alloc(4096, 4096),
            ctx.phys.alloc(DEVLOG * 4096, 4096),
        ) else {
            fail!("no memory for the disk buffers");
        };
        disk = Some((b, buf, devlog));
    }
    // Memory rewritten all the time: page `i` holds `pass << 32 | i`.
    let dirty = if dirty_mb > 0 {
        let pages = (dirty_mb << 20) / 4096;
        let Some(base) = ctx.phys.alloc(pages * 4096, 4096) else {
            fail!("no memory for probe.count_dirty_mb={dirty_mb}");
        };
        for i in 0..pages {
            // SAFETY: [base, base + pages * 4096) is RAM of ours that nothing else uses.
            unsafe { core::ptr::write_volatile((base + i * 4096) as *mut u64, i) };
        }
        Some((base, pages))
    } else {
        None
    };
    let (mut dirty_pass, mut dirty_next, mut dirty_writes) = (1u64, 0u64, 0u64);
    let mut gen = None;
    if use_gen {
        let g = generation();
        crate::println!("probe: count generation={g:032x}");
        gen = Some(g);
    }
    let mut gen_changes: u64 = 0;
    let start = clock::now_ns();
    let mut next = start + tick_ns;
    let mut value: u64 = 0;
    let mut ticks: u64 = 0;
    let mut blk_ok: u64 = 0;
    // The last clock reading, for the dirty rate.
    let mut now = start;
    loop {
        // Work between clock reads, so the counter runs mostly in ring 3 arithmetic.
        for _ in 0..1000 {
            value = core::hint::black_box(value + 1);
        }
        if let Some((base, pages)) = dirty {
            let batch = if dirty_pps == 0 {
                16
            } else {
                let due = ((now - start) / 1000).saturating_mul(dirty_pps) / 1_000_000;
                due.saturating_sub(dirty_writes).min(16)
            };
            dirty_writes += batch;
            for _ in 0..batch {
                let a = base + dirty_next * 4096;
                // SAFETY: as above.
                unsafe { core::ptr::write_volatile(a as *mut u64, dirty_pass << 32 | dirty_next) };
                dirty_next += 1;
                if dirty_next == pages {
                    dirty_next = 0;
                    dirty_pass += 1;
                }
            }
        }
        now = clock::now_ns();
        if now >= next {
            ticks += 1;
            crate::println!("probe: count tick={ticks} value={value}");
            if let Some((_, _, log)) = mem {
                let slot = log + (ticks % TICK_LOG) * 8;
                // SAFETY: the log is RAM of ours that nothing else uses.
                unsafe { core::ptr::write_volatile(slot as *mut u64, tick_word(ticks)) };
            }
            if let Some((b, buf, devlog)) = disk.as_mut() {
                let sector = ticks % 64;
                let slot = *devlog + (ticks % DEVLOG) * 4096;
                let h = match blk_tick(b, *buf, slot, sector, ticks) {
                    Ok(h) => h,
                    Err(why) => fail!("tick {ticks}: virtio-blk sector {sector}: {why}"),
                };
                blk_ok += 1;
                crate::println!("probe: count blk tick={ticks} sector={sector} fnv={h:#x}");
            }
            if let Some(g) = gen.as_mut() {
                let now_gen = generation();
                if now_gen != *g {
                    *g = now_gen;
                    gen_changes += 1;
                    crate::println!("probe: count generation={now_gen:032x}");
                }
            }
            next = now + tick_ns;
        }
        if now - start >= total_ns {
            break;
        }
    }
    r.kv("ticks", ticks);
    r.kv("value", value);
    if let Some((base, len, log)) = mem {
        for a in (base..base + len).step_by(8) {
            // SAFETY: as above.
            let w = unsafe { core::ptr::read_volatile(a as *const u64) };
            if w != mem_word(a) {
                fail!("memory pattern broken at {a:#x}: {w:#x}");
            }
        }
        for t in ticks.saturating_sub(TICK_LOG - 1).max(1)..=ticks {
            // SAFETY: as above.
            let w = unsafe { core::ptr::read_volatile((log + (t % TICK_LOG) * 8) as *const u64) };
            if w != tick_word(t) {
                fail!("tick {t} is missing from the tick log ({w:#x})");
            }
        }
        r.kv("mem_mb", mem_mb);
        r.kv("mem", "ok");
    }
    if let Some((base, pages)) = dirty {
        for i in 0..pages {
            let pass = if i < dirty_next {
                dirty_pass
            } else {
                dirty_pass - 1
            };
            // SAFETY: as above.
            let w = unsafe { core::ptr::read_volatile((base + i * 4096) as *const u64) };
            if w != pass << 32 | i {
                fail!("rewritten page {i} holds {w:#x}, not pass {pass}");
            }
        }
        r.kv("dirty_mb", dirty_mb);
        r.kv("dirty_writes", dirty_writes);
        r.kv("dirty", "ok");
    }
    if let Some((_, _, devlog)) = disk {
        for t in ticks.saturating_sub(DEVLOG - 1).max(1)..=ticks {
            let mut want = [0u64; (SECTOR / 8) as usize];
            super::vblk::fill_sector(&mut want, t % 64, t);
            let slot = devlog + (t % DEVLOG) * 4096;
            // SAFETY: the device log is RAM of ours; its requests have completed.
            let got = unsafe { core::slice::from_raw_parts(slot as *const u64, want.len()) };
            if got != want {
                fail!("tick {t}: the device log slot does not hold what the disk returned");
            }
        }
        r.kv("blk_ok", blk_ok);
        r.kv("devlog", "ok");
    }
    if use_gen {
        r.kv("gen_changes", gen_changes);
    }
    Ok(())
}

/// Pages in the device log.
const DEVLOG: u64 = 64;

/// Writes sector `sector` with `tick`'s pattern, reads it back into a poisoned buffer and
/// checks it, then reads it once more into `slot` (which the CPU never writes); returns its
/// FNV-1a 64.
fn blk_tick(b: &mut Blk, buf: u64, slot: u64, sector: u64, tick: u64) -> Result<u64, &'static str> {
    // SAFETY: `buf` is a page of ours that no request uses between these calls.
    let words = unsafe { core::slice::from_raw_parts_mut(buf as *mut u64, (SECTOR / 8) as usize) };
    super::vblk::fill_sector(words, sector, tick);
    b.transfer(true, sector, buf, SECTOR)
        .map_err(|_| "write failed")?;
    words.fill(0xa5a5_a5a5_a5a5_a5a5);
    b.transfer(false, sector, buf, SECTOR)
        .map_err(|_| "read failed")?;
    let mut want = [0u64; (SECTOR / 8) as usize];
    super::vblk::fill_sector(&mut want, sector, tick);
    if words != want {
        return Err("read back differs from what was written");
    }
    b.transfer(false, sector, slot, SECTOR)
        .map_err(|_| "read into the device log failed")?;
    // SAFETY: as above.
    let bytes = unsafe { core::slice::from_raw_parts(buf as *const u8, SECTOR as usize) };
    Ok(super::vblk::fnv1a64(bytes))
}
