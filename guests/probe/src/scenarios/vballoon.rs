//! `vballoon`: a virtio-balloon driver (type 5) that follows the host's target. It fills
//! `probe.balloon_fill_mb` (default 32) MiB with a pattern, prints
//! `probe: vballoon ready fill_mb=N features=F`, then for `probe.balloon_ms` (default 10000)
//! ms polls the balloon's target (`num_pages`) every 10 ms and inflates or deflates towards
//! it with pages of that region, 256 page numbers per request, writing `actual` after each
//! step and printing `probe: vballoon held=N zero=ok|bad` once it holds the target. Pages it
//! takes back must read as zeroes (the host freed them; `zero=bad` fails the scenario), and
//! are filled with the pattern again.
//!
//! With the statistics queue offered it sends figures at once and again whenever the host
//! returns the buffer: `total_memory` = 0x1234_5000, `free_memory` = the pages it holds ×
//! 4096 and `minor_faults` = how many times it sent them. With free page reporting offered
//! and `probe.balloon_report_mb=R`, it fills R MiB more, waits `probe.balloon_report_ms`
//! (default 2000) ms, reports that region free in 2 MiB ranges (32 per request), prints
//! `probe: vballoon reported_mb=R zero=ok|bad` after checking that a word of every MiB of it
//! reads as zero.

use super::{fail, Ctx, Fail, Report, Scenario};
use crate::rt::clock;
use crate::rt::virtio::{Buf, Device, Virtqueue};

pub const SCENARIO: Scenario = Scenario {
    name: "vballoon",
    run,
};

const ID_BALLOON: u32 = 5;
const F_STATS_VQ: u64 = 1 << 1;
const F_REPORTING: u64 = 1 << 5;
const PAGE: u64 = 4096;
const BATCH: u64 = 256;
const QSIZE: u16 = 64;
const STATS_TOTAL: u64 = 0x1234_5000;

fn pattern(a: u64) -> u64 {
    a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6261_6c6c
}

fn fill(base: u64, len: u64) {
    for a in (base..base + len).step_by(8) {
        // SAFETY: [base, base + len) is RAM of ours that nothing else uses.
        unsafe { core::ptr::write_volatile(a as *mut u64, pattern(a)) };
    }
}

/// Whether every `step`-th word of [base, base + len) reads zero. (Reading a page of freed
/// shared memory makes the host allocate it again: reports are checked sparsely.)
fn zeroes(base: u64, len: u64, step: u64) -> bool {
    // SAFETY: as in `fill`.
    (base..base + len)
        .step_by(step as usize)
        .all(|a| unsafe { core::ptr::read_volatile(a as *const u64) } == 0)
}

struct Driver<'a> {
    d: &'a Device,
    qs: [Virtqueue; 4],
    stats: Option<usize>,
    report: Option<usize>,
    /// Page numbers of a request, and the statistics buffer.
    pfns: u64,
    stats_buf: u64,
    stats_sent: u64,
    timeout_ns: u64,
}

