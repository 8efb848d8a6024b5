//! `vrng`: read entropy from every virtio-rng device (type 4) on either
//! transport: `probe.vrng_bytes` (default 4096) bytes per device, in requests
//! of `probe.vrng_chunk` (default 256) bytes, one request in flight at a time.
//! Each request is one device-writable buffer, a notification and polling of
//! the used ring; `ns_per_req` is the average round trip.

use core::fmt::Write;

use super::{fail, Ctx, Fail, Line, Report, Scenario};
use crate::rt::clock;
use crate::rt::virtio::{Buf, Device, Virtqueue, ID_RNG};

pub const SCENARIO: Scenario = Scenario { name: "vrng", run };

/// Below this many distinct byte values the data look constant (uniform
/// random data show about 162 in 256 bytes, all 256 in 4 KiB); checked when
/// at least 256 bytes are read per device.
const MIN_DISTINCT: usize = 64;
/// Queue size the driver asks for.
const QUEUE_SIZE: u16 = 16;

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let chunk = ctx.param("vrng_chunk", 256)?;
    let total = ctx.param("vrng_bytes", 4096)?;
    let timeout_ns = super::virtio_timeout_ns(ctx)?;
    if chunk == 0 || chunk > total || total > 1 << 20 {
        fail!("need 0 < probe.vrng_chunk <= probe.vrng_bytes <= 1 MiB");
    }
    let devs = super::discover_virtio(ctx)?;
    let Some(buf) = ctx.phys.alloc(total, 4096) else {
        fail!("no memory for a {total}-byte buffer");
    };
    let mut transports = Line::<256>::new();
    let mut n = 0;
    let mut t = Timing::default();
    let mut distinct = 256;
    for d in devs.iter().filter(|d| d.kind == ID_RNG) {
        let sep = if n == 0 { "" } else { "," };
        let _ = write!(transports, "{sep}{}", d.transport_name());
        n += 1;
        let res = read_entropy(ctx, d, buf, total, chunk, timeout_ns, &mut t);
        let _ = d.reset();
        if let Err(why) = res {
            r.kv("devices", n);
            fail!("{d}: {why}");
        }
        // SAFETY: `buf` holds `total` bytes of our RAM; the device is reset,
        // so nothing writes it any more.
        let data = unsafe { core::slice::from_raw_parts(buf as *const u8, total as usize) };
        let mut seen = [false; 256];
        data.iter().for_each(|&b| seen[usize::from(b)] = true);
        distinct = distinct.min(seen.iter().filter(|&&s| s).count());
    }
    if n == 0 {
        fail!("no virtio-rng device");
    }
    r.kv("devices", n);
    r.kv("transports", transports.as_str());
    r.kv("bytes", total);
    r.kv("chunk", chunk);
    r.kv("distinct", distinct);
    r.kv("requests", t.reqs);
    r.kv("ns_per_req", t.total_ns / t.reqs.max(1));
    r.kv("ns_min", t.min_ns);
    r.kv("ns_max", t.max_ns);
    if total >= 256 && distinct < MIN_DISTINCT {
        fail!("the data look constant");
    }
    Ok(())
}

/// Round trips of the requests, over all devices.
#[derive(Default)]
struct Timing {
    reqs: u64,
    total_ns: u64,
    min_ns: u64,
    max_ns: u64,
}

impl Timing {
    fn add(&mut self, ns: u64) {
        self.min_ns = if self.reqs == 0 {
            ns
        } else {
            self.min_ns.min(ns)
        };
        self.max_ns = self.max_ns.max(ns);
        self.total_ns += ns;
        self.reqs += 1;
    }
}

/// Fill `buf` from `d`, one request at a time.
fn read_entropy(
    ctx: &mut Ctx<'_>,
    d: &Device,
    buf: u64,
    total: u64,
    chunk: u64,
    timeout_ns: u64,
    t: &mut Timing,
) -> Result<(), &'static str> {
    let mut qs = [Virtqueue::EMPTY; 1];
    d.start(&mut ctx.phys, &mut qs, QUEUE_SIZE)?;
    let q = &mut qs[0];
    // SAFETY: `buf` is `total` bytes of our RAM, not shared with any device yet.
    unsafe { core::ptr::write_bytes(buf as *mut u8, 0, total as usize) };
    // A device may return less than asked, but not forever.
    let max_reqs = 4 * total.div_ceil(chunk) + 16;
    let (mut got, mut reqs) = (0, 0);
    while got < total {
        if reqs == max_reqs {
            return Err("the device keeps returning short reads");
        }
        let len = chunk.min(total - got);
        let start = clock::now_ns();
        q.push(&[Buf {
            addr: buf + got,
            len: len as u32,
            device_writes: true,
        }])?;
        d.notify(q);
        let (_, written) = q.wait_used(timeout_ns)?;
        t.add(clock::now_ns().wrapping_sub(start));
        got += u64::from(written).min(len);
        reqs += 1;
    }
    Ok(())
}
