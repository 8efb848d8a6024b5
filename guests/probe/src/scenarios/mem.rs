//! `mem`: write and verify a pattern over N MiB of free RAM from ring 3.
//!
//! Pattern: the little-endian u64 at byte offset 8k of the region is
//! `splitmix64(k)` (see `pattern`). Checksum: FNV-1a 64 over every byte of the
//! region in address order, as read back. Both depend only on the offset, so a
//! host test can recompute them for any N (see README).

use super::{fail, Ctx, Fail, Report, Scenario};
use crate::rt::clock;

pub const SCENARIO: Scenario = Scenario { name: "mem", run };

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// k-th output (k = 0, 1, …) of splitmix64 seeded with 0.
pub fn pattern(k: u64) -> u64 {
    let mut z = (k + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    let mib = ctx.param("mem_mib", 16)?;
    r.kv("mib", mib);
    let bytes = mib << 20;
    let saved = ctx.phys.clone();
    let Some(base) = ctx.phys.alloc(bytes, 2 << 20) else {
        fail!(
            "not enough free RAM (free {} MiB)",
            ctx.phys.free_bytes() >> 20
        );
    };
    let words = bytes / 8;
    let t0 = clock::now_ns();
    let p = base as *mut u64;
    for k in 0..words {
        // SAFETY: [base, base + bytes) is free RAM from the allocator, identity
        // mapped and user accessible; nothing else uses it.
        unsafe { p.add(k as usize).write_volatile(pattern(k)) };
    }
    let t1 = clock::now_ns();
    let mut hash = FNV_OFFSET;
    let mut errors = 0u64;
    let mut first_bad = None;
    for k in 0..words {
        // SAFETY: as above.
        let w = unsafe { p.add(k as usize).read_volatile() };
        if w != pattern(k) {
            errors += 1;
            first_bad.get_or_insert(base + 8 * k);
        }
        for b in w.to_le_bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
    }
    let t2 = clock::now_ns();
    ctx.phys = saved;
    r.hex("checksum", hash);
    r.hex("base", base);
    r.kv("errors", errors);
    r.kv("write_us", (t1 - t0) / 1000);
    r.kv("verify_us", (t2 - t1) / 1000);
    if let Some(addr) = first_bad {
        fail!("{errors} words differ, first at {addr:#x}");
    }
    Ok(())
}
