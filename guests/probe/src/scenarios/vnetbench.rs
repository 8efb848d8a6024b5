//! `vnetbench`: packet rate and TSO throughput of the first virtio-net device
//! (type 1, either transport) against the host peer (see `vnet` and the
//! README's frame protocol). Each test runs for `probe.vnet_ms` (default
//! 2000) ms; `probe.vnet_bench=tx,rx,tso,tso_rx` picks them (default all):
//! - `tx`: 64-byte `TERNSINK` frames to broadcast as fast as the device
//!   takes them (one descriptor each, all pointing at the same bytes; the
//!   ring is refilled when a quarter of it is free) → `tx_pps` (frames the
//!   device returned per second); then `STATS` → `tx_seen` (what the peer
//!   counted, a lower bound);
//! - `rx`: `FLOOD_START` 64 → the peer sends 64-byte `TERNFLOD` frames to the
//!   probe's MAC until `FLOOD_STOP` → `rx_pps` (flood frames received per
//!   second) and `rx_sent` (frames the peer sent);
//! - `tso` (needs HOST_TSO4): TCP/IPv4 GSO frames of 45 × 1448 = 65160 bytes
//!   of payload (10.99.0.1 → 10.99.0.2, to broadcast; header: NEEDS_CSUM,
//!   TCPV4, hdr_len 54, gso_size 1448, csum 34/16), header and frame in two
//!   descriptors → `tso_tx_mbps` (10^6 payload bytes per second, one
//!   decimal), `tso_seen` (IPv4 frames the peer counted);
//! - `tso_rx`: `FLOOD_START` 65214 → the peer sends TCP/IPv4 frames of 65214
//!   bytes as GSO packets; with GUEST_TSO4 they arrive whole (spanning
//!   several merged buffers), otherwise segmented → `tso_rx_mbps` (TCP
//!   payload), `rx_gso_frames` (frames received), `rx_max_buffers` (most
//!   buffers one frame spanned).
//!
//! Without HOST_TSO4, `tso_tx_mbps=-`. FAIL when the device takes or
//! delivers nothing in a test, or the peer does not answer.

use core::fmt::Write;

use super::vnet::{self, Bufs, BROADCAST, ETH_HLEN, ETH_IPV4, MAGIC_FLOOD, MAGIC_SINK};
use super::{fail, Ctx, Fail, Line, Report, Scenario};
use crate::rt::clock;
use crate::rt::virtio::net::{self, Hdr, Net, GSO_TCPV4, HDR_F_NEEDS_CSUM, HDR_LEN};
use crate::rt::virtio::Buf;

pub const SCENARIO: Scenario = Scenario {
    name: "vnetbench",
    run,
};

/// Frame length of the packet-rate tests.
const SMALL: usize = 64;
/// TSO frames: headers, segment size, segments.
pub(super) const TSO_HDRS: usize = 54;
pub(super) const TSO_MSS: usize = 1448;
pub(super) const TSO_SEGS: usize = 45;
pub(super) const TSO_FRAME: usize = TSO_HDRS + TSO_MSS * TSO_SEGS;
/// Addresses of the TSO frames.
const SRC_IP: [u8; 4] = [10, 99, 0, 1];
const DST_IP: [u8; 4] = [10, 99, 0, 2];
/// Bytes of a flood frame the probe copies out (enough for the headers).
const PEEK: usize = 64;

struct Tests {
    tx: bool,
    rx: bool,
    tso: bool,
    tso_rx: bool,
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let ms = ctx.param("vnet_ms", 2000)?;
    if ms == 0 {
        fail!("probe.vnet_ms must be at least 1");
    }
    let mut t = Tests {
        tx: false,
        rx: false,
        tso: false,
        tso_rx: false,
    };
    for name in ctx
        .params
        .get("vnet_bench")
        .unwrap_or("tx,rx,tso,tso_rx")
        .split(',')
    {
        match name {
            "tx" => t.tx = true,
            "rx" => t.rx = true,
            "tso" => t.tso = true,
            "tso_rx" => t.tso_rx = true,
            "" => {}
            _ => fail!("bad probe.vnet_bench test {name} (tx, rx, tso, tso_rx)"),
        }
    }
    let timeout_ns = super::virtio_timeout_ns(ctx)?;
    let (d, devices) = vnet::first_net(ctx)?;
    let (mut b, mem) = Bufs::alloc(ctx)?;
    let Some(area) = ctx.phys.alloc(TSO_FRAME as u64 + 4096, 4096) else {
        fail!("no memory for the frames");
    };
    r.kv("ms", ms);
    let mut n = match Net::start(
        &d,
        &mut ctx.phys,
        mem,
        net::WANTED_TX_TSO | net::WANTED_RX_TSO,
        timeout_ns,
    ) {
        Ok(n) => n,
        Err(why) => fail!("{d}: start: {why}"),
    };
    vnet::report_device(r, &d, devices, &n);
    let res = bench(&mut n, &mut b, area, ms.saturating_mul(1_000_000), &t, r);
    let _ = d.reset();
    if let Err(why) = res {
        fail!("{d}: {}", why.as_str());
    }
    Ok(())
}

