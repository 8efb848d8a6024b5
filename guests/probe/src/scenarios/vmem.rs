//! `vmem`: a virtio-mem driver (type 24) that follows the host's requested size. It maps the
//! device's region (above 4 GiB, beyond the boot page tables) as ordinary memory and checks
//! the protocol's refusals first: STATE of the whole region says unplugged, and a misaligned
//! PLUG, a PLUG beyond the requested size and an UNPLUG of unplugged blocks are refused.
//! It prints `probe: vmem ready addr=A region=R block=B`, then for `probe.vmem_ms` (default
//! 10000) ms polls `requested_size` every 10 ms and plugs or unplugs blocks at the top of what
//! it holds to match, printing `probe: vmem plugged=N zero=ok|bad kept=ok|bad` after each
//! change (N in bytes). Newly plugged blocks must read as zeroes (never used, or freed by the
//! host when they were unplugged) and are then filled with a pattern; blocks about to be
//! unplugged must still hold it. Either going wrong fails the scenario.

use super::{fail, Ctx, Fail, Report, Scenario};
use crate::rt::clock;
use crate::rt::paging;
use crate::rt::virtio::{Buf, Device, Virtqueue};

pub const SCENARIO: Scenario = Scenario { name: "vmem", run };

const ID_MEM: u32 = 24;
const F_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;
const QSIZE: u16 = 16;
const PAGE: u64 = 4096;

const PLUG: u16 = 0;
const UNPLUG: u16 = 1;
const STATE: u16 = 3;
const ACK: u16 = 0;
const NACK: u16 = 1;
const ERROR: u16 = 3;
const UNPLUGGED: u16 = 1;

fn pattern(a: u64) -> u64 {
    a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x766d_656d
}

struct Driver<'a> {
    d: &'a Device,
    q: Virtqueue,
    /// A page for the request (offset 0) and the response (offset 64).
    buf: u64,
    addr: u64,
    block: u64,
    timeout_ns: u64,
}

