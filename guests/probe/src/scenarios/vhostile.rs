//! `vhostile`: feed every virtio-rng device (type 4, either transport)
//! malformed requests and check that it gives up on them cleanly: each case
//! runs on a freshly reset and started device, which must then show
//! DEVICE_NEEDS_RESET, must not return the bad chain in the used ring and must
//! not touch its buffers. After each case the device is reset, started again
//! and has to serve one normal 256-byte entropy read.
//!
//! The cases (descriptors and ring entries are written by hand, bypassing
//! `Virtqueue::push`):
//! - `loop`: descriptor 0 → 1 → 0 …, every one with NEXT;
//! - `range`: a buffer at 0xFFFF_F000_0000, far beyond guest RAM;
//! - `readable`: a device-readable buffer, which an rng cannot fill;
//! - `huge`: a buffer of 0xFFFF_FFFF bytes;
//! - `avail`: the available index jumps from 0 to 0x8000 (beyond the queue
//!   size).

use core::fmt::Write;

use super::{fail, Ctx, Fail, Line, Report, Scenario};
use crate::rt::clock;
use crate::rt::io::pause;
use crate::rt::virtio::{Buf, Device, Virtqueue, ID_RNG, INT_CONFIG, STATUS_NEEDS_RESET};

pub const SCENARIO: Scenario = Scenario {
    name: "vhostile",
    run,
};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// Queue size the driver asks for.
const QUEUE_SIZE: u16 = 16;
/// Bytes of the recovery read, and of each well-formed buffer of a bad chain.
const CHUNK: u32 = 256;
/// What the bad chains' buffers are filled with; a device must leave it.
const POISON: u8 = 0x5a;
/// An address no guest of this size has RAM at.
const FAR_ADDR: u64 = 0xFFFF_F000_0000;

#[derive(Clone, Copy)]
enum Case {
    Loop,
    Range,
    Readable,
    Huge,
    Avail,
}

const CASES: [(&str, Case); 5] = [
    ("loop", Case::Loop),
    ("range", Case::Range),
    ("readable", Case::Readable),
    ("huge", Case::Huge),
    ("avail", Case::Avail),
];

/// Counts over all devices and cases.
#[derive(Default)]
struct Tally {
    flagged: u32,
    config_irq: u32,
    recovered: u32,
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let timeout_ns = super::virtio_timeout_ns(ctx)?;
    let devs = super::discover_virtio(ctx)?;
    // The first half holds the bad chains' buffers, the second the recovery read.
    let Some(buf) = ctx.phys.alloc(2 * 4096, 4096) else {
        fail!("no memory for the buffers");
    };
    let mut transports = Line::<256>::new();
    let mut problems = Line::<192>::new();
    let mut t = Tally::default();
    let mut n = 0;
    for d in devs.iter().filter(|d| d.kind == ID_RNG) {
        let sep = if n == 0 { "" } else { "," };
        let _ = write!(transports, "{sep}{}", d.transport_name());
        n += 1;
        for (name, case) in CASES {
            let outcome = hostile(ctx, d, case, buf, timeout_ns);
            let _ = d.reset();
            match outcome {
                Ok(irq) => {
                    t.flagged += 1;
                    t.config_irq += u32::from(irq);
                }
                Err(why) => note(&mut problems, d, name, why),
            }
            let read = recovery_read(ctx, d, buf + 4096, timeout_ns);
            let _ = d.reset();
            match read {
                Ok(()) => t.recovered += 1,
                Err(why) => note(&mut problems, d, name, why),
            }
        }
    }
    if n == 0 {
        fail!("no virtio-rng device");
    }
    r.kv("devices", n);
    r.kv("transports", transports.as_str());
    r.kv("cases", CASES.len());
    r.kv("flagged", t.flagged);
    r.kv("recovered", t.recovered);
    r.kv("config_irq", t.config_irq);
    if !problems.as_str().is_empty() {
        fail!("{}", problems.as_str());
    }
    Ok(())
}

/// Appends `case@device: why` to the failure reasons.
fn note(problems: &mut Line<192>, d: &Device, case: &str, why: Observed) {
    let sep = if problems.as_str().is_empty() {
        ""
    } else {
        "; "
    };
    let _ = write!(problems, "{sep}{case}@{d}: {why}");
}

/// Why a case did not end as it should.
enum Observed {
    /// The device did not start.
    Start(&'static str),
    /// No DEVICE_NEEDS_RESET within the timeout (status as last read, used
    /// index).
    NotFlagged(u8, u16),
    /// Flagged, but the chain was returned in the used ring anyway.
    Used(u16),
    /// Flagged, but the device wrote into the bad chain's buffers.
    Written,
    /// The recovery read failed.
    Read(&'static str),
}

impl core::fmt::Display for Observed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Observed::Start(why) => write!(f, "start: {why}"),
            Observed::NotFlagged(s, u) => write!(f, "not flagged (status={s:#x} used={u})"),
            Observed::Used(u) => write!(f, "flagged but used={u}"),
            Observed::Written => write!(f, "flagged but the buffer was written"),
            Observed::Read(why) => write!(f, "recovery read: {why}"),
        }
    }
}

