//! `vnet`: the first virtio-net device (type 1, either transport): its
//! configuration (MAC, link status, MTU), then an echo exchange with a host
//! peer on the other side of the TAP device.
//!
//! The probe sends `probe.vnet_frames` (default 100) echo requests, one at a
//! time, and waits up to `probe.virtio_timeout_ms` for each reply. Even
//! sequence numbers go out as one descriptor (header and frame together),
//! odd ones as two. Every reply must carry the request's bytes. After 5
//! requests in a row without a reply the exchange stops.
//!
//! This module also holds the frame protocol shared with `vnethostile` and
//! `vnetbench` (README, "virtio-net frame protocol"): all frames from the
//! probe have ethertype 0x88B5, all from the peer 0x88B6; the first 8 payload
//! bytes are a magic naming the kind of frame.

use core::fmt::Write;

use super::{fail, Ctx, Fail, Line, Report, Scenario};
use crate::rt::clock;
use crate::rt::virtio::net::{self, Hdr, Net};
use crate::rt::virtio::{Device, ID_NET};

pub const SCENARIO: Scenario = Scenario { name: "vnet", run };

/// Ethertypes (IEEE local experimental 1 and 2).
pub(super) const ETH_PROBE: u16 = 0x88b5;
pub(super) const ETH_PEER: u16 = 0x88b6;
pub(super) const ETH_IPV4: u16 = 0x0800;
pub(super) const BROADCAST: [u8; 6] = [0xff; 6];
/// Ethernet header bytes.
pub(super) const ETH_HLEN: usize = 14;

/// Payload magics.
pub(super) const MAGIC_ECHO: &[u8; 8] = b"TERNPROB";
pub(super) const MAGIC_CTRL: &[u8; 8] = b"TERNCTRL";
pub(super) const MAGIC_SINK: &[u8; 8] = b"TERNSINK";
pub(super) const MAGIC_FLOOD: &[u8; 8] = b"TERNFLOD";
pub(super) const MAGIC_JUNK: &[u8; 8] = b"TERNJUNK";

/// Control commands (`TERNCTRL`); the peer's acknowledgement carries the
/// command with `CMD_ACK` set.
pub(super) const CMD_FLOOD_START: u32 = 1;
pub(super) const CMD_FLOOD_STOP: u32 = 2;
pub(super) const CMD_STATS: u32 = 3;
pub(super) const CMD_ACK: u32 = 0x8000_0000;

/// Echo frame lengths: 60 …1514 bytes (Ethernet header included, no FCS).
pub(super) const ECHO_MIN: usize = 60;
pub(super) const ECHO_MAX: usize = 1514;
/// Byte offset of the pattern in an echo frame.
const ECHO_PATTERN: usize = ETH_HLEN + 16;
/// Requests in a row without a reply before the exchange stops.
const MAX_LOST_IN_A_ROW: u32 = 5;
/// Size of the receive copy buffer (a 64 KiB GSO frame and then some).
pub(super) const RX_COPY: usize = 70 * 1024;

/// Length of echo request `seq`: 60 + (727·seq mod 1455), which visits every
/// length in 60..=1514 once per 1455 requests (seq 0: 60, seq 2: 1514).
pub(super) fn echo_len(seq: u32) -> usize {
    ECHO_MIN + (727 * seq as usize) % (ECHO_MAX - ECHO_MIN + 1)
}

