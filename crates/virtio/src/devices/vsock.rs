//! virtio-vsock (device type 19): stream sockets between the guest and the host, with
//! Firecracker's hybrid Unix-socket backend.
//!
//! - **Host to guest**: a program connects to the Unix socket the VM was given (`socket`),
//!   writes `CONNECT <port>\n` and, once the guest accepted, reads `OK <host port>\n`; from then
//!   on the Unix connection is the stream.
//! - **Guest to host**: a guest connection to CID 2 (the host), port P, reaches the Unix socket
//!   `<socket>_<P>`, where a host program listens.
//!
//! Three queues: the guest's receive queue (packets to the guest), its transmit queue (packets
//! from it) and the event queue (the transport reset a snapshot's restore sends, after which
//! the guest drops its connections: the host side of each was in the old process). Flow
//! control is virtio-vsock's credit: each side advertises its buffer (`buf_alloc`) and how
//! much it has consumed (`fwd_cnt`), and never sends past the peer's space. tern gives each
//! connection [`BUF_ALLOC`] bytes; a guest that sends past it loses the connection (reset).
//!
//! The worker polls its queues, the listening socket and an epoll instance of its own holding
//! every connection (edge-triggered), so connections come and go without touching the
//! worker's own poll set. Written in-tree: no maintained crate provides a virtio-vsock device
//! for our transports, and vhost-vsock needs the host kernel's vsock, not Unix sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lifecycle::event_loop::EventLoop;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::Queue;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::common::{drain, read_config_bytes, Ctx, Handler, Malformed, Request, Worker};
use crate::{ActivateError, Interrupt, QueueEvent, VirtioDevice, VmMemory};

/// The device type.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Buffer space each connection advertises to the guest, in bytes.
pub const BUF_ALLOC: u32 = 256 << 10;
/// Largest packet payload either way.
const MAX_PAYLOAD: usize = 64 << 10;
/// Most host bytes read from a connection at once, to be cut into the guest's buffers.
const STAGE: usize = 64 << 10;
/// Most control packets (resets, credit updates, ...) waiting for the guest's receive
/// buffers: past this the device takes no more packets from the guest until it posted
/// buffers, so a guest that sends and never receives cannot make the queue grow.
const MAX_CONTROL: usize = 1024;
/// Header size.
const HDR: usize = 44;
/// Host ports tern picks for connections the host starts.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;
/// The event queue's transport reset.
const EVENT_TRANSPORT_RESET: u32 = 0;

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const TOKEN_LISTENER: usize = 3;
const TOKEN_CONNS: usize = 4;

/// A packet header (`struct virtio_vsock_hdr`, little-endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn parse(b: &[u8; HDR]) -> Hdr {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn bytes(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: Arc<UnixListener>,
    broken: Arc<AtomicBool>,
    worker: Option<Worker<VsockWorker>>,
    /// A restored VM's driver is told its connections are gone once it runs.
    reset_event: bool,
}

impl Vsock {
    /// A device for guest CID `cid` whose host side listens on the Unix socket `path` (made
    /// now; a stale socket there, which nothing accepts on, is replaced).
    pub fn new(cid: u64, path: &Path) -> io::Result<Self> {
        if cid <= HOST_CID || cid >= u64::from(u32::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest CID {cid} is reserved or too large: 3 to 4294967294"),
            ));
        }
        let listener = listen(path)?;
        listener.set_nonblocking(true)?;
        Ok(Vsock {
            cid,
            path: path.to_path_buf(),
            listener: Arc::new(listener),
            broken: Arc::default(),
            worker: None,
            reset_event: false,
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }
}

/// Whether the host end of `s` closed altogether (not only its sending side): Unix stream
/// sockets report POLLHUP then.
fn hung_up(s: &UnixStream) -> bool {
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a socket this function borrows; no waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLHUP != 0
}

