//! The host end of the frame protocol (guests/probe/README.md, "virtio-net frame protocol").

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::NetNs;

/// Frame protocol (guests/probe/README.md): ethertypes, magics, control commands.
const ETH_PROBE: u16 = 0x88b5;
const ETH_PEER: u16 = 0x88b6;
const ETH_IPV4: u16 = 0x0800;
const MAGIC_ECHO: &[u8; 8] = b"TERNPROB";
const MAGIC_CTRL: &[u8; 8] = b"TERNCTRL";
const MAGIC_SINK: &[u8; 8] = b"TERNSINK";
const MAGIC_FLOOD: &[u8; 8] = b"TERNFLOD";
const CMD_FLOOD_START: u32 = 1;
const CMD_FLOOD_STOP: u32 = 2;
const CMD_STATS: u32 = 3;
const CMD_ACK: u32 = 0x8000_0000;
/// The peer's source MAC (locally administered).
pub const PEER_MAC: [u8; 6] = [0x02, 0x74, 0x65, 0x72, 0x6e, 0x01];
/// TSO flood frames: headers, segment size, segments (as the probe's `vnetbench`).
const TSO_HDRS: usize = 54;
const TSO_MSS: usize = 1448;

/// Socket options not in every libc version.
const SOL_PACKET: libc::c_int = 263;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const PACKET_OUTGOING: u8 = 4;
const SO_RCVBUFFORCE: libc::c_int = 33;

/// What the peer saw and did.
#[derive(Debug, Default, Clone)]
pub struct PeerStats {
    /// Echo requests answered, and those whose length or pattern was wrong (answered too).
    pub echoed: u64,
    pub echo_bad: u64,
    /// Control frames handled (retries of an acknowledged one included).
    pub control: u64,
    /// `TERNSINK` frames and IPv4 frames (with bytes) from the probe.
    pub sink: u64,
    pub ipv4: u64,
    pub ipv4_bytes: u64,
    /// Largest frame received.
    pub max_frame: usize,
    /// Other frames of the probe (malformed-frame leftovers and the like).
    pub other: u64,
    /// Flood frames sent, and sends that failed (ENOBUFS …).
    pub flood_sent: u64,
    pub send_errors: u64,
}

/// The host end of the frame protocol, in a thread inside the namespace.
pub struct Peer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<io::Result<PeerStats>>>,
}