/// Writes an Ethernet header.
pub(super) fn eth(buf: &mut [u8], dst: &[u8; 6], src: &[u8; 6], ethertype: u16) {
    buf[0..6].copy_from_slice(dst);
    buf[6..12].copy_from_slice(src);
    buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

pub(super) fn ethertype(f: &[u8]) -> u16 {
    if f.len() < ETH_HLEN {
        return 0;
    }
    u16::from_be_bytes([f[12], f[13]])
}

pub(super) fn le32(f: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([f[off], f[off + 1], f[off + 2], f[off + 3]])
}

/// Whether `f` is a frame of the peer with payload magic `magic`.
pub(super) fn from_peer(f: &[u8], magic: &[u8; 8]) -> bool {
    f.len() >= ETH_HLEN + 8 && ethertype(f) == ETH_PEER && &f[ETH_HLEN..ETH_HLEN + 8] == magic
}

/// Builds echo request `seq` from `mac` into `buf`; returns its length.
/// Payload: "TERNPROB", u32 LE seq, u32 LE frame length, then byte `i` of
/// the frame (i ≥ 30) is `seq as u8 ^ i as u8`.
pub(super) fn build_echo(buf: &mut [u8], mac: &[u8; 6], seq: u32) -> usize {
    let len = echo_len(seq);
    eth(buf, &BROADCAST, mac, ETH_PROBE);
    buf[ETH_HLEN..ETH_HLEN + 8].copy_from_slice(MAGIC_ECHO);
    buf[ETH_HLEN + 8..ETH_HLEN + 12].copy_from_slice(&seq.to_le_bytes());
    buf[ETH_HLEN + 12..ETH_HLEN + 16].copy_from_slice(&(len as u32).to_le_bytes());
    for (i, b) in buf[..len].iter_mut().enumerate().skip(ECHO_PATTERN) {
        *b = seq as u8 ^ i as u8;
    }
    len
}

/// Builds a 60-byte frame of the probe: ethertype 0x88B5 to broadcast,
/// `magic`, then `fields` (the first two as u32 LE, the rest as u64 LE; a
/// control frame is `cmd`, `token`, `arg`), zero padded.
pub(super) fn build_small(buf: &mut [u8], mac: &[u8; 6], magic: &[u8; 8], fields: &[u64]) -> usize {
    buf[..ECHO_MIN].fill(0);
    eth(buf, &BROADCAST, mac, ETH_PROBE);
    buf[ETH_HLEN..ETH_HLEN + 8].copy_from_slice(magic);
    let mut off = ETH_HLEN + 8;
    for (k, &v) in fields.iter().enumerate() {
        if k < 2 {
            buf[off..off + 4].copy_from_slice(&(v as u32).to_le_bytes());
            off += 4;
        } else {
            buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
            off += 8;
        }
    }
    ECHO_MIN
}

/// Buffers of the echo exchange.
pub(super) struct Bufs {
    pub tx: &'static mut [u8],
    pub rx: &'static mut [u8],
}

impl Bufs {
    pub fn alloc(ctx: &mut Ctx<'_>) -> Result<(Bufs, net::Mem), Fail> {
        let (Some(tx), Some(rx), Some(mem)) = (
            ctx.phys.alloc(4096, 4096),
            ctx.phys.alloc(RX_COPY as u64, 4096),
            net::Mem::alloc(&mut ctx.phys),
        ) else {
            fail!("no memory for the virtio-net buffers");
        };
        // SAFETY: fresh allocations of our RAM, used only through these
        // slices (the device never sees them: frames are copied).
        let bufs = unsafe {
            Bufs {
                tx: core::slice::from_raw_parts_mut(tx as *mut u8, 4096),
                rx: core::slice::from_raw_parts_mut(rx as *mut u8, RX_COPY),
            }
        };
        Ok((bufs, mem))
    }
}

/// How one echo request ended.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Echo {
    Good,
    /// A reply with this sequence number but wrong length, destination or
    /// bytes.
    Bad,
    Lost,
}

/// Sends echo request `seq` (as two descriptors if `split`) and waits for
/// its reply. Other frames are skipped; `others` counts them.
pub(super) fn echo(
    n: &mut Net,
    b: &mut Bufs,
    seq: u32,
    split: bool,
    others: &mut u32,
) -> Result<Echo, &'static str> {
    let len = build_echo(b.tx, &n.mac, seq);
    n.send(&Hdr::default(), &b.tx[..len], split)?;
    let start = clock::now_ns();
    loop {
        n.reap_tx()?;
        match n.recv(b.rx)? {
            Some(f) => {
                let r = &b.rx[..f.copied];
                if from_peer(r, MAGIC_ECHO)
                    && r.len() >= ECHO_PATTERN
                    && le32(r, ETH_HLEN + 8) == seq
                {
                    let good =
                        f.len == len && r[..6] == n.mac && r[ETH_HLEN..] == b.tx[ETH_HLEN..len];
                    return Ok(if good { Echo::Good } else { Echo::Bad });
                }
                *others += 1;
            }
            None => crate::rt::io::pause(),
        }
        if clock::now_ns().wrapping_sub(start) > n.timeout_ns {
            return Ok(Echo::Lost);
        }
    }
}

/// Sends control command `cmd` with `arg` (token `token`) until the peer
/// acknowledges it (again every 200 ms, for at most `virtio_timeout_ms` or
/// 1 s, whichever is longer); returns the acknowledgement's value. Frames
/// other than the acknowledgement are dropped.
pub(super) fn control(
    n: &mut Net,
    b: &mut Bufs,
    cmd: u32,
    token: u32,
    arg: u64,
) -> Result<u64, &'static str> {
    let limit = n.timeout_ns.max(1_000_000_000);
    let start = clock::now_ns();
    let mut last_try = None;
    loop {
        let now = clock::now_ns();
        if last_try.is_none_or(|t: u64| now.wrapping_sub(t) > 200_000_000) {
            let len = build_small(
                b.tx,
                &n.mac,
                MAGIC_CTRL,
                &[u64::from(cmd), u64::from(token), arg],
            );
            n.send(&Hdr::default(), &b.tx[..len], false)?;
            last_try = Some(now);
        }
        n.reap_tx()?;
        // A bounded batch, so that a flood cannot keep the loop from retrying.
        for _ in 0..256 {
            let Some(f) = n.recv(b.rx)? else {
                break;
            };
            let r = &b.rx[..f.copied];
            if from_peer(r, MAGIC_CTRL)
                && r.len() >= ETH_HLEN + 24
                && le32(r, ETH_HLEN + 8) == cmd | CMD_ACK
                && le32(r, ETH_HLEN + 12) == token
            {
                let mut v = [0; 8];
                v.copy_from_slice(&r[ETH_HLEN + 16..ETH_HLEN + 24]);
                return Ok(u64::from_le_bytes(v));
            }
        }
        if clock::now_ns().wrapping_sub(start) > limit {
            return Err("the host peer does not acknowledge a control frame");
        }
    }
}