impl Driver<'_> {
    /// Sends page numbers of `count` pages from `first` on queue `q` (0 inflate, 1 deflate).
    fn pages(&mut self, q: usize, first: u64, count: u64) -> Result<(), &'static str> {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(BATCH);
            for i in 0..n {
                let pfn = ((first + (done + i) * PAGE) >> 12) as u32;
                // SAFETY: `pfns` is a page of ours for exactly this.
                unsafe { core::ptr::write_volatile((self.pfns + i * 4) as *mut u32, pfn) };
            }
            self.qs[q].push(&[Buf {
                addr: self.pfns,
                len: (n * 4) as u32,
                device_writes: false,
            }])?;
            self.d.notify(&self.qs[q]);
            self.qs[q].wait_used(self.timeout_ns)?;
            done += n;
        }
        Ok(())
    }

    fn send_stats(&mut self, held: u64) -> Result<(), &'static str> {
        let Some(q) = self.stats else {
            return Ok(());
        };
        self.stats_sent += 1;
        let entries = [(5u16, STATS_TOTAL), (4, held * PAGE), (3, self.stats_sent)];
        for (i, (tag, v)) in entries.iter().enumerate() {
            let at = self.stats_buf + i as u64 * 10;
            for (j, b) in tag
                .to_le_bytes()
                .iter()
                .chain(v.to_le_bytes().iter())
                .enumerate()
            {
                // SAFETY: `stats_buf` is a page of ours for exactly this.
                unsafe { core::ptr::write_volatile((at + j as u64) as *mut u8, *b) };
            }
        }
        self.qs[q].push(&[Buf {
            addr: self.stats_buf,
            len: (entries.len() * 10) as u32,
            device_writes: false,
        }])?;
        self.d.notify(&self.qs[q]);
        Ok(())
    }

    /// Sends [base, base + len) as free memory, 2 MiB per range, 32 ranges per request.
    fn report(&mut self, base: u64, len: u64) -> Result<(), &'static str> {
        let Some(q) = self.report else {
            return Err("free page reporting was not negotiated");
        };
        const RANGE: u64 = 2 << 20;
        let mut at = base;
        while at < base + len {
            let mut bufs = [Buf {
                addr: 0,
                len: 0,
                device_writes: true,
            }; 32];
            let mut n = 0;
            while n < 32 && at < base + len {
                bufs[n] = Buf {
                    addr: at,
                    len: RANGE.min(base + len - at) as u32,
                    device_writes: true,
                };
                at += bufs[n].len as u64;
                n += 1;
            }
            self.qs[q].push(&bufs[..n])?;
            self.d.notify(&self.qs[q]);
            self.qs[q].wait_used(self.timeout_ns)?;
        }
        Ok(())
    }
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let fill_mb = ctx.param("balloon_fill_mb", 32)?;
    let total_ns = ctx.param("balloon_ms", 10_000)? * 1_000_000;
    let report_mb = ctx.param("balloon_report_mb", 0)?;
    let report_ns = ctx.param("balloon_report_ms", 2000)? * 1_000_000;
    let timeout_ns = super::virtio_timeout_ns(ctx)?;
    let devs = super::discover_virtio(ctx)?;
    let Some(d) = devs.iter().find(|d| d.kind == ID_BALLOON) else {
        fail!("no virtio-balloon device");
    };
    let len = fill_mb << 20;
    let (Some(base), Some(pfns), Some(stats_buf)) = (
        ctx.phys.alloc(len, 2 << 20),
        ctx.phys.alloc(PAGE, PAGE),
        ctx.phys.alloc(PAGE, PAGE),
    ) else {
        fail!("no memory for probe.balloon_fill_mb={fill_mb}");
    };
    let report_base = if report_mb > 0 {
        let Some(b) = ctx.phys.alloc(report_mb << 20, 2 << 20) else {
            fail!("no memory for probe.balloon_report_mb={report_mb}");
        };
        fill(b, report_mb << 20);
        Some(b)
    } else {
        None
    };
    fill(base, len);
    let offered = d.device_features();
    let n = 2 + usize::from(offered & F_STATS_VQ != 0) + usize::from(offered & F_REPORTING != 0);
    let mut qs = [Virtqueue::EMPTY; 4];
    let features = match d.start_with(&mut ctx.phys, &mut qs[..n], QSIZE, F_STATS_VQ | F_REPORTING)
    {
        Ok(f) => f,
        Err(e) => fail!("virtio-balloon start: {e}"),
    };
    let stats = (features & F_STATS_VQ != 0).then_some(2);
    let report = (features & F_REPORTING != 0).then_some(2 + usize::from(stats.is_some()));
    let mut drv = Driver {
        d,
        qs,
        stats,
        report,
        pfns,
        stats_buf,
        stats_sent: 0,
        timeout_ns,
    };
    if let Err(e) = drv.send_stats(0) {
        fail!("statistics: {e}");
    }
    crate::println!(
        "probe: vballoon ready fill_mb={fill_mb} features={:#x}",
        features & 0xffff_ffff
    );
    let max = len / PAGE;
    let start = clock::now_ns();
    let mut held = 0u64;
    let mut steps = 0u64;
    let mut bad_zero = 0u64;
    let mut reported = false;
    while clock::now_ns() - start < total_ns {
        let target = match d.config32(0) {
            Ok(t) => u64::from(t).min(max),
            Err(e) => fail!("num_pages: {e}"),
        };
        if target != held {
            let res = if target > held {
                drv.pages(0, base + held * PAGE, target - held)
            } else {
                drv.pages(1, base + target * PAGE, held - target)
            };
            if let Err(e) = res {
                fail!("balloon to {target} pages: {e}");
            }
            let mut zero = "ok";
            if target < held {
                let (from, n) = (base + target * PAGE, (held - target) * PAGE);
                if !zeroes(from, n, 8) {
                    zero = "bad";
                    bad_zero += 1;
                }
                fill(from, n);
            }
            held = target;
            steps += 1;
            if let Err(e) = d.set_config32(4, held as u32) {
                fail!("actual: {e}");
            }
            crate::println!("probe: vballoon held={held} zero={zero}");
        }
        if let Some(q) = drv.stats {
            match drv.qs[q].pop_used() {
                Ok(Some(_)) => {
                    if let Err(e) = drv.send_stats(held) {
                        fail!("statistics: {e}");
                    }
                }
                Ok(None) => {}
                Err(e) => fail!("statistics queue: {e}"),
            }
        }
        if let (Some(b), false) = (report_base, reported) {
            if clock::now_ns() - start >= report_ns {
                reported = true;
                if let Err(e) = drv.report(b, report_mb << 20) {
                    fail!("free page report: {e}");
                }
                let zero = if zeroes(b, report_mb << 20, 1 << 20) {
                    "ok"
                } else {
                    bad_zero += 1;
                    "bad"
                };
                crate::println!("probe: vballoon reported_mb={report_mb} zero={zero}");
            }
        }
        clock::delay_ns(10_000_000);
    }
    let _ = d.reset();
    r.kv("held", held);
    r.kv("steps", steps);
    r.kv("stats_sent", drv.stats_sent);
    if bad_zero > 0 {
        fail!("{bad_zero} times memory the host freed did not read as zeroes");
    }
    Ok(())
}