/// Writes descriptor `i` of `q`.
fn set_desc(q: &Virtqueue, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let d = q.desc + 16 * u64::from(i);
    // SAFETY: descriptor `i < q.size` lies in the queue's own table; the device
    // reads it only after the available index published below changes.
    unsafe {
        (d as *mut u64).write_volatile(addr);
        ((d + 8) as *mut u32).write_volatile(len);
        ((d + 12) as *mut u16).write_volatile(flags);
        ((d + 14) as *mut u16).write_volatile(next);
    }
}

/// Puts `head` in available slot 0 and sets the available index to `idx`.
fn publish(q: &Virtqueue, head: u16, idx: u16) {
    // SAFETY: the driver area belongs to the driver; slot 0 and the index lie
    // inside it.
    unsafe {
        ((q.avail + 4) as *mut u16).write_volatile(head);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        ((q.avail + 2) as *mut u16).write_volatile(idx);
    }
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}

fn used_idx(q: &Virtqueue) -> u16 {
    // SAFETY: the used index lies in the queue's own device area.
    unsafe { ((q.used + 2) as *const u16).read_volatile() }
}

/// Starts `d`, submits the malformed request `case` and waits for the device
/// to flag itself. Returns whether the configuration-change interrupt bit was
/// seen too.
fn hostile(
    ctx: &mut Ctx<'_>,
    d: &Device,
    case: Case,
    buf: u64,
    timeout_ns: u64,
) -> Result<bool, Observed> {
    let mut qs = [Virtqueue::EMPTY; 1];
    d.start(&mut ctx.phys, &mut qs, QUEUE_SIZE)
        .map_err(Observed::Start)?;
    let q = &qs[0];
    // SAFETY: the first page at `buf` is our RAM; only the bad chains point at it.
    unsafe { core::ptr::write_bytes(buf as *mut u8, POISON, 4096) };
    let w = DESC_F_WRITE;
    match case {
        Case::Loop => {
            set_desc(q, 0, buf, CHUNK, w | DESC_F_NEXT, 1);
            set_desc(q, 1, buf + u64::from(CHUNK), CHUNK, w | DESC_F_NEXT, 0);
            publish(q, 0, 1);
        }
        Case::Range => {
            set_desc(q, 0, FAR_ADDR, CHUNK, w, 0);
            publish(q, 0, 1);
        }
        Case::Readable => {
            set_desc(q, 0, buf, CHUNK, 0, 0);
            publish(q, 0, 1);
        }
        Case::Huge => {
            set_desc(q, 0, buf, u32::MAX, w, 0);
            publish(q, 0, 1);
        }
        Case::Avail => {
            set_desc(q, 0, buf, CHUNK, w, 0);
            publish(q, 0, 0x8000);
        }
    }
    d.notify(q);
    let start = clock::now_ns();
    let expired = || clock::now_ns().wrapping_sub(start) > timeout_ns;
    let mut status = d.status();
    while status & STATUS_NEEDS_RESET == 0 {
        if expired() {
            return Err(Observed::NotFlagged(status, used_idx(q)));
        }
        pause();
        status = d.status();
    }
    // The device flags itself before it raises the interrupt; the PCI ISR
    // read clears the bits, hence the accumulation.
    let mut isr = d.interrupt_status();
    while isr & INT_CONFIG == 0 && !expired() {
        pause();
        isr |= d.interrupt_status();
    }
    let used = used_idx(q);
    if used != 0 {
        return Err(Observed::Used(used));
    }
    // SAFETY: as above; the flagged device no longer serves the queue.
    let data = unsafe { core::slice::from_raw_parts(buf as *const u8, 4096) };
    if data.iter().any(|&b| b != POISON) {
        return Err(Observed::Written);
    }
    Ok(isr & INT_CONFIG != 0)
}

/// Starts `d` and reads `CHUNK` bytes of entropy into `buf` with a well-formed
/// request.
fn recovery_read(ctx: &mut Ctx<'_>, d: &Device, buf: u64, timeout_ns: u64) -> Result<(), Observed> {
    let mut qs = [Virtqueue::EMPTY; 1];
    d.start(&mut ctx.phys, &mut qs, QUEUE_SIZE)
        .map_err(Observed::Read)?;
    let q = &mut qs[0];
    q.push(&[Buf {
        addr: buf,
        len: CHUNK,
        device_writes: true,
    }])
    .map_err(Observed::Read)?;
    d.notify(q);
    let (_, written) = q.wait_used(timeout_ns).map_err(Observed::Read)?;
    if written == 0 || written > CHUNK {
        return Err(Observed::Read("bad length in the used ring"));
    }
    if d.status() & STATUS_NEEDS_RESET != 0 {
        return Err(Observed::Read("device flagged a well-formed request"));
    }
    Ok(())
}
