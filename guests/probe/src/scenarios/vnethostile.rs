//! `vnethostile`: malformed transmit chains on tx0 of the first virtio-net
//! device (type 1, either transport), each followed by a normal echo
//! exchange with the host peer (see `vnet`) that must still work on the same
//! queues.
//!
//! The cases (`CASES`; the frames are 60-byte `TERNJUNK` frames the peer
//! ignores unless said otherwise, header and frame in separate descriptors):
//! - `bad_gso`: gso_type 0x55;
//! - `gso_hdr_len`: NEEDS_CSUM + GSO TCPV4 (gso_size 1448, csum 34/16) with
//!   hdr_len 2000 on a 200-byte frame;
//! - `csum_start`: NEEDS_CSUM with csum_start 5000 on a 100-byte frame;
//! - `oversized`: a frame of MTU + 14 + 100 bytes, no GSO;
//! - `no_frame`: one descriptor holding only the 12-byte header;
//! - `loop`: header → frame → header …, both with NEXT;
//! - `zero_desc`: header, a zero-length descriptor, then the frame.
//!
//! After a case the probe waits up to `probe.virtio_timeout_ms` for the chain
//! to come back in the used ring (`returned`), or for DEVICE_NEEDS_RESET.
//! The case counts as `recovered` when the device is not flagged and the
//! echo that follows gets its reply. Otherwise the device is reset and
//! started again before the next case (`resets`, `reset_cases`).

use core::fmt::Write;

use super::vnet::{self, Bufs, Echo, BROADCAST, ETH_HLEN, ETH_PROBE, MAGIC_JUNK};
use super::{fail, Ctx, Fail, Line, Report, Scenario};
use crate::rt::clock;
use crate::rt::io::pause;
use crate::rt::virtio::net::{self, Hdr, Net, GSO_TCPV4, HDR_F_NEEDS_CSUM, HDR_LEN};
use crate::rt::virtio::{Buf, Device, Virtqueue, STATUS_NEEDS_RESET};

pub const SCENARIO: Scenario = Scenario {
    name: "vnethostile",
    run,
};

const DESC_F_NEXT: u16 = 1;
/// Sequence number of the first recovery echo (case `k` uses BASE + k).
const SEQ_BASE: u32 = 0x1000;
/// Bytes of the hostile-frame area (an MTU of up to 64 KiB, and the header).
const AREA: u64 = 72 * 1024;
/// Where the frame starts in the area (the header is at 0).
const FRAME_OFF: u64 = 256;

#[derive(Clone, Copy)]
enum Case {
    BadGso,
    GsoHdrLen,
    CsumStart,
    Oversized,
    NoFrame,
    Loop,
    ZeroDesc,
}

/// The cases, in order; add new ones here and in `chain`.
const CASES: [(&str, Case); 7] = [
    ("bad_gso", Case::BadGso),
    ("gso_hdr_len", Case::GsoHdrLen),
    ("csum_start", Case::CsumStart),
    ("oversized", Case::Oversized),
    ("no_frame", Case::NoFrame),
    ("loop", Case::Loop),
    ("zero_desc", Case::ZeroDesc),
];

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let timeout_ns = super::virtio_timeout_ns(ctx)?;
    let (d, devices) = vnet::first_net(ctx)?;
    let (mut b, mem) = Bufs::alloc(ctx)?;
    let Some(area) = ctx.phys.alloc(AREA, 4096) else {
        fail!("no memory for the hostile frames");
    };
    let res = cases(ctx, &d, devices, mem, &mut b, area, timeout_ns, r);
    let _ = d.reset();
    res
}

/// Appends `case: what` to a list.
fn note(l: &mut Line<256>, case: &str, what: core::fmt::Arguments<'_>) {
    let sep = if l.as_str().is_empty() { "" } else { "; " };
    let _ = write!(l, "{sep}{case}: {what}");
}

/// The list, or "none" when empty.
fn or_none(l: &Line<128>) -> &str {
    match l.as_str() {
        "" => "none",
        s => s,
    }
}

fn add(l: &mut Line<128>, name: &str) {
    let sep = if l.as_str().is_empty() { "" } else { "," };
    let _ = write!(l, "{sep}{name}");
}

fn start(ctx: &mut Ctx<'_>, d: &Device, mem: net::Mem, timeout_ns: u64) -> Result<Net, Fail> {
    match Net::start(d, &mut ctx.phys, mem, net::WANTED_TX_TSO, timeout_ns) {
        Ok(n) => Ok(n),
        Err(why) => fail!("{d}: start: {why}"),
    }
}

