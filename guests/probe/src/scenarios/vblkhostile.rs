//! `vblkhostile`: malformed requests to every virtio-blk device (type 2,
//! either transport). Each case must complete with an error status (IOERR or
//! UNSUPP; `bad_type` must give UNSUPP), the device must not flag
//! DEVICE_NEEDS_RESET, and a normal read of sector 0 (512 bytes, or
//! blk_size) must then succeed on the same queue. After a case that broke
//! the device (no completion, NEEDS_RESET, failed read) it is reset and
//! started again for the next case.
//!
//! Every case is a read unless said otherwise: a 16-byte header, the data
//! descriptors, a 1-byte status, as separate descriptors (see `CASES`).
//!
//! Then, on a freshly started device, one read is made available four times
//! (the same head) before the device is notified: a driver breaking the
//! rules, which the device must answer with DEVICE_NEEDS_RESET, not by serving
//! the chain again. `reposted` counts the devices that did.

use core::fmt::Write;

use super::{fail, Ctx, Fail, Line, Report, Scenario};
use crate::rt::clock;
use crate::rt::io::pause;
use crate::rt::phys::PhysAlloc;
use crate::rt::virtio::blk::{self, Blk, SECTOR, S_IOERR, S_UNSET, S_UNSUPP, T_IN};
use crate::rt::virtio::{Buf, Device, ID_BLK, STATUS_NEEDS_RESET};

pub const SCENARIO: Scenario = Scenario {
    name: "vblkhostile",
    run,
};

/// Queue size the driver asks for.
const QUEUE_SIZE: u16 = 16;
/// Data bytes of the `oversized` read: 8 MiB + 512 (tern takes at most 8 MiB).
const BIG: u64 = (8 << 20) + 512;
/// Request type no device knows.
const T_BOGUS: u32 = 0x55;

#[derive(Clone, Copy)]
enum Case {
    /// One sector at sector = capacity.
    PastEnd,
    /// Two sectors at sector = capacity - 1.
    Straddle,
    /// 512 bytes, then a zero-length data descriptor.
    ZeroLen,
    /// Two 1 KiB data descriptors that overlap by 512 bytes.
    Overlap,
    /// The data descriptor (512 bytes) starts at the header.
    OverHeader,
    /// One data descriptor of 8 MiB + 512 bytes.
    Oversized,
    /// Request type 0x55 (UNSUPP expected).
    BadType,
    /// One sector at sector u64::MAX (sector + 1 and sector * 512 + 512 wrap
    /// to 0).
    SectorMax,
}

/// The cases: name, case, whether only UNSUPP counts as the right answer.
const CASES: [(&str, Case, bool); 8] = [
    ("past_end", Case::PastEnd, false),
    ("straddle", Case::Straddle, false),
    ("zero_len", Case::ZeroLen, false),
    ("overlap", Case::Overlap, false),
    ("over_header", Case::OverHeader, false),
    ("oversized", Case::Oversized, false),
    ("bad_type", Case::BadType, true),
    ("sector_max", Case::SectorMax, false),
];

/// Memory of the hand-built requests.
struct Mem {
    /// Header at `hdr`, status byte at `hdr + 2048`.
    hdr: u64,
    /// Two pages for data; the recovery read uses the second.
    data: u64,
    big: u64,
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let timeout_ns = super::virtio_timeout_ns(ctx)?;
    let devs = super::discover_virtio(ctx)?;
    let (Some(hdr), Some(data), Some(big)) = (
        ctx.phys.alloc(4096, 4096),
        ctx.phys.alloc(2 * 4096, 4096),
        ctx.phys.alloc(BIG, 4096),
    ) else {
        fail!("no memory for the buffers (8 MiB + 12 KiB)");
    };
    let m = Mem { hdr, data, big };
    let mut transports = Line::<256>::new();
    let mut problems = Line::<256>::new();
    let (mut n, mut errors, mut recovered, mut reposted) = (0, 0, 0, 0);
    for d in devs.iter().filter(|d| d.kind == ID_BLK) {
        let sep = if n == 0 { "" } else { "," };
        let _ = write!(transports, "{sep}{}", d.transport_name());
        n += 1;
        let mut b: Option<Blk> = None;
        for (name, case, unsupp_only) in CASES {
            if b.is_none() {
                match Blk::start(d, &mut ctx.phys, QUEUE_SIZE, timeout_ns) {
                    Ok(blk) => b = Some(blk),
                    Err(why) => note(&mut problems, d, name, format_args!("start: {why}")),
                }
            }
            let Some(blk) = b.as_mut() else {
                continue;
            };
            let mut healthy = true;
            match hostile(blk, &m, case) {
                Ok(status) => {
                    let good = if unsupp_only {
                        status == S_UNSUPP
                    } else {
                        status == S_IOERR || status == S_UNSUPP
                    };
                    if good {
                        errors += 1;
                    } else {
                        note(&mut problems, d, name, format_args!("status {status}"));
                    }
                }
                Err(e) => {
                    note(&mut problems, d, name, format_args!("{e}"));
                    healthy = false;
                }
            }
            let st = d.status();
            if st & STATUS_NEEDS_RESET != 0 {
                note(&mut problems, d, name, format_args!("status={st:#x}"));
                healthy = false;
            } else if healthy {
                let unit = blk.unit();
                match blk.transfer(false, 0, m.data + 4096, unit) {
                    Ok(()) => recovered += 1,
                    Err(e) => {
                        note(&mut problems, d, name, format_args!("read after: {e}"));
                        healthy = false;
                    }
                }
            }
            if !healthy {
                let _ = d.reset();
                b = None;
            }
        }
        let _ = d.reset();
        match repost(d, &mut ctx.phys, &m, timeout_ns) {
            Ok(true) => reposted += 1,
            Ok(false) => note(
                &mut problems,
                d,
                "reposted",
                format_args!("no DEVICE_NEEDS_RESET"),
            ),
            Err(why) => note(&mut problems, d, "reposted", format_args!("{why}")),
        }
        let _ = d.reset();
    }
    if n == 0 {
        fail!("no virtio-blk device");
    }
    r.kv("devices", n);
    r.kv("transports", transports.as_str());
    r.kv("cases", CASES.len());
    r.kv("errors", errors);
    r.kv("recovered", recovered);
    r.kv("reposted", reposted);
    if !problems.as_str().is_empty() {
        fail!("{}", problems.as_str());
    }
    Ok(())
}