/// The first virtio-net device, and how many there are.
pub(super) fn first_net(ctx: &mut Ctx<'_>) -> Result<(Device, usize), Fail> {
    let devs = super::discover_virtio(ctx)?;
    let n = devs.iter().filter(|d| d.kind == ID_NET).count();
    let first = devs.iter().find(|d| d.kind == ID_NET).copied();
    match first {
        Some(d) => Ok((d, n)),
        None => fail!("no virtio-net device"),
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub(super) fn mac_str(mac: &[u8; 6]) -> Line<24> {
    let mut l = Line::new();
    for (i, b) in mac.iter().enumerate() {
        let _ = write!(l, "{}{b:02x}", if i == 0 { "" } else { ":" });
    }
    l
}

/// Device keys shared by the net scenarios.
pub(super) fn report_device(r: &mut Report, d: &Device, devices: usize, n: &Net) {
    r.kv("devices", devices);
    r.kv("transport", d.transport_name());
    r.kv("mac", mac_str(&n.mac).as_str());
    r.kv("link", if n.link_up() { "up" } else { "down" });
    r.kv("mtu", n.mtu());
    r.kv("mtu_cfg", u8::from(n.mtu.is_some()));
    r.hex("features", n.features);
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let frames = ctx.param("vnet_frames", 100)?;
    if frames == 0 || frames > u64::from(u32::MAX) {
        fail!("probe.vnet_frames must be 1..2^32");
    }
    let timeout_ns = super::virtio_timeout_ns(ctx)?;
    let (d, devices) = first_net(ctx)?;
    let (mut b, mem) = Bufs::alloc(ctx)?;
    let res = echo_all(ctx, &d, devices, mem, &mut b, frames as u32, timeout_ns, r);
    let _ = d.reset();
    res
}

#[allow(clippy::too_many_arguments)]
fn echo_all(
    ctx: &mut Ctx<'_>,
    d: &Device,
    devices: usize,
    mem: net::Mem,
    b: &mut Bufs,
    frames: u32,
    timeout_ns: u64,
    r: &mut Report,
) -> Result<(), Fail> {
    let mut n = match Net::start(d, &mut ctx.phys, mem, 0, timeout_ns) {
        Ok(n) => n,
        Err(why) => fail!("{d}: start: {why}"),
    };
    report_device(r, d, devices, &n);
    let (mut sent, mut received, mut bad, mut others) = (0u32, 0u32, 0u32, 0u32);
    let (mut lost_in_a_row, mut rtt_sum, mut rtt_max) = (0, 0u64, 0u64);
    let mut problem = None;
    for seq in 0..frames {
        let start = clock::now_ns();
        let res = echo(&mut n, b, seq, seq % 2 == 1, &mut others);
        sent += 1;
        match res {
            Ok(Echo::Good) => {
                received += 1;
                lost_in_a_row = 0;
                let rtt = clock::now_ns().wrapping_sub(start);
                rtt_sum += rtt;
                rtt_max = rtt_max.max(rtt);
            }
            Ok(Echo::Bad) => {
                bad += 1;
                lost_in_a_row = 0;
            }
            Ok(Echo::Lost) => {
                lost_in_a_row += 1;
                if lost_in_a_row == MAX_LOST_IN_A_ROW {
                    problem = Some("no reply from the host peer");
                    break;
                }
            }
            Err(why) => {
                problem = Some(why);
                break;
            }
        }
    }
    r.kv("frames", frames);
    r.kv("sent", sent);
    r.kv("received", received);
    r.kv("bad", bad);
    r.kv("others", others);
    r.kv("rtt_us", rtt_sum / u64::from(received.max(1)) / 1000);
    r.kv("rtt_max_us", rtt_max / 1000);
    if let Some(why) = problem {
        fail!("{d}: {why} (after {sent} requests)");
    }
    if received != sent || bad != 0 {
        fail!("{d}: {} of {sent} echoes failed", sent - received);
    }
    Ok(())
}
