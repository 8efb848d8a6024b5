//! `vblkbench`: read throughput of every virtio-blk device (type 2, either
//! transport), each test running for `probe.vblk_ms` (default 2000) ms:
//! - `rr1`: random 4 KiB reads at 4 KiB-aligned offsets (xorshift64) with
//!   `probe.vblk_qd` (default 1) requests in flight → `iops_qd<N>`;
//! - `rr32`: the same with 32 in flight → `iops_qd32`;
//! - `seq`: sequential 1 MiB reads from sector 0, wrapping at the end of the
//!   disk, one in flight → `seq_mbps` (10^6 bytes/s, one decimal).
//!
//! `probe.vblk_bench=rr1,rr32,seq` picks the tests (default all). The depth is
//! clamped to what the queue holds (3 descriptors per 4 KiB read, queue of
//! up to 256 entries); the key names the depth used. Completions are polled;
//! each round of resubmissions is one notification.

use core::fmt::Write;

use super::vblk::Cols;
use super::{fail, Ctx, Fail, Line, Report, Scenario};
use crate::rt::clock;
use crate::rt::virtio::blk::{self, Blk, MAX_SEGS, SECTOR, S_OK, T_IN};
use crate::rt::virtio::{Buf, Device, ID_BLK};

pub const SCENARIO: Scenario = Scenario {
    name: "vblkbench",
    run,
};

/// Random read size and sequential read size.
const BLOCK: u64 = 4096;
const SEQ: u64 = 1 << 20;
/// Deepest queue depth the scenario allows.
const MAX_QD: u64 = 128;

struct Params {
    qd: usize,
    ns: u64,
    rr1: bool,
    rr32: bool,
    seq: bool,
    timeout_ns: u64,
    /// MAX_QD blocks for random reads, and a SEQ-byte buffer.
    blocks: u64,
    seq_buf: u64,
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let qd = ctx.param("vblk_qd", 1)?;
    let ms = ctx.param("vblk_ms", 2000)?;
    if qd == 0 || qd > MAX_QD {
        fail!("probe.vblk_qd must be 1..={MAX_QD}");
    }
    let (mut rr1, mut rr32, mut seq) = (false, false, false);
    for t in ctx
        .params
        .get("vblk_bench")
        .unwrap_or("rr1,rr32,seq")
        .split(',')
    {
        match t {
            "rr1" => rr1 = true,
            "rr32" => rr32 = true,
            "seq" => seq = true,
            "" => {}
            _ => fail!("bad probe.vblk_bench test {t} (rr1, rr32, seq)"),
        }
    }
    let timeout_ns = super::virtio_timeout_ns(ctx)?;
    let devs = super::discover_virtio(ctx)?;
    let (Some(blocks), Some(seq_buf)) = (
        ctx.phys.alloc(MAX_QD * BLOCK, 4096),
        ctx.phys.alloc(SEQ, 4096),
    ) else {
        fail!("no memory for the buffers");
    };
    let p = Params {
        qd: qd as usize,
        ns: ms.saturating_mul(1_000_000),
        rr1,
        rr32,
        seq,
        timeout_ns,
        blocks,
        seq_buf,
    };
    r.kv("ms", ms);
    let mut cols = Cols::<8>::new();
    let mut n = 0;
    for d in devs.iter().filter(|d| d.kind == ID_BLK) {
        n += 1;
        cols.next_device();
        cols.put("transports", d.transport_name());
        let res = bench(ctx, d, &p, &mut cols);
        let _ = d.reset();
        if let Err(why) = res {
            r.kv("devices", n);
            cols.emit(r);
            fail!("{d}: {}", why.as_str());
        }
    }
    if n == 0 {
        fail!("no virtio-blk device");
    }
    r.kv("devices", n);
    cols.emit(r);
    Ok(())
}