/// Runs the tests; the error names the test.
fn bench(
    n: &mut Net,
    b: &mut Bufs,
    area: u64,
    ns: u64,
    t: &Tests,
    r: &mut Report,
) -> Result<(), Line<128>> {
    let mut token = 0u32;
    let mut ctl = |n: &mut Net, b: &mut Bufs, cmd, arg, what: &str| {
        token += 1;
        vnet::control(n, b, cmd, token, arg).map_err(|e| {
            let mut l = Line::<128>::new();
            let _ = write!(l, "{what}: {e}");
            l
        })
    };
    // Resets the peer's counters (and checks it is there).
    ctl(n, b, vnet::CMD_STATS, 0, "stats")?;
    let small = area;
    let tso_hdr = area + 2048;
    let tso = area + 4096;
    // SAFETY: the area is ours; no chain uses it yet.
    unsafe {
        Hdr::default().write(small);
        let f = core::slice::from_raw_parts_mut((small + HDR_LEN as u64) as *mut u8, SMALL);
        vnet::build_small(f, &n.mac, MAGIC_SINK, &[]);
        f[vnet::ECHO_MIN..].fill(0);
        tso_header().write(tso_hdr);
        build_tso(
            core::slice::from_raw_parts_mut(tso as *mut u8, TSO_FRAME),
            &BROADCAST,
            &n.mac,
            SRC_IP,
            DST_IP,
        );
    }
    let rd = |addr, len| Buf {
        addr,
        len,
        device_writes: false,
    };
    if t.tx {
        let chain = [rd(small, (HDR_LEN + SMALL) as u32)];
        let (frames, el) = blast(n, &chain, ns).map_err(|e| test_err("tx", e))?;
        if frames == 0 {
            return Err(test_err("tx", "the device took no frame"));
        }
        r.kv("tx_pps", frames * 1_000_000_000 / el);
        r.kv("tx_seen", ctl(n, b, vnet::CMD_STATS, 0, "tx stats")?);
    }
    if t.rx {
        let c = rx_flood(n, b, ns, SMALL, &mut ctl)?;
        if c.frames == 0 {
            return Err(test_err("rx", "no flood frame arrived"));
        }
        r.kv("rx_pps", c.frames * 1_000_000_000 / c.ns);
        r.kv("rx_sent", c.sent);
    }
    if t.tso {
        if n.has(net::F_HOST_TSO4) {
            let chain = [rd(tso_hdr, HDR_LEN as u32), rd(tso, TSO_FRAME as u32)];
            let (frames, el) = blast(n, &chain, ns).map_err(|e| test_err("tso", e))?;
            if frames == 0 {
                return Err(test_err("tso", "the device took no frame"));
            }
            let bytes = frames * (TSO_FRAME - TSO_HDRS) as u64;
            tenths(r, "tso_tx_mbps", bytes, el);
            r.kv("tso_seen", ctl(n, b, vnet::CMD_STATS, 0, "tso stats")?);
        } else {
            r.kv("tso_tx_mbps", "-");
        }
    }
    if t.tso_rx {
        let c = rx_flood(n, b, ns, TSO_FRAME, &mut ctl)?;
        if c.frames == 0 {
            return Err(test_err("tso_rx", "no flood frame arrived"));
        }
        tenths(r, "tso_rx_mbps", c.bytes, c.ns);
        r.kv("rx_gso_frames", c.frames);
        r.kv("rx_max_buffers", c.max_buffers);
        r.kv("tso_rx_sent", c.sent);
    }
    Ok(())
}

fn test_err(test: &str, e: &str) -> Line<128> {
    let mut l = Line::new();
    let _ = write!(l, "{test}: {e}");
    l
}

/// `key=M.m` for `bytes` in `ns` (10^6 bytes per second).
fn tenths(r: &mut Report, key: &str, bytes: u64, ns: u64) {
    let t = bytes * 10_000 / ns.max(1);
    r.kv(key, format_args!("{}.{}", t / 10, t % 10));
}