impl Driver<'_> {
    /// Sends a request; returns the response's type and state.
    fn request(&mut self, kind: u16, addr: u64, blocks: u64) -> Result<(u16, u16), &'static str> {
        let mut req = [0u8; 24];
        req[0..2].copy_from_slice(&kind.to_le_bytes());
        req[8..16].copy_from_slice(&addr.to_le_bytes());
        req[16..18].copy_from_slice(&(blocks.min(0xffff) as u16).to_le_bytes());
        for (i, b) in req.iter().enumerate() {
            // SAFETY: `buf` is a page of ours for exactly this.
            unsafe { core::ptr::write_volatile((self.buf + i as u64) as *mut u8, *b) };
        }
        self.q.push(&[
            Buf {
                addr: self.buf,
                len: 24,
                device_writes: false,
            },
            Buf {
                addr: self.buf + 64,
                len: 10,
                device_writes: true,
            },
        ])?;
        self.d.notify(&self.q);
        self.q.wait_used(self.timeout_ns)?;
        // SAFETY: as above.
        let read16 =
            |o: u64| unsafe { core::ptr::read_volatile((self.buf + 64 + o) as *const u16) };
        Ok((read16(0), read16(8)))
    }

    /// Plugs (or unplugs) blocks `[from, to)` of the region, at most 0xffff per request.
    fn change(&mut self, kind: u16, from: u64, to: u64) -> Result<(), &'static str> {
        let mut b = from;
        while b < to {
            let n = (to - b).min(0xffff);
            match self.request(kind, self.addr + b * self.block, n)? {
                (ACK, _) => b += n,
                (NACK, _) => return Err("the device said NACK"),
                _ => return Err("the device said ERROR"),
            }
        }
        Ok(())
    }
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let total_ns = ctx.param("vmem_ms", 10_000)? * 1_000_000;
    let timeout_ns = super::virtio_timeout_ns(ctx)?;
    let devs = super::discover_virtio(ctx)?;
    let Some(d) = devs.iter().find(|d| d.kind == ID_MEM) else {
        fail!("no virtio-mem device");
    };
    let field = |off: u64| d.config64(off);
    let (Ok(block), Ok(addr), Ok(region)) = (field(0), field(16), field(24)) else {
        fail!("cannot read the configuration");
    };
    if block < PAGE || !block.is_power_of_two() || region % block != 0 || addr % block != 0 {
        fail!("block size {block:#x}, region {addr:#x}+{region:#x}: not whole blocks");
    }
    if let Err(e) = paging::map_cached(&mut ctx.phys, addr, region) {
        fail!("cannot map the region {addr:#x}+{region:#x}: {e}");
    }
    let Some(buf) = ctx.phys.alloc(PAGE, PAGE) else {
        fail!("no memory for requests");
    };
    let mut qs = [Virtqueue::EMPTY];
    if let Err(e) = d.start_with(&mut ctx.phys, &mut qs, QSIZE, F_UNPLUGGED_INACCESSIBLE) {
        fail!("virtio-mem start: {e}");
    }
    let [q] = qs;
    let mut drv = Driver {
        d,
        q,
        buf,
        addr,
        block,
        timeout_ns,
    };
    let blocks = region / block;
    // The refusals, before anything is plugged (the requested size may already be set).
    let requested = field(48).unwrap_or(0) / block;
    let checks = [
        (STATE, addr, blocks, (ACK, UNPLUGGED), "STATE of the region"),
        (PLUG, addr + PAGE, 1, (ERROR, 0), "a misaligned PLUG"),
        (
            UNPLUG,
            addr,
            1,
            (ERROR, 0),
            "an UNPLUG of an unplugged block",
        ),
        (
            PLUG,
            addr,
            requested + 1,
            (NACK, 0),
            "a PLUG beyond the requested size",
        ),
    ];
    // With all of the region requested, nothing lies beyond the requested size.
    let n = if requested >= blocks { 3 } else { 4 };
    for &(kind, a, n, want, what) in &checks[..n] {
        match drv.request(kind, a, n) {
            Ok(got) if got == want => {}
            Ok(got) => fail!("{what}: the device answered {got:?}, not {want:?}"),
            Err(e) => fail!("{what}: {e}"),
        }
    }
    crate::println!("probe: vmem ready addr={addr:#x} region={region:#x} block={block:#x}");
    let start = clock::now_ns();
    let mut held = 0u64;
    let mut steps = 0u64;
    let mut bad = 0u64;
    while clock::now_ns() - start < total_ns {
        let want = match field(48) {
            Ok(v) => (v / block).min(blocks),
            Err(e) => fail!("requested_size: {e}"),
        };
        if want != held {
            let (mut zero, mut kept) = ("ok", "ok");
            let span = |from: u64, to: u64| (addr + from * block, (to - from) * block);
            if want > held {
                if let Err(e) = drv.change(PLUG, held, want) {
                    fail!("plugging blocks {held}..{want}: {e}");
                }
                let (base, len) = span(held, want);
                // SAFETY: the blocks are plugged, mapped above and ours alone.
                let zeroes = (base..base + len)
                    .step_by(PAGE as usize)
                    .all(|a| unsafe { core::ptr::read_volatile(a as *const u64) } == 0);
                if !zeroes {
                    zero = "bad";
                    bad += 1;
                }
                for a in (base..base + len).step_by(8) {
                    // SAFETY: as above.
                    unsafe { core::ptr::write_volatile(a as *mut u64, pattern(a)) };
                }
            } else {
                let (base, len) = span(want, held);
                // SAFETY: plugged until the request below, mapped and ours.
                let intact = (base..base + len)
                    .step_by(PAGE as usize)
                    .all(|a| unsafe { core::ptr::read_volatile(a as *const u64) } == pattern(a));
                if !intact {
                    kept = "bad";
                    bad += 1;
                }
                if let Err(e) = drv.change(UNPLUG, want, held) {
                    fail!("unplugging blocks {want}..{held}: {e}");
                }
            }
            held = want;
            steps += 1;
            crate::println!(
                "probe: vmem plugged={} zero={zero} kept={kept}",
                held * block
            );
        }
        clock::delay_ns(10_000_000);
    }
    r.kv("plugged", held * block);
    r.kv("steps", steps);
    if bad > 0 {
        fail!("{bad} times plugged memory did not read as zeroes or lost its contents");
    }
    Ok(())
}