fn bench(ctx: &mut Ctx<'_>, d: &Device, p: &Params, cols: &mut Cols<8>) -> Result<(), Line<200>> {
    let mut why = Line::<200>::new();
    let mut b = match Blk::start(d, &mut ctx.phys, blk::MAX_QUEUE, p.timeout_ns) {
        Ok(b) => b,
        Err(e) => {
            let _ = write!(why, "start: {e}");
            return Err(why);
        }
    };
    cols.put("queue", b.q.size);
    if b.capacity < BLOCK / SECTOR {
        let _ = write!(why, "disk smaller than 4 KiB");
        return Err(why);
    }
    let segs = BLOCK.div_ceil(u64::from(b.seg_bytes)) as usize;
    if segs > b.max_segs {
        let _ = write!(why, "a 4 KiB read does not fit the segment limits");
        return Err(why);
    }
    let most = b.depth(segs).min(MAX_QD as usize);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for (on, want) in [(p.rr1, p.qd), (p.rr32, 32)] {
        if !on {
            continue;
        }
        let depth = want.min(most);
        let iops = random_reads(&mut b, depth, p, &mut rng).map_err(|e| {
            let _ = write!(why, "random reads at depth {depth}: {e}");
            why
        })?;
        let mut key = Line::<24>::new();
        let _ = write!(key, "iops_qd{depth}");
        cols.put(key.as_str(), iops);
        why = Line::new();
    }
    if p.seq {
        let tenths = seq_reads(&mut b, p).map_err(|e| {
            let _ = write!(why, "sequential reads: {e}");
            why
        })?;
        cols.put("seq_mbps", format_args!("{}.{}", tenths / 10, tenths % 10));
    }
    Ok(())
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Random 4 KiB reads with `depth` in flight for `p.ns`; returns IOPS.
fn random_reads(b: &mut Blk, depth: usize, p: &Params, rng: &mut u64) -> Result<u64, blk::Error> {
    let nblocks = b.capacity / (BLOCK / SECTOR);
    let mut segs = [Buf {
        addr: 0,
        len: 0,
        device_writes: false,
    }; MAX_SEGS];
    let mut submit = |b: &mut Blk, slot: usize| {
        let block = xorshift(rng) % nblocks;
        let n = b.segments(p.blocks + slot as u64 * BLOCK, BLOCK, true, &mut segs);
        b.submit(slot, T_IN, block * (BLOCK / SECTOR), &segs[..n])
    };
    let start = clock::now_ns();
    for slot in 0..depth {
        submit(b, slot)?;
    }
    b.kick();
    let (mut done, mut inflight) = (0u64, depth);
    while inflight > 0 {
        let mut next = Some(b.wait()?);
        let mut resubmitted = false;
        while let Some((slot, status)) = next {
            if status != S_OK {
                return Err(blk::Error::Status(status));
            }
            done += 1;
            inflight -= 1;
            if clock::now_ns().wrapping_sub(start) < p.ns {
                submit(b, slot)?;
                inflight += 1;
                resubmitted = true;
            }
            next = b.complete()?;
        }
        if resubmitted {
            b.kick();
        }
    }
    let elapsed = clock::now_ns().wrapping_sub(start).max(1);
    Ok(done * 1_000_000_000 / elapsed)
}

/// Sequential 1 MiB reads for `p.ns`; returns MB/s in tenths.
fn seq_reads(b: &mut Blk, p: &Params) -> Result<u64, blk::Error> {
    let unit = b.unit();
    let len = SEQ.min(b.capacity * SECTOR / unit * unit);
    let sectors = len / SECTOR;
    let start = clock::now_ns();
    let (mut s, mut bytes) = (0, 0u64);
    while clock::now_ns().wrapping_sub(start) < p.ns {
        if s + sectors > b.capacity {
            s = 0;
        }
        b.transfer(false, s, p.seq_buf, len)?;
        s += sectors;
        bytes += len;
    }
    let elapsed = clock::now_ns().wrapping_sub(start).max(1);
    Ok(bytes * 10_000 / elapsed)
}