/// The virtio-net header of the TSO frames.
pub(super) fn tso_header() -> Hdr {
    Hdr {
        flags: HDR_F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: TSO_HDRS as u16,
        gso_size: TSO_MSS as u16,
        csum_start: (ETH_HLEN + 20) as u16,
        csum_offset: 16,
        num_buffers: 0,
    }
}

/// One's-complement sum of big-endian 16-bit words, not folded.
fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// A TCP/IPv4 frame of `f.len()` bytes: IPv4 header with its checksum, TCP
/// header (ACK|PSH) whose checksum field holds the pseudo-header sum, as
/// for CHECKSUM_PARTIAL; payload byte `i` is `i as u8`.
pub(super) fn build_tso(f: &mut [u8], dst: &[u8; 6], src: &[u8; 6], sip: [u8; 4], dip: [u8; 4]) {
    let len = f.len();
    vnet::eth(f, dst, src, ETH_IPV4);
    let ip = &mut f[ETH_HLEN..ETH_HLEN + 20];
    ip.copy_from_slice(&[
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    ip[2..4].copy_from_slice(&((len - ETH_HLEN) as u16).to_be_bytes());
    ip[12..16].copy_from_slice(&sip);
    ip[16..20].copy_from_slice(&dip);
    let c = !fold(sum16(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp_len = len - ETH_HLEN - 20;
    let tcp = &mut f[ETH_HLEN + 20..TSO_HDRS];
    tcp.copy_from_slice(&[
        0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    let pseudo = sum16(&sip) + sum16(&dip) + 6 + tcp_len as u32;
    tcp[16..18].copy_from_slice(&fold(pseudo).to_be_bytes());
    for (i, x) in f[TSO_HDRS..].iter_mut().enumerate() {
        *x = i as u8;
    }
}

/// Keeps tx0 full of `chain` for `ns`: refills once a quarter of the ring
/// (or the chain) is free, one notification per refill. Returns the chains
/// the device returned in that time and the time taken.
fn blast(n: &mut Net, chain: &[Buf], ns: u64) -> Result<(u64, u64), &'static str> {
    let batch = (usize::from(n.tx.size) / 4).max(chain.len());
    let start = clock::now_ns();
    let mut done = 0;
    let elapsed = loop {
        let el = clock::now_ns().wrapping_sub(start);
        if el >= ns {
            break el;
        }
        if usize::from(n.tx.num_free()) >= batch {
            while usize::from(n.tx.num_free()) >= chain.len() {
                n.push_tx(chain)?;
            }
            n.kick_tx();
        }
        done += u64::from(n.reap_tx()?);
    };
    n.wait_tx_idle()?;
    Ok((done, elapsed.max(1)))
}

/// What an rx flood brought.
#[derive(Default)]
struct Counted {
    frames: u64,
    /// TCP payload bytes (IPv4 frames).
    bytes: u64,
    max_buffers: u16,
    ns: u64,
    /// Frames the peer says it sent.
    sent: u64,
}

/// Asks the peer to flood `len`-byte frames, counts those that arrive in
/// `ns`, and stops the flood.
fn rx_flood(
    n: &mut Net,
    b: &mut Bufs,
    ns: u64,
    len: usize,
    ctl: &mut impl FnMut(&mut Net, &mut Bufs, u32, u64, &str) -> Result<u64, Line<128>>,
) -> Result<Counted, Line<128>> {
    let what = if len > SMALL { "tso_rx" } else { "rx" };
    ctl(n, b, vnet::CMD_FLOOD_START, len as u64, what)?;
    let mut c = Counted::default();
    let start = clock::now_ns();
    loop {
        let el = clock::now_ns().wrapping_sub(start);
        if el >= ns {
            c.ns = el.max(1);
            break;
        }
        let f = match n.recv(&mut b.rx[..PEEK]) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                // Stop the flood before giving up.
                let _ = ctl(n, b, vnet::CMD_FLOOD_STOP, 0, what);
                return Err(test_err(what, e));
            }
        };
        let p = &b.rx[..f.copied];
        if len == SMALL && vnet::from_peer(p, MAGIC_FLOOD) {
            c.frames += 1;
        } else if len > SMALL && vnet::ethertype(p) == ETH_IPV4 && p[..6] == n.mac {
            c.frames += 1;
            c.bytes += f.len.saturating_sub(TSO_HDRS) as u64;
            c.max_buffers = c.max_buffers.max(f.buffers);
        }
    }
    c.sent = ctl(n, b, vnet::CMD_FLOOD_STOP, 0, what)?;
    Ok(c)
}