/// Binds `path`, replacing a socket file nothing listens on.
fn listen(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            use std::os::unix::fs::FileTypeExt;
            let is_socket =
                std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
            if !is_socket || UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        r => r,
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn min_queues(&self) -> usize {
        3
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: VmMemory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<QueueEvent>,
    ) -> Result<(), ActivateError> {
        self.reset();
        let [rx, tx, ev] = <[QueueEvent; 3]>::try_from(queues)
            .map_err(|q| ActivateError::BadQueue(format!("3 queues expected, got {}", q.len())))?;
        let conns = EventLoop::new().map_err(ActivateError::Worker)?;
        let reset_event = std::mem::take(&mut self.reset_event);
        if reset_event {
            // The worker sends the event as soon as it runs.
            ev.event.write(1).map_err(ActivateError::Worker)?;
        }
        let handler = VsockWorker {
            ctx: Ctx::new(
                mem,
                interrupt,
                self.broken.clone(),
                "vsock",
                MAX_PAYLOAD as u64 + 4096,
            ),
            queues: [rx.queue, tx.queue, ev.queue],
            events: [rx.event, tx.event, ev.event],
            cid: self.cid,
            path: self.path.clone(),
            listener: self.listener.clone(),
            epoll: conns,
            tokens: HashMap::new(),
            next_token: 0,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            reset_event,
            scratch: Vec::new(),
            tx_held: false,
        };
        self.worker = Some(
            Worker::spawn(lifecycle::threads::Device::Vsock, "virtio-vsock", handler)
                .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        // The worker's connections close with it.
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.broken.store(false, Ordering::SeqCst);
    }

    fn pause(&mut self, deadline: std::time::Instant) -> bool {
        super::common::pause_all(&self.worker, deadline)
    }

    fn resume(&mut self) {
        self.worker.iter().for_each(|w| w.resume());
    }

    fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    fn save_backend(&self) -> Option<serde_json::Value> {
        // Connections do not outlive tern; the restored guest learns so (transport reset).
        Some(serde_json::json!({ "cid": self.cid }))
    }

    fn restore_backend(&mut self, state: &serde_json::Value) -> Result<(), String> {
        match state["cid"].as_u64() {
            Some(c) if c == self.cid => {
                self.reset_event = true;
                Ok(())
            }
            other => Err(format!(
                "the snapshot's vsock has CID {other:?}, this VM's has {}",
                self.cid
            )),
        }
    }
}

/// One stream between a guest port and a host Unix connection.
struct Conn {
    stream: UnixStream,
    /// Its token in the connections' epoll set.
    id: u64,
    /// The host side's port (the guest's peer port).
    local: u32,
    /// The guest's port.
    peer: u32,
    /// Whether the guest accepted (host-started connections wait for its RESPONSE).
    established: bool,
    /// The guest's buffer space and what it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes of the guest's written to the host connection, and the count last told the guest.
    fwd_cnt: u32,
    fwd_told: u32,
    /// Guest bytes not yet written to the host connection.
    out: VecDeque<u8>,
    /// The host connection may have bytes to read.
    readable: bool,
    /// Host bytes read and not yet sent to the guest: `inbuf[inpos..inend]`. The buffer
    /// ([`STAGE`] bytes) is kept while the host has more to send and dropped when it has
    /// nothing, so an idle connection holds none.
    inbuf: Vec<u8>,
    inpos: usize,
    inend: usize,
    /// The host connection ended its sending side; the guest is not told yet.
    eof_pending: bool,
    /// The host connection ended its sending side (the guest was told).
    host_eof: bool,
    /// The guest will send no more (SHUTDOWN with SEND).
    guest_done: bool,
    /// The guest will receive no more (SHUTDOWN with RCV, as when it closes).
    guest_rcv_done: bool,
    /// The host connection's sending side was shut down (after the guest's last bytes).
    host_write_shut: bool,
}

impl Conn {
    /// A connection between host port `local` and guest port `peer` over `stream` (token
    /// `id`), not yet established, nothing sent either way.
    fn new(stream: UnixStream, id: u64, local: u32, peer: u32) -> Conn {
        Conn {
            stream,
            id,
            local,
            peer,
            established: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_told: 0,
            out: VecDeque::new(),
            readable: false,
            inbuf: Vec::new(),
            inpos: 0,
            inend: 0,
            eof_pending: false,
            host_eof: false,
            guest_done: false,
            guest_rcv_done: false,
            host_write_shut: false,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Host bytes read and not yet sent to the guest.
    fn staged(&self) -> usize {
        self.inend - self.inpos
    }

    /// Whether the guest may have something to receive on this connection: host bytes, or
    /// the host's end.
    fn has_input(&self) -> bool {
        self.established
            && !self.host_eof
            && !self.guest_rcv_done
            && (self.readable || self.staged() > 0 || self.eof_pending)
    }
}

type Key = (u32, u32);

/// What a token of the connections' epoll set stands for.
#[derive(Clone, Copy)]
enum Target {
    Handshake,
    Conn(Key),
}

struct VsockWorker {
    ctx: Ctx,
    queues: [Queue; 3],
    events: [EventFd; 3],
    cid: u64,
    path: PathBuf,
    listener: Arc<UnixListener>,
    /// Every connection's socket and every handshake's, edge-triggered, by token.
    epoll: EventLoop,
    tokens: HashMap<u64, Target>,
    next_token: u64,
    conns: HashMap<Key, Conn>,
    /// Host connections that have not sent their `CONNECT <port>\n` line yet, by token.
    handshakes: HashMap<u64, (UnixStream, Vec<u8>)>,
    /// Packets without payload waiting for a receive buffer.
    control: VecDeque<Hdr>,
    next_port: u32,
    reset_event: bool,
    /// Where a receive packet is put together (kept to spare an allocation per packet).
    scratch: Vec<u8>,
    /// The guest's packets wait in its transmit queue until the control queue has room.
    tx_held: bool,
}

impl Handler for VsockWorker {
    fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.events.iter().map(|e| e.as_raw_fd()).collect();
        fds.push(self.listener.as_raw_fd());
        fds.push(self.epoll.as_raw_fd());
        fds
    }

    fn handle(&mut self, token: usize) -> bool {
        let res = match token {
            RXQ | TXQ | EVQ => {
                drain(&self.events[token]);
                if token == TXQ {
                    self.transmit()
                } else {
                    Ok(())
                }
            }
            TOKEN_LISTENER => {
                self.accept();
                Ok(())
            }
            TOKEN_CONNS => {
                self.poll_conns();
                Ok(())
            }
            _ => Ok(()),
        };
        let res = res
            .and_then(|()| self.send_event())
            .and_then(|()| self.deliver())
            .and_then(|()| {
                // Packets held back while the control queue was full, once it has room.
                if self.tx_held && self.control.len() < MAX_CONTROL {
                    self.tx_held = false;
                    self.transmit().and_then(|()| self.deliver())
                } else {
                    Ok(())
                }
            });
        match res {
            Ok(()) => true,
            Err(e) => self.ctx.fail(e),
        }
    }
}

impl VsockWorker {
    fn reply(&self, to: &Hdr, op: u16) -> Hdr {
        Hdr {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC,
            ..Hdr::default()
        }
    }
}

/// A packet of `c` to the guest of CID `cid`, with the connection's credit.
fn header(cid: u64, c: &Conn, op: u16) -> Hdr {
    Hdr {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: c.local,
        dst_port: c.peer,
        kind: TYPE_STREAM,
        op,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: c.fwd_cnt,
        ..Hdr::default()
    }
}

impl VsockWorker {
    /// The transport reset, once, into the first event buffer the driver offers.
    fn send_event(&mut self) -> Result<(), Malformed> {
        if !self.reset_event {
            return Ok(());
        }
        let Some(req) = self.ctx.pop(&mut self.queues[EVQ], EVQ as u16)? else {
            return Ok(());
        };
        req.expect(true)?;
        let n = self
            .ctx
            .write_bufs(&req, &EVENT_TRANSPORT_RESET.to_le_bytes())?;
        self.ctx
            .add_used(&mut self.queues[EVQ], EVQ as u16, req.head, n as u32)?;
        self.ctx.signal(&self.queues[EVQ], EVQ as u16);
        self.reset_event = false;
        Ok(())
    }

    /// Reads one transmit chain: its header and payload.
    fn read_packet(&self, req: &Request) -> Result<(Hdr, Vec<u8>), Malformed> {
        req.expect(false)?;
        let mut all = Vec::new();
        for b in &req.bufs {
            let start = all.len();
            all.resize(start + b.len as usize, 0);
            self.ctx
                .mem
                .read_slice(&mut all[start..], b.addr)
                .map_err(Malformed::Memory)?;
        }
        if all.len() < HDR {
            return Err(Malformed::Truncated(req.head));
        }
        let hdr = Hdr::parse(all[..HDR].try_into().unwrap_or(&[0; HDR]));
        let len = (hdr.len as usize).min(all.len() - HDR).min(MAX_PAYLOAD);
        Ok((hdr, all[HDR..HDR + len].to_vec()))
    }

    /// Every packet the guest sent.
    fn transmit(&mut self) -> Result<(), Malformed> {
        let mut used = 0;
        loop {
            if self.control.len() >= MAX_CONTROL {
                self.tx_held = true;
                break;
            }
            let Some(req) = self.ctx.pop(&mut self.queues[TXQ], TXQ as u16)? else {
                break;
            };
            let (hdr, data) = self.read_packet(&req)?;
            self.ctx
                .add_used(&mut self.queues[TXQ], TXQ as u16, req.head, 0)?;
            used += 1;
            self.packet(hdr, data);
        }
        if used > 0 {
            self.ctx.signal(&self.queues[TXQ], TXQ as u16);
        }
        Ok(())
    }

    /// One packet from the guest.
    fn packet(&mut self, hdr: Hdr, data: Vec<u8>) {
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID || hdr.kind != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.control.push_back(self.reply(&hdr, OP_RST));
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == OP_REQUEST {
            self.guest_connects(&hdr);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if hdr.op != OP_RST {
                self.control.push_back(self.reply(&hdr, OP_RST));
            }
            return;
        };
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            OP_RESPONSE if !c.established => {
                c.established = true;
                let line = format!("OK {}\n", c.local);
                if c.stream.write_all(line.as_bytes()).is_err() {
                    self.close(key, true);
                } else {
                    c.readable = true;
                }
            }
            OP_RW if c.established => {
                if c.out.len() + data.len() > BUF_ALLOC as usize {
                    // Past the credit it was given.
                    self.close(key, true);
                    return;
                }
                c.out.extend(data);
                self.flush_out(key);
            }
            OP_CREDIT_REQUEST => {
                let h = header(self.cid, c, OP_CREDIT_UPDATE);
                c.fwd_told = c.fwd_cnt;
                self.control.push_back(h);
            }
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => {
                c.guest_done |= hdr.flags & SHUTDOWN_SEND != 0;
                c.guest_rcv_done |= hdr.flags & SHUTDOWN_RCV != 0;
                self.settle(key);
            }
            OP_RST => self.close(key, false),
            _ => self.close(key, true),
        }
    }

    /// The guest connects to host port `hdr.dst_port`: `<socket>_<port>`.
    fn guest_connects(&mut self, hdr: &Hdr) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) {
            self.control.push_back(self.reply(hdr, OP_RST));
            return;
        }
        let mut target = self.path.clone().into_os_string();
        target.push(format!("_{}", hdr.dst_port));
        let stream = match UnixStream::connect(&target) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    "vsock: guest port {} to host port {}: {}: {e}",
                    hdr.src_port,
                    hdr.dst_port,
                    PathBuf::from(&target).display()
                );
                self.control.push_back(self.reply(hdr, OP_RST));
                return;
            }
        };
        let Ok(id) = self.watch(&stream, Target::Conn(key)) else {
            self.control.push_back(self.reply(hdr, OP_RST));
            return;
        };
        let c = Conn {
            established: true,
            peer_buf_alloc: hdr.buf_alloc,
            peer_fwd_cnt: hdr.fwd_cnt,
            readable: true,
            ..Conn::new(stream, id, hdr.dst_port, hdr.src_port)
        };
        let h = header(self.cid, &c, OP_RESPONSE);
        self.conns.insert(key, c);
        self.control.push_back(h);
    }

    /// Adds a socket to the connections' epoll set (edge-triggered) as `target`; its token.
    fn watch(&mut self, s: &UnixStream, target: Target) -> io::Result<u64> {
        s.set_nonblocking(true)?;
        let token = self.next_token;
        self.next_token += 1;
        self.epoll.add_stream(s.as_raw_fd(), token)?;
        self.tokens.insert(token, target);
        Ok(token)
    }

    fn unwatch(&mut self, s: &UnixStream, token: u64) {
        let _ = self.epoll.remove(s.as_raw_fd());
        self.tokens.remove(&token);
    }

    /// Writes what the guest sent to the host connection, as far as it takes it, and tells
    /// the guest its new credit when it has used half of it.
    fn flush_out(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.out.is_empty() {
            let (a, _) = c.out.as_slices();
            match c.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(key, true);
                    return;
                }
            }
        }
        if c.fwd_cnt.wrapping_sub(c.fwd_told) >= BUF_ALLOC / 2 {
            c.fwd_told = c.fwd_cnt;
            let h = header(self.cid, c, OP_CREDIT_UPDATE);
            self.control.push_back(h);
        }
        self.settle(key);
    }

    /// An orderly release, once the guest's bytes have all reached the host connection: a
    /// guest that sends no more shuts down the host connection's sending side (the host reads
    /// its end), and a connection done both ways — the guest sends no more and either receives
    /// no more (it closed) or hears nothing more from the host — ends with the RST a closing
    /// guest waits for. Each side may go on sending after the other stopped (a half-close); a
    /// guest that only stopped receiving may still send.
    fn settle(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if !c.out.is_empty() {
            // flush_out settles again once the host connection took them.
            return;
        }
        if c.guest_done && !c.host_write_shut {
            c.host_write_shut = true;
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        if c.guest_done && (c.guest_rcv_done || c.host_eof) {
            self.close(key, true);
        }
    }

    /// Ends a connection; `rst` tells the guest.
    fn close(&mut self, key: Key, rst: bool) {
        if let Some(c) = self.conns.remove(&key) {
            self.unwatch(&c.stream, c.id);
            if rst {
                let h = header(self.cid, &c, OP_RST);
                self.control.push_back(h);
            }
        }
    }

    /// New host connections on the listening socket.
    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    // Their CONNECT line arrives through the connections' epoll set.
                    if let Ok(token) = self.watch(&s, Target::Handshake) {
                        self.handshakes.insert(token, (s, Vec::new()));
                        self.handshake(token);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads a host connection's `CONNECT <port>\n`; once whole, asks the guest.
    fn handshake(&mut self, token: u64) {
        let Some((s, line)) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        loop {
            match s.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if line.len() < MAX_CONNECT_LINE => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    // Closed, too long: dropped.
                    if let Some((s, _)) = self.handshakes.remove(&token) {
                        self.unwatch(&s, token);
                    }
                    return;
                }
            }
        }
        let Some((s, line)) = self.handshakes.remove(&token) else {
            return;
        };
        self.unwatch(&s, token);
        let port = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(peer) = port else {
            return;
        };
        let mut local = self.next_port;
        while self.conns.keys().any(|(l, _)| *l == local) {
            local = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        }
        self.next_port = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let Ok(id) = self.watch(&s, Target::Conn((local, peer))) else {
            return;
        };
        let c = Conn::new(s, id, local, peer);
        let h = header(self.cid, &c, OP_REQUEST);
        self.conns.insert((local, peer), c);
        self.control.push_back(h);
    }

    /// Events on the connections' epoll set.
    fn poll_conns(&mut self) {
        let ready: Vec<u64> = match self.epoll.wait(Some(std::time::Duration::ZERO)) {
            Ok(t) => t.iter().collect(),
            Err(_) => return,
        };
        for token in ready {
            match self.tokens.get(&token).copied() {
                Some(Target::Handshake) => self.handshake(token),
                Some(Target::Conn(key)) => {
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.readable = true;
                    }
                    self.flush_out(key);
                }
                None => {}
            }
        }
    }

    /// Puts the queued control packets in the guest's receive buffers, as far as there are
    /// buffers; how many it used.
    fn send_control(&mut self) -> Result<u32, Malformed> {
        let mut used = 0;
        while let Some(h) = self.control.front().copied() {
            let Some(req) = self.ctx.pop(&mut self.queues[RXQ], RXQ as u16)? else {
                break;
            };
            req.expect(true)?;
            let n = self.ctx.write_bufs(&req, &h.bytes())?;
            self.ctx
                .add_used(&mut self.queues[RXQ], RXQ as u16, req.head, n as u32)?;
            self.control.pop_front();
            used += 1;
        }
        Ok(used)
    }

    /// Fills the guest's receive buffers: control packets first, then data from readable
    /// connections as far as each one's credit goes.
    fn deliver(&mut self) -> Result<(), Malformed> {
        let mut used = self.send_control()?;
        if self.control.is_empty() {
            let keys: Vec<Key> = self
                .conns
                .iter()
                .filter(|(_, c)| c.has_input())
                .map(|(k, _)| *k)
                .collect();
            for key in keys {
                let (n, buffers_left) = self.deliver_conn(key)?;
                used += n;
                if !buffers_left {
                    break;
                }
            }
            // Resets the loop above queued (failed reads).
            used += self.send_control()?;
        }
        if used > 0 {
            self.ctx.signal(&self.queues[RXQ], RXQ as u16);
        }
        Ok(())
    }

    /// Moves connection `key`'s host bytes into the guest's receive buffers, as far as its
    /// credit, the host's data and the buffers go, and its end (a SHUTDOWN) once the host is
    /// done. Host bytes are read in blocks of up to [`STAGE`] and cut into packets from
    /// there: one read for many of the guest's (4 KiB) buffers. Returns the buffers used
    /// and whether any are left.
    fn deliver_conn(&mut self, key: Key) -> Result<(u32, bool), Malformed> {
        let mut used = 0;
        loop {
            let Some(c) = self.conns.get_mut(&key) else {
                return Ok((used, true));
            };
            let credit = c.credit() as usize;
            if c.staged() == 0 && !c.eof_pending {
                if !c.readable || credit == 0 {
                    return Ok((used, true));
                }
                if c.inbuf.len() < STAGE {
                    c.inbuf = vec![0; STAGE];
                }
                let want = credit.min(STAGE);
                let got = loop {
                    match c.stream.read(&mut c.inbuf[..want]) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        r => break r,
                    }
                };
                c.inpos = 0;
                c.inend = 0;
                match got {
                    // The host side is done sending (closed, or shut down its sending side).
                    Ok(0) => {
                        c.inbuf = Vec::new();
                        c.eof_pending = true;
                    }
                    Ok(n) => c.inend = n.min(want),
                    Err(e) => {
                        c.inbuf = Vec::new();
                        if e.kind() == io::ErrorKind::WouldBlock {
                            c.readable = false;
                        } else {
                            self.close(key, true);
                        }
                        return Ok((used, true));
                    }
                }
            }
            if c.staged() > 0 && credit == 0 {
                return Ok((used, true));
            }
            let Some(req) = self.ctx.pop(&mut self.queues[RXQ], RXQ as u16)? else {
                return Ok((used, false));
            };
            req.expect(true)?;
            let room: usize = req.bufs.iter().map(|b| b.len as usize).sum();
            if room <= HDR {
                return Err(Malformed::Truncated(req.head));
            }
            self.scratch.clear();
            let eof = c.staged() == 0;
            let mut gone = false;
            if eof {
                // Tell the guest. A host that only shut down its sending side still reads:
                // the guest may go on sending. A host that closed reads nothing more either:
                // the connection ends both ways.
                c.eof_pending = false;
                c.host_eof = true;
                gone = hung_up(&c.stream);
                let mut h = header(self.cid, c, OP_SHUTDOWN);
                h.flags = if gone {
                    SHUTDOWN_SEND | SHUTDOWN_RCV
                } else {
                    SHUTDOWN_SEND
                };
                self.scratch.extend_from_slice(&h.bytes());
            } else {
                let n = (room - HDR).min(credit).min(c.staged()).min(MAX_PAYLOAD);
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                let mut h = header(self.cid, c, OP_RW);
                h.len = n as u32;
                self.scratch.extend_from_slice(&h.bytes());
                self.scratch
                    .extend_from_slice(&c.inbuf[c.inpos..c.inpos + n]);
                c.inpos += n;
            }
            let written = self.ctx.write_bufs(&req, &self.scratch)?;
            self.ctx
                .add_used(&mut self.queues[RXQ], RXQ as u16, req.head, written as u32)?;
            used += 1;
            if gone {
                // Nothing more either way: the guest's answering RST finds no connection.
                self.close(key, false);
                return Ok((used, true));
            }
            if eof {
                // Done both ways if the guest had stopped sending too.
                self.settle(key);
                return Ok((used, true));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use vm_memory::GuestAddress;

    use super::*;
    use crate::testing::*;

    const GUEST: u64 = 3;
    /// Receive buffers: 8 chains of 4 KiB + a header each, from here.
    const RX: u64 = BUFS;
    const RX_LEN: u32 = 4096 + HDR as u32;
    /// Where packets to send are built.
    const TX: u64 = BUFS + 0x10_0000;
    const EV: u64 = BUFS + 0x20_0000;

    struct Guest {
        d: Driver,
        rx: VirtQueue,
        tx: VirtQueue,
        ev: VirtQueue,
        rx_seen: u16,
        tx_at: u64,
        path: PathBuf,
    }

    fn guest(name: &str) -> Guest {
        let path = std::env::temp_dir().join(format!("tern-vsock-{}-{name}", std::process::id()));
        let dev = Vsock::new(GUEST, &path).unwrap();
        guest_on(Box::new(dev), path)
    }

    fn guest_on(dev: Box<dyn VirtioDevice>, path: PathBuf) -> Guest {
        let mut d = Driver::new(dev);
        let (mut rx, tx, mut ev) = (
            VirtQueue::new(0x1000),
            VirtQueue::new(0x4000),
            VirtQueue::new(0x7000),
        );
        for i in 0..8u64 {
            rx.add_chain(&d.mem, &[(RX + i * 0x2000, RX_LEN, true)]);
        }
        ev.add_chain(&d.mem, &[(EV, 8, true)]);
        assert_eq!(d.start(&[&rx, &tx, &ev]), 0xf);
        Guest {
            d,
            rx,
            tx,
            ev,
            rx_seen: 0,
            tx_at: TX,
            path,
        }
    }

    impl Guest {
        fn send(&mut self, h: Hdr, data: &[u8]) {
            let mut p = h.bytes().to_vec();
            p.extend_from_slice(data);
            self.d
                .mem
                .write_slice(&p, GuestAddress(self.tx_at))
                .unwrap();
            self.tx
                .add_chain(&self.d.mem, &[(self.tx_at, p.len() as u32, false)]);
            self.tx_at += 0x1_0000;
            self.d.notify(1);
        }

        /// The next packet the device put in a receive buffer (buffers are reposted).
        fn recv(&mut self) -> (Hdr, Vec<u8>) {
            let want = self.rx_seen + 1;
            assert!(
                wait_for(|| self.rx.used_idx(&self.d.mem) >= want),
                "no packet for the guest"
            );
            let (head, len) = self.rx.used_elem(&self.d.mem, self.rx_seen);
            self.rx_seen += 1;
            let addr = RX + u64::from(head % 8) * 0x2000;
            let mut b = vec![0u8; len as usize];
            self.d.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            let h = Hdr::parse(b[..HDR].try_into().unwrap());
            // The buffer goes back to the device.
            self.rx.add_chain(&self.d.mem, &[(addr, RX_LEN, true)]);
            self.d.notify(0);
            (h, b[HDR..].to_vec())
        }

        fn hdr(&self, src_port: u32, dst_port: u32, op: u16, len: u32) -> Hdr {
            Hdr {
                src_cid: GUEST,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len,
                kind: TYPE_STREAM,
                op,
                buf_alloc: 64 << 10,
                ..Hdr::default()
            }
        }
    }

    #[test]
    fn either_side_may_stop_sending_and_still_receive() {
        let mut g = guest("half");
        let port = std::path::PathBuf::from(format!("{}_5010", g.path.display()));
        let _ = std::fs::remove_file(&port);
        let host = UnixListener::bind(&port).unwrap();
        g.send(g.hdr(1300, 5010, OP_REQUEST, 0), &[]);
        assert_eq!(g.recv().0.op, OP_RESPONSE);
        let (mut s, _) = host.accept().unwrap();
        // The host sends a request and shuts down its sending side: the guest hears that the
        // host sends no more (SEND only), and its answer still reaches the host.
        s.write_all(b"question").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let (h, data) = g.recv();
        assert_eq!((h.op, data.as_slice()), (OP_RW, &b"question"[..]));
        let (h, _) = g.recv();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        g.send(g.hdr(1300, 5010, OP_RW, 6), b"answer");
        // The guest closes: the host reads the answer, then the end; the guest gets its RST.
        let mut rcv_send = g.hdr(1300, 5010, OP_SHUTDOWN, 0);
        rcv_send.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        g.send(rcv_send, &[]);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"answer");
        assert_eq!(g.recv().0.op, OP_RST);

        // The guest stops sending first: the host reads the end and may still answer.
        g.send(g.hdr(1301, 5010, OP_REQUEST, 0), &[]);
        assert_eq!(g.recv().0.op, OP_RESPONSE);
        let (mut s, _) = host.accept().unwrap();
        g.send(g.hdr(1301, 5010, OP_RW, 2), b"hi");
        let mut send = g.hdr(1301, 5010, OP_SHUTDOWN, 0);
        send.flags = SHUTDOWN_SEND;
        g.send(send, &[]);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hi");
        s.write_all(b"bye").unwrap();
        let (h, data) = g.recv();
        assert_eq!((h.op, data.as_slice()), (OP_RW, &b"bye"[..]));
        // Then the host closes altogether: the guest hears that it neither sends nor
        // receives any more, and the connection is gone (the guest's RST gets no answer).
        drop(s);
        let (h, _) = g.recv();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV));
        g.send(g.hdr(1301, 5010, OP_RST, 0), &[]);

        // A guest that only stops receiving may still send; it ends with its SEND.
        g.send(g.hdr(1303, 5010, OP_REQUEST, 0), &[]);
        assert_eq!(g.recv().0.op, OP_RESPONSE);
        let (mut s, _) = host.accept().unwrap();
        let mut rcv = g.hdr(1303, 5010, OP_SHUTDOWN, 0);
        rcv.flags = SHUTDOWN_RCV;
        g.send(rcv, &[]);
        g.send(g.hdr(1303, 5010, OP_RW, 5), b"still");
        let mut send = g.hdr(1303, 5010, OP_SHUTDOWN, 0);
        send.flags = SHUTDOWN_SEND;
        g.send(send, &[]);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"still");
        assert_eq!(g.recv().0.op, OP_RST);
        drop(s);

        // A host that closed for good: the guest's next bytes get an RST.
        g.send(g.hdr(1302, 5010, OP_REQUEST, 0), &[]);
        assert_eq!(g.recv().0.op, OP_RESPONSE);
        let (s, _) = host.accept().unwrap();
        drop(s);
        let (h, _) = g.recv();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV));
        g.send(g.hdr(1302, 5010, OP_RW, 4), b"lost");
        let (h, _) = g.recv();
        assert_eq!((h.op, h.dst_port), (OP_RST, 1302));
        let _ = std::fs::remove_file(&port);
    }

    #[test]
    fn the_guest_connects_to_a_host_socket_and_data_flows_both_ways() {
        let mut g = guest("out");
        assert_eq!(g.d.read(0x100), GUEST as u32);
        let port = std::path::PathBuf::from(format!("{}_5000", g.path.display()));
        let _ = std::fs::remove_file(&port);
        let host = UnixListener::bind(&port).unwrap();
        g.send(g.hdr(1234, 5000, OP_REQUEST, 0), &[]);
        let (h, _) = g.recv();
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.dst_cid),
            (OP_RESPONSE, 5000, 1234, GUEST)
        );
        assert_eq!(h.buf_alloc, BUF_ALLOC);
        let (mut s, _) = host.accept().unwrap();
        g.send(g.hdr(1234, 5000, OP_RW, 5), b"hello");
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        s.write_all(b"world").unwrap();
        let (h, data) = g.recv();
        assert_eq!((h.op, h.len, data.as_slice()), (OP_RW, 5, &b"world"[..]));
        // The host closes: the guest hears a shutdown.
        drop(s);
        let (h, _) = g.recv();
        assert_eq!(h.op, OP_SHUTDOWN);
        // A port nobody listens on: reset.
        g.send(g.hdr(1235, 5001, OP_REQUEST, 0), &[]);
        let (h, _) = g.recv();
        assert_eq!((h.op, h.dst_port), (OP_RST, 1235));
        let _ = std::fs::remove_file(&port);
    }

    #[test]
    fn the_host_connects_with_connect_and_gets_ok() {
        let mut g = guest("in");
        let mut s = UnixStream::connect(&g.path).unwrap();
        s.write_all(b"CONNECT 6000\n").unwrap();
        let (h, _) = g.recv();
        assert_eq!((h.op, h.dst_port, h.dst_cid), (OP_REQUEST, 6000, GUEST));
        assert!(h.src_port >= FIRST_LOCAL_PORT);
        let local = h.src_port;
        g.send(g.hdr(6000, local, OP_RESPONSE, 0), &[]);
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, format!("OK {local}\n"));
        // Data past the first 4 KiB buffer comes in several packets.
        let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        s.write_all(&big).unwrap();
        let mut got = Vec::new();
        while got.len() < big.len() {
            let (h, data) = g.recv();
            assert_eq!(h.op, OP_RW);
            got.extend(data);
        }
        assert_eq!(got, big);
        g.send(g.hdr(6000, local, OP_RW, 3), b"ack");
        let mut a = [0u8; 3];
        s.read_exact(&mut a).unwrap();
        assert_eq!(&a, b"ack");
        // A guest reset closes the host side.
        g.send(g.hdr(6000, local, OP_RST, 0), &[]);
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(s.read(&mut a).unwrap(), 0);
    }

    #[test]
    fn the_guest_never_gets_more_than_its_credit() {
        let mut g = guest("credit");
        let mut s = UnixStream::connect(&g.path).unwrap();
        s.write_all(b"CONNECT 7000\n").unwrap();
        let (h, _) = g.recv();
        let local = h.src_port;
        // The guest has room for 6000 bytes and has consumed nothing.
        let mut resp = g.hdr(7000, local, OP_RESPONSE, 0);
        resp.buf_alloc = 6000;
        g.send(resp, &[]);
        s.write_all(&vec![7u8; 20_000]).unwrap();
        let mut total = 0;
        while total < 6000 {
            let (h, data) = g.recv();
            assert_eq!(h.op, OP_RW);
            total += data.len();
        }
        assert_eq!(total, 6000);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(g.rx.used_idx(&g.d.mem), g.rx_seen, "sent past the credit");
        // It consumed 6000: 6000 more may come.
        let mut upd = g.hdr(7000, local, OP_CREDIT_UPDATE, 0);
        upd.buf_alloc = 6000;
        upd.fwd_cnt = 6000;
        g.send(upd, &[]);
        let mut more = 0;
        while more < 6000 {
            more += g.recv().1.len();
        }
        assert_eq!(more, 6000);
    }

    #[test]
    fn hostile_packets_are_reset_or_break_the_device() {
        let mut g = guest("hostile");
        // A packet claiming another guest's CID, and one for a connection that does not
        // exist: both reset, nothing reaches the host.
        let mut spoofed = g.hdr(1, 5000, OP_REQUEST, 0);
        spoofed.src_cid = 7;
        g.send(spoofed, &[]);
        assert_eq!(g.recv().0.op, OP_RST);
        g.send(g.hdr(1, 5000, OP_RW, 3), b"abc");
        assert_eq!(g.recv().0.op, OP_RST);
        // A connection whose guest sends past the credit it was given loses it.
        let mut s = UnixStream::connect(&g.path).unwrap();
        s.write_all(b"CONNECT 8000\n").unwrap();
        let local = g.recv().0.src_port;
        g.send(g.hdr(8000, local, OP_RESPONSE, 0), &[]);
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        // The host does not read: what the guest sends piles up until it passes BUF_ALLOC.
        let chunk = vec![1u8; 16 << 10];
        let mut reset = false;
        for sent in 1..=(BUF_ALLOC as usize / chunk.len() + 16) as u16 {
            // One packet at a time, from the same place.
            g.tx_at = TX;
            g.send(g.hdr(8000, local, OP_RW, chunk.len() as u32), &chunk);
            assert!(wait_for(|| g.tx.used_idx(&g.d.mem) >= sent + 3));
            if g.rx.used_idx(&g.d.mem) > g.rx_seen {
                let (h, _) = g.recv();
                if h.op == OP_RST {
                    reset = true;
                    break;
                }
            }
        }
        assert!(reset, "a guest sending past its credit kept its connection");
        // A chain shorter than a header breaks the device.
        g.d.mem
            .write_slice(&[0u8; 8], GuestAddress(g.tx_at))
            .unwrap();
        g.tx.add_chain(&g.d.mem, &[(g.tx_at, 8, false)]);
        g.d.notify(1);
        assert!(g.d.wait_needs_reset(), "a truncated packet was accepted");
    }

    #[test]
    fn a_restored_device_tells_the_guest_its_transport_was_reset() {
        let path = std::env::temp_dir().join(format!("tern-vsock-{}-reset", std::process::id()));
        let mut dev = Vsock::new(GUEST, &path).unwrap();
        assert!(dev.restore_backend(&serde_json::json!({"cid": 4})).is_err());
        let state = dev.save_backend().unwrap();
        dev.restore_backend(&state).unwrap();
        let g = guest_on(Box::new(dev), path);
        assert!(wait_for(|| g.ev.used_idx(&g.d.mem) == 1), "no event");
        let mut id = [0u8; 4];
        g.d.mem.read_slice(&mut id, GuestAddress(EV)).unwrap();
        assert_eq!(u32::from_le_bytes(id), EVENT_TRANSPORT_RESET);
    }
}