impl Peer {
    /// Starts the peer on `ns`'s TAP device; returns once its sockets are bound.
    pub fn start(ns: &NetNs) -> io::Result<Peer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (path, tap, s) = (ns.path(), ns.tap.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let sock = PeerSocket::open(&path, &tap);
            let _ = tx.send(sock.is_ok());
            sock?.serve(&s)
        });
        if rx.recv() != Ok(true) {
            return Err(match handle.join() {
                Ok(Err(e)) => io::Error::new(e.kind(), format!("host peer: {e}")),
                _ => io::Error::other("host peer thread died"),
            });
        }
        Ok(Peer {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the peer and returns what it saw.
    pub fn stop(mut self) -> io::Result<PeerStats> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("peer running");
        match handle.join() {
            Ok(r) => r.map_err(|e| io::Error::new(e.kind(), format!("host peer: {e}"))),
            Err(_) => Err(io::Error::other("host peer thread panicked")),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn cvt(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

fn setsockopt_int(fd: &OwnedFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: `v` outlives the call and its size is passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

fn sockaddr_ll(ifindex: i32, protocol: u16) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
    let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    a.sll_family = libc::AF_PACKET as u16;
    a.sll_protocol = protocol.to_be();
    a.sll_ifindex = ifindex;
    a
}

struct PeerSocket {
    /// Bound to the TAP for all protocols: receives, and sends plain frames.
    raw: OwnedFd,
    /// Unbound, with PACKET_VNET_HDR: sends GSO frames (virtio_net_hdr + frame).
    gso: OwnedFd,
    ifindex: i32,
}

/// Flooding state.
struct Flood {
    len: usize,
    dst: [u8; 6],
    seq: u32,
    sent: u64,
}

impl PeerSocket {
    /// Enters the namespace at `ns_path` (this thread only) and opens the sockets on `tap`.
    fn open(ns_path: &str, tap: &str) -> io::Result<PeerSocket> {
        let f = File::open(ns_path)?;
        cvt(
            // SAFETY: setns on a namespace file; affects only the calling thread.
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            "setns",
        )?;
        let name = CString::new(tap).expect("tap name");
        // SAFETY: `name` is a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(io::Error::other(format!("no interface {tap} in {ns_path}")));
        }
        let socket = |proto: u16| -> io::Result<OwnedFd> {
            let fd = cvt(
                // SAFETY: plain socket(2); the descriptor is owned below.
                unsafe {
                    libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                        i32::from(proto.to_be()),
                    )
                },
                "socket(AF_PACKET)",
            )?;
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let raw = socket(libc::ETH_P_ALL as u16)?;
        let addr = sockaddr_ll(ifindex, libc::ETH_P_ALL as u16);
        cvt(
            // SAFETY: `addr` is a valid sockaddr_ll of the given size.
            unsafe {
                libc::bind(
                    raw.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            },
            "bind(tap)",
        )?;
        if !setsockopt_int(&raw, libc::SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20) {
            setsockopt_int(&raw, libc::SOL_SOCKET, libc::SO_RCVBUF, 16 << 20);
        }
        // Our own floods need not come back to us (older kernels: filtered by pkttype).
        setsockopt_int(&raw, SOL_PACKET, PACKET_IGNORE_OUTGOING, 1);
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        // SAFETY: `tv` outlives the call and its size is passed.
        unsafe {
            libc::setsockopt(
                raw.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        let gso = socket(0)?;
        if !setsockopt_int(&gso, SOL_PACKET, PACKET_VNET_HDR, 1) {
            return Err(io::Error::other("PACKET_VNET_HDR not supported"));
        }
        Ok(PeerSocket { raw, gso, ifindex })
    }

    /// Receives one frame into `buf` (None on timeout, EAGAIN or an outgoing frame).
    fn recv(&self, buf: &mut [u8], nonblocking: bool) -> io::Result<Option<usize>> {
        // SAFETY: sockaddr_ll is plain data.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: `buf` and `from` are valid for the sizes passed.
        let n = unsafe {
            libc::recvfrom(
                self.raw.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags | libc::MSG_TRUNC,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        if from.sll_pkttype == PACKET_OUTGOING {
            return Ok(None);
        }
        Ok(Some((n as usize).min(buf.len())))
    }

    fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: `frame` is valid for its length.
        unsafe { libc::send(self.raw.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) >= 0 }
    }

    /// Sends `vnet_hdr + frame` (a 10-byte struct virtio_net_hdr first) as one GSO packet.
    fn send_gso(&self, packet: &[u8]) -> bool {
        let addr = sockaddr_ll(self.ifindex, ETH_IPV4);
        // SAFETY: `packet` and `addr` are valid for the sizes passed.
        unsafe {
            libc::sendto(
                self.gso.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            ) >= 0
        }
    }

    /// The peer loop: answers echo and control frames, counts the rest, floods on demand.
    fn serve(&self, stop: &AtomicBool) -> io::Result<PeerStats> {
        let mut st = PeerStats::default();
        let mut buf = vec![0u8; 128 * 1024];
        let mut flood: Option<Flood> = None;
        let mut flood_frame = Vec::new();
        // Last acknowledgement per command (cmd, token, value): a retried request gets the
        // same answer without running again.
        let mut acks: Vec<(u32, u32, u64)> = Vec::new();
        let mut last_flood_sent = 0;
        let mut seen = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if let Some(f) = flood.as_mut() {
                for _ in 0..32 {
                    set_flood_seq(&mut flood_frame, f);
                    let ok = if f.len > 1514 {
                        self.send_gso(&flood_frame)
                    } else {
                        self.send(&flood_frame)
                    };
                    if ok {
                        f.sent += 1;
                        st.flood_sent += 1;
                    } else {
                        st.send_errors += 1;
                        std::thread::yield_now();
                    }
                    f.seq = f.seq.wrapping_add(1);
                }
            }
            // While flooding, only look at what is already there.
            let nonblocking = flood.is_some();
            let Some(n) = self.recv(&mut buf, nonblocking)? else {
                continue;
            };
            let frame = &buf[..n];
            st.max_frame = st.max_frame.max(n);
            if n < 14 {
                continue;
            }
            let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
            if ethertype == ETH_IPV4 {
                st.ipv4 += 1;
                st.ipv4_bytes += n as u64;
                seen += 1;
                continue;
            }
            if ethertype != ETH_PROBE || n < 22 {
                continue;
            }
            let magic = &frame[14..22];
            if magic == MAGIC_ECHO {
                st.echoed += u64::from(echo_ok(frame));
                st.echo_bad += u64::from(!echo_ok(frame));
                let mut reply = frame.to_vec();
                reply[0..6].copy_from_slice(&frame[6..12]);
                reply[6..12].copy_from_slice(&PEER_MAC);
                reply[12..14].copy_from_slice(&ETH_PEER.to_be_bytes());
                if !self.send(&reply) {
                    st.send_errors += 1;
                }
            } else if magic == MAGIC_SINK {
                st.sink += 1;
                seen += 1;
            } else if magic == MAGIC_CTRL && n >= 38 {
                st.control += 1;
                let cmd = le32(frame, 22);
                let token = le32(frame, 26);
                let arg = u64::from_le_bytes(frame[30..38].try_into().unwrap());
                let value = match acks.iter().find(|a| a.0 == cmd && a.1 == token) {
                    Some(a) => a.2,
                    None => {
                        let v = match cmd {
                            CMD_FLOOD_START => {
                                let mut dst = [0; 6];
                                dst.copy_from_slice(&frame[6..12]);
                                let f = Flood {
                                    len: (arg as usize).clamp(60, 65535),
                                    dst,
                                    seq: 0,
                                    sent: 0,
                                };
                                flood_frame = build_flood(&f);
                                flood = Some(f);
                                0
                            }
                            CMD_FLOOD_STOP => {
                                if let Some(f) = flood.take() {
                                    last_flood_sent = f.sent;
                                }
                                last_flood_sent
                            }
                            CMD_STATS => std::mem::take(&mut seen),
                            _ => u64::MAX,
                        };
                        acks.retain(|a| a.0 != cmd);
                        acks.push((cmd, token, v));
                        v
                    }
                };
                let mut ack = vec![0u8; 60];
                ack[0..6].copy_from_slice(&frame[6..12]);
                ack[6..12].copy_from_slice(&PEER_MAC);
                ack[12..14].copy_from_slice(&ETH_PEER.to_be_bytes());
                ack[14..22].copy_from_slice(MAGIC_CTRL);
                ack[22..26].copy_from_slice(&(cmd | CMD_ACK).to_le_bytes());
                ack[26..30].copy_from_slice(&token.to_le_bytes());
                ack[30..38].copy_from_slice(&value.to_le_bytes());
                if !self.send(&ack) {
                    st.send_errors += 1;
                }
            } else {
                st.other += 1;
            }
        }
        Ok(st)
    }
}

fn le32(f: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(f[off..off + 4].try_into().unwrap())
}

/// Whether an echo request carries its own length and the pattern (guests/probe/README.md).
fn echo_ok(f: &[u8]) -> bool {
    f.len() >= 30
        && le32(f, 26) as usize == f.len()
        && f.iter()
            .enumerate()
            .skip(30)
            .all(|(i, &b)| b == (le32(f, 22) as u8) ^ (i as u8))
}

/// A flood frame: `len` ≤ 1514 gives `TERNFLOD` frames of that length; more gives a TCP/IPv4
/// frame (10.99.0.2 → 10.99.0.1) behind a 10-byte virtio_net_hdr asking for TSO.
fn build_flood(f: &Flood) -> Vec<u8> {
    if f.len <= 1514 {
        let mut v = vec![0u8; f.len];
        v[0..6].copy_from_slice(&f.dst);
        v[6..12].copy_from_slice(&PEER_MAC);
        v[12..14].copy_from_slice(&ETH_PEER.to_be_bytes());
        v[14..22].copy_from_slice(MAGIC_FLOOD);
        return v;
    }
    let len = f.len.max(TSO_HDRS + TSO_MSS + 1);
    let mut v = vec![0u8; 10 + len];
    // struct virtio_net_hdr: NEEDS_CSUM, GSO TCPV4, hdr_len, gso_size, csum_start, csum_offset.
    v[0] = 1;
    v[1] = 1;
    v[2..4].copy_from_slice(&(TSO_HDRS as u16).to_le_bytes());
    v[4..6].copy_from_slice(&(TSO_MSS as u16).to_le_bytes());
    v[6..8].copy_from_slice(&34u16.to_le_bytes());
    v[8..10].copy_from_slice(&16u16.to_le_bytes());
    let fr = &mut v[10..];
    fr[0..6].copy_from_slice(&f.dst);
    fr[6..12].copy_from_slice(&PEER_MAC);
    fr[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
    let (sip, dip) = ([10u8, 99, 0, 2], [10u8, 99, 0, 1]);
    let ip = &mut fr[14..34];
    ip.copy_from_slice(&[
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    ip[2..4].copy_from_slice(&((len - 14) as u16).to_be_bytes());
    ip[12..16].copy_from_slice(&sip);
    ip[16..20].copy_from_slice(&dip);
    let c = !fold(sum16(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut fr[34..54];
    tcp.copy_from_slice(&[
        0x13, 0x89, 0x9c, 0x40, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    let pseudo = sum16(&sip) + sum16(&dip) + 6 + (len - 34) as u32;
    tcp[16..18].copy_from_slice(&fold(pseudo).to_be_bytes());
    for (i, x) in fr[TSO_HDRS..].iter_mut().enumerate() {
        *x = i as u8;
    }
    v
}

/// Stamps the flood sequence number (TERNFLOD frames: after the magic; TCP: the sequence
/// number, advancing by the payload).
fn set_flood_seq(frame: &mut [u8], f: &Flood) {
    if f.len <= 1514 {
        frame[22..26].copy_from_slice(&f.seq.to_le_bytes());
    } else {
        let payload = (frame.len() - 10 - TSO_HDRS) as u32;
        frame[10 + 38..10 + 42].copy_from_slice(&f.seq.wrapping_mul(payload).to_be_bytes());
    }
}

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

/// Captures the frames of `ethertype` that arrive on `tap` in namespace `ns` (frames a VMM
/// writes into the TAP), until `count` came or `duration` passed, on a thread of its own
/// (which enters the namespace). Returns once the capture listens.
pub fn capture(
    ns: &NetNs,
    tap: &str,
    ethertype: u16,
    count: usize,
    duration: Duration,
) -> std::thread::JoinHandle<io::Result<Vec<Vec<u8>>>> {
    let (path, tap) = (ns.path(), tap.to_string());
    let (ready_tx, ready) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let s = PeerSocket::open(&path, &tap);
        let _ = ready_tx.send(());
        let s = s?;
        let deadline = Instant::now() + duration;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline && frames.len() < count {
            if let Some(n) = s.recv(&mut buf, false)? {
                if n >= 14 && buf[12..14] == ethertype.to_be_bytes() {
                    frames.push(buf[..n].to_vec());
                }
            }
        }
        Ok(frames)
    });
    let _ = ready.recv();
    t
}