/// Appends `case@device: what` to the failure reasons.
fn note(problems: &mut Line<256>, d: &Device, case: &str, what: core::fmt::Arguments<'_>) {
    let sep = if problems.as_str().is_empty() {
        ""
    } else {
        "; "
    };
    let _ = write!(problems, "{sep}{case}@{d}: {what}");
}

/// Submits the malformed request `case` and returns its status.
fn hostile(b: &mut Blk, m: &Mem, case: Case) -> Result<u8, blk::Error> {
    let cap = b.capacity;
    let w = |addr, len| Buf {
        addr,
        len,
        device_writes: true,
    };
    let one = SECTOR as u32;
    let (kind, sector) = match case {
        Case::PastEnd => (T_IN, cap),
        Case::Straddle => (T_IN, cap.saturating_sub(1)),
        Case::BadType => (T_BOGUS, 0),
        Case::SectorMax => (T_IN, u64::MAX),
        _ => (T_IN, 0),
    };
    let mut data = [w(m.data, one); 2];
    let nd = match case {
        Case::Straddle => {
            data[0].len = 2 * one;
            1
        }
        Case::ZeroLen => {
            data[1] = w(m.data + SECTOR, 0);
            2
        }
        Case::Overlap => {
            data[0].len = 2 * one;
            data[1] = w(m.data + SECTOR, 2 * one);
            2
        }
        Case::OverHeader => {
            data[0].addr = m.hdr;
            1
        }
        Case::Oversized => {
            data[0] = w(m.big, BIG as u32);
            1
        }
        _ => 1,
    };
    let status = m.hdr + 2048;
    // SAFETY: the header page is ours and idle.
    unsafe {
        (m.hdr as *mut u32).write_volatile(kind);
        ((m.hdr + 4) as *mut u32).write_volatile(0);
        ((m.hdr + 8) as *mut u64).write_volatile(sector);
        (status as *mut u8).write_volatile(S_UNSET);
    }
    let mut chain = [w(0, 0); 4];
    chain[0] = Buf {
        addr: m.hdr,
        len: 16,
        device_writes: false,
    };
    chain[1..=nd].copy_from_slice(&data[..nd]);
    chain[nd + 1] = w(status, 1);
    b.raw(&chain[..nd + 2])?;
    // SAFETY: the request has completed.
    Ok(unsafe { (status as *const u8).read_volatile() })
}

/// Starts `d`, makes one read available four times (the same head) and
/// notifies; true when the device then flags DEVICE_NEEDS_RESET within the
/// timeout.
fn repost(d: &Device, pa: &mut PhysAlloc, m: &Mem, timeout_ns: u64) -> Result<bool, &'static str> {
    let mut b = Blk::start(d, pa, QUEUE_SIZE, timeout_ns)?;
    let status = m.hdr + 2048;
    // SAFETY: the header page is ours and idle (the device was reset).
    unsafe {
        (m.hdr as *mut u32).write_volatile(T_IN);
        ((m.hdr + 4) as *mut u32).write_volatile(0);
        ((m.hdr + 8) as *mut u64).write_volatile(0);
        (status as *mut u8).write_volatile(S_UNSET);
    }
    let chain = [
        Buf {
            addr: m.hdr,
            len: 16,
            device_writes: false,
        },
        Buf {
            addr: m.data,
            len: SECTOR as u32,
            device_writes: true,
        },
        Buf {
            addr: status,
            len: 1,
            device_writes: true,
        },
    ];
    let head = b.q.push(&chain)?;
    for _ in 0..3 {
        b.q.republish(head);
    }
    b.kick();
    let start = clock::now_ns();
    while clock::now_ns().wrapping_sub(start) <= timeout_ns {
        if d.status() & STATUS_NEEDS_RESET != 0 {
            return Ok(true);
        }
        pause();
    }
    Ok(false)
}