#[allow(clippy::too_many_arguments)]
fn cases(
    ctx: &mut Ctx<'_>,
    d: &Device,
    devices: usize,
    mem: net::Mem,
    b: &mut Bufs,
    area: u64,
    timeout_ns: u64,
    r: &mut Report,
) -> Result<(), Fail> {
    let mut n = start(ctx, d, mem, timeout_ns)?;
    vnet::report_device(r, d, devices, &n);
    let mut others = 0;
    // The device must echo before the cases start, or nothing is learnt.
    match vnet::echo(&mut n, b, SEQ_BASE - 1, false, &mut others) {
        Ok(Echo::Good) => {}
        Ok(_) => fail!("{d}: no echo from the host peer before the cases"),
        Err(why) => fail!("{d}: echo before the cases: {why}"),
    }
    let (mut recovered, mut returned) = (0, 0);
    let mut problems = Line::<256>::new();
    let mut reset_cases = Line::<128>::new();
    let mut lost = Line::<128>::new();
    let mut resets = 0;
    for (k, (name, case)) in CASES.into_iter().enumerate() {
        let mut healthy = true;
        match hostile(&mut n, area, case) {
            Ok(true) => returned += 1,
            Ok(false) => add(&mut lost, name),
            Err(why) => {
                note(&mut problems, name, format_args!("{why}"));
                healthy = false;
            }
        }
        let st = d.status();
        if st & STATUS_NEEDS_RESET != 0 {
            note(&mut problems, name, format_args!("status={st:#x}"));
            healthy = false;
        } else if healthy {
            let seq = SEQ_BASE + k as u32;
            match vnet::echo(&mut n, b, seq, k % 2 == 1, &mut others) {
                Ok(Echo::Good) => recovered += 1,
                Ok(Echo::Bad) => {
                    note(&mut problems, name, format_args!("bad echo after"));
                    healthy = false;
                }
                Ok(Echo::Lost) => {
                    note(&mut problems, name, format_args!("no echo after"));
                    healthy = false;
                }
                Err(why) => {
                    note(&mut problems, name, format_args!("echo after: {why}"));
                    healthy = false;
                }
            }
        }
        if !healthy {
            resets += 1;
            add(&mut reset_cases, name);
            let _ = d.reset();
            n = start(ctx, d, mem, timeout_ns)?;
        }
    }
    r.kv("cases", CASES.len());
    r.kv("recovered", recovered);
    r.kv("returned", returned);
    r.kv("resets", resets);
    r.kv("reset_cases", or_none(&reset_cases));
    r.kv("lost", or_none(&lost));
    r.kv("others", others);
    if recovered != CASES.len() {
        fail!("{d}: {}", problems.as_str());
    }
    Ok(())
}

/// Writes the 60…`len`-byte junk frame of `case` at `area + FRAME_OFF`.
fn junk(n: &Net, area: u64, case: Case, len: usize) {
    // SAFETY: the area is ours and no chain in flight uses it (the previous
    // case's chain came back or the device was reset).
    let f = unsafe { core::slice::from_raw_parts_mut((area + FRAME_OFF) as *mut u8, len) };
    f.fill(0);
    vnet::eth(f, &BROADCAST, &n.mac, ETH_PROBE);
    f[ETH_HLEN..ETH_HLEN + 8].copy_from_slice(MAGIC_JUNK);
    f[ETH_HLEN + 8] = case as u8;
}

/// Submits the malformed chain `case`, notifies, and waits for it to come
/// back (Ok(true)), for DEVICE_NEEDS_RESET or the timeout (Ok(false)).
fn hostile(n: &mut Net, area: u64, case: Case) -> Result<bool, &'static str> {
    n.wait_tx_idle()?;
    let mut hdr = Hdr::default();
    let mut len = 60;
    match case {
        Case::BadGso => hdr.gso_type = 0x55,
        Case::GsoHdrLen => {
            hdr = Hdr {
                flags: HDR_F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: 2000,
                gso_size: 1448,
                csum_start: 34,
                csum_offset: 16,
                num_buffers: 0,
            };
            len = 200;
        }
        Case::CsumStart => {
            hdr.flags = HDR_F_NEEDS_CSUM;
            hdr.csum_start = 5000;
            hdr.csum_offset = 16;
            len = 100;
        }
        Case::Oversized => len = usize::from(n.mtu()) + ETH_HLEN + 100,
        _ => {}
    }
    if FRAME_OFF + len as u64 > AREA {
        return Err("MTU too large for the oversized frame");
    }
    junk(n, area, case, len);
    // SAFETY: the area's first bytes are ours and idle.
    unsafe { hdr.write(area) };
    let rd = |addr, len| Buf {
        addr,
        len,
        device_writes: false,
    };
    let h = rd(area, HDR_LEN as u32);
    let f = rd(area + FRAME_OFF, len as u32);
    let loop_edit = |q: &Virtqueue, head: u16| {
        // Point the frame descriptor back at the header.
        // SAFETY: the chain's descriptors are written but not yet published.
        unsafe {
            let second = ((q.desc_addr(head) + 14) as *const u16).read_volatile();
            let d = q.desc_addr(second);
            ((d + 12) as *mut u16).write_volatile(DESC_F_NEXT);
            ((d + 14) as *mut u16).write_volatile(head);
        }
    };
    let head = match case {
        Case::NoFrame => n.push_tx(&[h])?,
        Case::Loop => n.push_tx_edited(&[h, f], loop_edit)?,
        Case::ZeroDesc => n.push_tx(&[h, rd(area + FRAME_OFF, 0), f])?,
        _ => n.push_tx(&[h, f])?,
    };
    n.kick_tx();
    let start = clock::now_ns();
    while !n.tx.has_used() {
        if n.dev.status() & STATUS_NEEDS_RESET != 0
            || clock::now_ns().wrapping_sub(start) > n.timeout_ns
        {
            // Never returned: stop waiting for it.
            n.forget_tx();
            return Ok(false);
        }
        pause();
    }
    if let Case::Loop = case {
        // Undo the loop before `pop_used` walks the chain.
        let second = {
            // SAFETY: the device has returned the chain.
            unsafe { ((n.tx.desc_addr(head) + 14) as *const u16).read_volatile() }
        };
        // SAFETY: as above.
        unsafe { ((n.tx.desc_addr(second) + 12) as *mut u16).write_volatile(0) };
    }
    n.reap_tx()?;
    Ok(true)
}
