//! virtio-net (device type 1) over a Linux TAP device.
//!
//! Frames carry the 12-byte `virtio_net_hdr_v1` straight to and from the TAP (opened with
//! `IFF_VNET_HDR`), so checksum and segmentation offloads (`CSUM`, `GUEST_CSUM`,
//! `HOST_TSO4/6`, `GUEST_TSO4/6`) cost tern nothing: the host kernel segments or checksums what
//! needs it. Receive buffers may be merged (`MRG_RXBUF`). With `queues=N` (`MQ` + `CTRL_VQ`)
//! each queue pair has its own TAP queue (`IFF_MULTI_QUEUE`) and worker thread; the control
//! queue has one more. With `EVENT_IDX` the driver says after which used entry it wants its
//! next interrupt (and the device after which available entry its next notification), so a
//! busy queue interrupts and exits less; Linux drivers use it.
//!
//! Hostile guests: a transmitted frame with a malformed header (unknown GSO type or flags,
//! offsets past the frame, GSO the guest did not negotiate), larger than the MTU without GSO,
//! shorter than an Ethernet header, or a malformed descriptor chain (a loop, a buffer outside
//! guest memory, wrong direction) is dropped and counted, and the chain returned; the device
//! keeps working. Only a bad available ring index (no chain can be trusted) breaks the device.
//!
//! A TAP that disappears (deleted by an administrator) takes the link down: the `status` field
//! loses `LINK_UP`, the guest gets a configuration interrupt, transmitted frames are dropped
//! (counted), and the VM keeps running.

use serde::Deserialize;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use net::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::*;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::common::{
    drain, shared_limiter, Ctx, Handler, Malformed, Popped, Request, SharedLimiter, Throttle,
    Worker,
};
use crate::{ActivateError, Interrupt, InterruptKind, QueueEvent, VirtioDevice, VmMemory};

/// Size of every queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame the TAP hands over: a 64 KiB GSO frame, its Ethernet header and ours.
const MAX_FRAME: usize = VNET_HDR_LEN + 14 + 65535 + 4;
/// Most bytes one chain may describe.
const MAX_CHAIN: u64 = 1 << 20;
/// Ethernet header plus an 802.1Q tag: what a non-GSO frame may add to the MTU.
const L2_OVERHEAD: usize = 18;

/// Rate limits of one direction (0 = unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Frames per second.
    pub ops: u64,
    /// Bytes per second.
    pub bytes: u64,
}

/// How a virtio-net device is set up.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The MTU the guest is told.
    pub mtu: u16,
    /// Offer checksum and segmentation offloads.
    pub offload: bool,
    /// Guest receive limits.
    pub rx: Limits,
    /// Guest transmit limits.
    pub tx: Limits,
}

/// Counters of one device.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest (without the vnet header).
    pub rx_bytes: AtomicU64,
    /// Frames from the TAP that could not be delivered (no buffer large enough, bad buffers).
    pub rx_dropped: AtomicU64,
    /// Frames sent to the TAP.
    pub tx_frames: AtomicU64,
    /// Bytes sent to the TAP (without the vnet header).
    pub tx_bytes: AtomicU64,
    /// Guest frames dropped: malformed, oversized, refused by the host, or link down.
    pub tx_dropped: AtomicU64,
    /// Times the TAP went away.
    pub link_down: AtomicU64,
    /// Times a queue waited for a rate limiter.
    pub throttled: AtomicU64,
}

/// What the VMM changes on an interface while the guest runs: its rate limits.
#[derive(Clone)]
pub struct NetHandle {
    limiters: [SharedLimiter; 2],
}

impl NetHandle {
    /// New limits for what the guest receives and what it transmits, from the next frame on.
    pub fn set_limits(&self, rx: Limits, tx: Limits) {
        self.limiters[RX].set(rx.ops, rx.bytes);
        self.limiters[TX].set(tx.ops, tx.bytes);
    }
}

/// The virtio-net device.
pub struct Net {
    taps: Vec<Arc<Tap>>,
    opts: NetOptions,
    queue_sizes: Vec<u16>,
    acked: u64,
    link_up: Arc<AtomicBool>,
    limiters: [SharedLimiter; 2],
    counters: Arc<NetCounters>,
    broken: Arc<AtomicBool>,
    pairs: Vec<Worker<PairWorker>>,
    ctrl: Option<Worker<CtrlWorker>>,
}

impl Net {
    /// A device on `taps` (one per queue pair).
    pub fn new(taps: Vec<Tap>, opts: NetOptions) -> Self {
        let pairs = taps.len().max(1);
        Net {
            taps: taps.into_iter().map(Arc::new).collect(),
            queue_sizes: vec![QUEUE_SIZE; 2 * pairs + 1],
            acked: 0,
            link_up: Arc::new(AtomicBool::new(true)),
            limiters: [
                shared_limiter(opts.rx.ops, opts.rx.bytes),
                shared_limiter(opts.tx.ops, opts.tx.bytes),
            ],
            opts,
            counters: Arc::default(),
            broken: Arc::default(),
            pairs: Vec::new(),
            ctrl: None,
        }
    }

    /// What the VMM changes while the guest runs: the rate limits.
    pub fn handle(&self) -> NetHandle {
        NetHandle {
            limiters: self.limiters.clone(),
        }
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// What announces the guest's MAC on the device's TAP (after a migration).
    pub fn announcer(&self) -> Option<(Arc<Tap>, [u8; 6])> {
        self.taps.first().map(|t| (t.clone(), self.opts.mac))
    }

    /// The TAP's interface name.
    pub fn tap_name(&self) -> &str {
        self.taps.first().map_or("", |t| t.name())
    }

    fn config(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.opts.mac);
        let status = if self.link_up.load(Ordering::SeqCst) {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&(self.taps.len() as u16).to_le_bytes());
        c[10..12].copy_from_slice(&self.opts.mtu.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn min_queues(&self) -> usize {
        2
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_MTU
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CTRL_VQ
            | 1 << VIRTIO_RING_F_EVENT_IDX;
        if self.opts.offload {
            f |= 1 << VIRTIO_NET_F_CSUM
                | 1 << VIRTIO_NET_F_GUEST_CSUM
                | 1 << VIRTIO_NET_F_HOST_TSO4
                | 1 << VIRTIO_NET_F_HOST_TSO6
                | 1 << VIRTIO_NET_F_GUEST_TSO4
                | 1 << VIRTIO_NET_F_GUEST_TSO6;
        }
        if self.taps.len() > 1 {
            f |= 1 << VIRTIO_NET_F_MQ;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let c = self.config();
        if let Ok(off) = usize::try_from(offset) {
            if off < c.len() {
                let n = data.len().min(c.len() - off);
                data[..n].copy_from_slice(&c[off..off + n]);
            }
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is not writable (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
    }

    fn activate(
        &mut self,
        mem: VmMemory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<QueueEvent>,
    ) -> Result<(), ActivateError> {
        self.reset();
        let acked = self.acked;
        let has = |bit: u32| acked & (1 << bit) != 0;
        let pairs = if has(VIRTIO_NET_F_MQ) {
            self.taps.len()
        } else {
            1
        };
        let ctrl = has(VIRTIO_NET_F_CTRL_VQ);
        let want = 2 * pairs + usize::from(ctrl);
        if queues.len() < want {
            return Err(ActivateError::BadQueue(format!(
                "{want} queues expected, got {}",
                queues.len()
            )));
        }
        let mut tun = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            tun |= TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                tun |= TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                tun |= TUN_F_TSO6;
            }
        }
        for t in &self.taps {
            if let Err(e) = t.set_offload(tun) {
                ratelimit::warn_limited!("virtio-net: {e}");
            }
        }
        let ctx = || {
            Ctx::new(
                mem.clone(),
                interrupt.clone(),
                self.broken.clone(),
                "net",
                MAX_CHAIN,
            )
        };
        let mut queues = queues.into_iter();
        for (i, tap) in self.taps.iter().take(pairs).enumerate() {
            let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
                break;
            };
            let throttle =
                |l: &SharedLimiter| Throttle::new(l.clone()).map_err(ActivateError::Worker);
            let signalled = [rx.queue.next_used(), tx.queue.next_used()];
            let w = PairWorker {
                ctx: ctx(),
                pair: i as u16,
                rx: rx.queue,
                rx_evt: rx.event,
                tx: tx.queue,
                tx_evt: tx.event,
                tap: Some(tap.clone()),
                tap_readable: true,
                pending: None,
                rx_notify: None,
                buf: vec![0u8; MAX_FRAME],
                rx_chains: Vec::new(),
                mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
                acked,
                mtu: usize::from(self.opts.mtu),
                throttles: [throttle(&self.limiters[RX])?, throttle(&self.limiters[TX])?],
                link_up: self.link_up.clone(),
                counters: self.counters.clone(),
                tally: Tally::default(),
                unpublished: [0, 0],
                signalled,
            };
            let name = format!("virtio-net-q{i}");
            self.pairs.push(
                Worker::spawn(lifecycle::threads::Device::Net, &name, w)
                    .map_err(ActivateError::Worker)?,
            );
        }
        if ctrl {
            // The control queue comes after the pairs the driver uses (index 2 without MQ).
            if let Some(q) = queues.next() {
                let w = CtrlWorker {
                    ctx: ctx(),
                    index: want as u16 - 1,
                    queue: q.queue,
                    event: q.event,
                    pairs: self.taps.len() as u16,
                };
                self.ctrl = Some(
                    Worker::spawn(lifecycle::threads::Device::Net, "virtio-net-ctrl", w)
                        .map_err(ActivateError::Worker)?,
                );
            }
        }
        // A device restored with its link down (its TAP had gone when the snapshot was taken)
        // runs on the TAP it has now: the link comes back up, and the guest is told.
        if !self.link_up.swap(true, Ordering::SeqCst) {
            if let Err(e) = interrupt.trigger(InterruptKind::Config) {
                tracing::warn!("virtio-net: cannot raise the config interrupt: {e}");
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        for w in self.pairs.drain(..) {
            w.stop();
        }
        if let Some(w) = self.ctrl.take() {
            w.stop();
        }
        self.broken.store(false, Ordering::SeqCst);
    }

    fn pause(&mut self, deadline: std::time::Instant) -> bool {
        let pairs = super::common::pause_all(&self.pairs, deadline);
        super::common::pause_all(&self.ctrl, deadline) && pairs
    }

    fn resume(&mut self) {
        self.pairs.iter().for_each(|w| w.resume());
        self.ctrl.iter().for_each(|w| w.resume());
    }

    fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    fn save_backend(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "link_up": self.link_up.load(Ordering::SeqCst) }))
    }

    fn restore_backend(&mut self, state: &serde_json::Value) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Backend {
            link_up: bool,
        }
        let b = Backend::deserialize(state)
            .map_err(|e| format!("virtio-net: saved back-end state is invalid: {e}"))?;
        // The guest's view until the device restarts (see `activate`).
        self.link_up.store(b.link_up, Ordering::SeqCst);
        Ok(())
    }
}

const RX: usize = 0;
const TX: usize = 1;
/// A queue's used index is published at the end of each pass, and at the end of a frame once
/// this many entries wait (half the ring; see [`PairWorker::frame_done`]). bench-net, 5 boots
/// each against the step before: publishing every 16 entries instead of with each one took
/// pinned 64-byte transmit over mmio from 527,000 to 608,000 frames/s; every 128 instead of 16
/// took unpinned TSO transmit from 5,109 to 6,610 MB/s and TSO receive from 857 to 1,084.
/// Publishing only at the end of a pass (up to 256 entries) lost pinned TSO receive (1.2
/// against 2.2 GB/s): the driver saw nothing of a pass that filled the ring and could not give
/// buffers back meanwhile.
const PUBLISH_EVERY: u16 = QUEUE_SIZE / 2;
const TOKEN_RX: usize = 0;
const TOKEN_TX: usize = 1;
const TOKEN_TAP: usize = 2;
const TOKEN_RX_TIMER: usize = 3;
const TOKEN_TX_TIMER: usize = 4;

/// One queue pair: receive from the TAP into `rx`, transmit `tx` to the TAP.
struct PairWorker {
    ctx: Ctx,
    pair: u16,
    rx: Queue,
    rx_evt: EventFd,
    tx: Queue,
    tx_evt: EventFd,
    /// `None` once the TAP is gone.
    tap: Option<Arc<Tap>>,
    /// The TAP may have frames queued (it is watched edge-triggered).
    tap_readable: bool,
    /// Length of a frame read from the TAP into `buf` and not yet delivered.
    pending: Option<usize>,
    /// Whether the receive queue's notifications are on, where known (see
    /// [`Self::rx_chain`]).
    rx_notify: Option<bool>,
    buf: Vec<u8>,
    /// The receive chains of the frame being delivered (kept to reuse its allocation).
    rx_chains: Vec<Request>,
    mrg_rxbuf: bool,
    acked: u64,
    mtu: usize,
    throttles: [Throttle; 2],
    link_up: Arc<AtomicBool>,
    counters: Arc<NetCounters>,
    /// Frames and bytes moved in this pass, added to `counters` at its end: one atomic
    /// addition per pass, not per frame (each locked instruction waits for the worker's
    /// stores to the used ring to reach the cache).
    tally: Tally,
    /// Used entries of each direction written and not yet published (see [`Self::put_used`]).
    unpublished: [u16; 2],
    /// Each direction's used index when the worker last decided whether to interrupt
    /// ([`Ctx::signal_since`]).
    signalled: [u16; 2],
}

/// Frames and bytes a pass of [`PairWorker`] moved, not yet in its [`NetCounters`].
#[derive(Default)]
struct Tally {
    rx_frames: u64,
    rx_bytes: u64,
    tx_frames: u64,
    tx_bytes: u64,
}

impl Tally {
    /// Adds the pass's figures to `c` and starts again from zero.
    fn flush(&mut self, c: &NetCounters) {
        let t = std::mem::take(self);
        for (n, counter) in [
            (t.rx_frames, &c.rx_frames),
            (t.rx_bytes, &c.rx_bytes),
            (t.tx_frames, &c.tx_frames),
            (t.tx_bytes, &c.tx_bytes),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

impl Handler for PairWorker {
    fn fds(&self) -> Vec<RawFd> {
        vec![
            self.rx_evt.as_raw_fd(),
            self.tx_evt.as_raw_fd(),
            self.tap.as_ref().map_or(-1, |t| t.fd()),
            self.throttles[RX].fd(),
            self.throttles[TX].fd(),
        ]
    }

    fn edge_triggered(&self, token: usize) -> bool {
        token == TOKEN_TAP
    }

    fn handle(&mut self, token: usize) -> bool {
        match token {
            TOKEN_RX => drain(&self.rx_evt),
            TOKEN_TX => drain(&self.tx_evt),
            TOKEN_TAP => self.tap_readable = true,
            TOKEN_RX_TIMER | TOKEN_TX_TIMER => {
                self.throttles[token - TOKEN_RX_TIMER].fired();
            }
            _ => {}
        }
        let mut used = [false, false];
        let res = self
            .transmit(&mut used[TX])
            .and_then(|()| self.publish(TX))
            .and_then(|()| self.receive(&mut used[RX]))
            .and_then(|()| self.publish(RX));
        self.tally.flush(&self.counters);
        if used[RX] {
            self.ctx
                .signal_since(&self.rx, 2 * self.pair, &mut self.signalled[RX]);
        }
        if used[TX] {
            self.ctx
                .signal_since(&self.tx, 2 * self.pair + 1, &mut self.signalled[TX]);
        }
        match res {
            Ok(()) => true,
            Err(e) => self.ctx.fail(e),
        }
    }
}

/// Reads a little-endian u16 at `off` of the vnet header.
fn hdr16(h: &[u8; VNET_HDR_LEN], off: usize) -> usize {
    usize::from(u16::from_le_bytes([h[off], h[off + 1]]))
}

impl PairWorker {
    /// Returns chain `head` of direction `d` to the driver with `len` bytes written
    /// ([`Ctx::put_used`]). The driver sees it at the next [`Self::publish`]:
    /// [`Self::frame_done`] once [`PUBLISH_EVERY`] entries wait, or the end of the pass
    /// (`handle` publishes both directions before it signals).
    fn put_used(&mut self, d: usize, head: u16, len: u32) -> Result<(), Malformed> {
        let (q, index) = if d == TX {
            (&mut self.tx, 2 * self.pair + 1)
        } else {
            (&mut self.rx, 2 * self.pair)
        };
        self.ctx.put_used(q, index, head, len)?;
        self.unpublished[d] += 1;
        Ok(())
    }

    /// A frame's chains of direction `d` are all in the used ring: publishes them with those
    /// before once [`PUBLISH_EVERY`] wait. Only here and at a pass's end, never between two
    /// chains of one frame: a driver must see all the buffers of a merged frame together (a
    /// Linux guest drops a frame whose later buffers it does not find yet).
    fn frame_done(&mut self, d: usize) -> Result<(), Malformed> {
        if self.unpublished[d] >= PUBLISH_EVERY {
            self.publish(d)?;
        }
        Ok(())
    }

    /// Publishes the used entries of direction `d` written since the last time.
    fn publish(&mut self, d: usize) -> Result<(), Malformed> {
        if self.unpublished[d] == 0 {
            return Ok(());
        }
        self.unpublished[d] = 0;
        let (q, index) = if d == TX {
            (&self.tx, 2 * self.pair + 1)
        } else {
            (&self.rx, 2 * self.pair)
        };
        self.ctx.publish_used(q, index)
    }

    fn has(&self, bit: u32) -> bool {
        self.acked & (1 << bit) != 0
    }

    /// Whether the limiter of direction `d` lets `bytes` through now.
    fn admit(&mut self, d: usize, bytes: u64) -> bool {
        self.throttles[d].admit(bytes, &self.counters.throttled)
    }

    /// The TAP went away: link down, tell the guest, stop using it.
    fn tap_gone(&mut self, e: &std::io::Error) {
        if self.tap.take().is_none() {
            return;
        }
        tracing::warn!("virtio-net: the TAP is gone ({e}); link down");
        self.counters.link_down.fetch_add(1, Ordering::Relaxed);
        if self.link_up.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.ctx.interrupt.trigger(InterruptKind::Config) {
                tracing::warn!("virtio-net: cannot raise the config interrupt: {e}");
            }
        }
    }

    /// Checks a guest frame's vnet header against the frame length and what was negotiated.
    fn header_ok(&self, h: &[u8; VNET_HDR_LEN], frame: usize) -> bool {
        let (flags, gso) = (u32::from(h[0]), u32::from(h[1]));
        if frame < 14 || flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            return false;
        }
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            let (start, off) = (hdr16(h, 6), hdr16(h, 8));
            if !self.has(VIRTIO_NET_F_CSUM) || start + off + 2 > frame {
                return false;
            }
        }
        match gso {
            VIRTIO_NET_HDR_GSO_NONE => frame <= self.mtu + L2_OVERHEAD,
            VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 => {
                let bit = if gso == VIRTIO_NET_HDR_GSO_TCPV4 {
                    VIRTIO_NET_F_HOST_TSO4
                } else {
                    VIRTIO_NET_F_HOST_TSO6
                };
                self.has(bit)
                    && flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
                    && hdr16(h, 4) > 0
                    && hdr16(h, 2) <= frame
            }
            _ => false,
        }
    }

    /// Sends the guest's frames to the TAP.
    fn transmit(&mut self, used: &mut bool) -> Result<(), Malformed> {
        if self.throttles[TX].waiting {
            return Ok(());
        }
        let mut budget = QUEUE_SIZE;
        loop {
            self.tx
                .disable_notification(&self.ctx.mem)
                .map_err(|e| Malformed::Queue(2 * self.pair + 1, e))?;
            loop {
                if budget == 0 {
                    // Let the worker see a reset; come back for the rest.
                    let _ = self.tx_evt.write(1);
                    return Ok(());
                }
                let Some(chain) = self.ctx.pop_checked(&mut self.tx, 2 * self.pair + 1)? else {
                    break;
                };
                budget -= 1;
                let req = match chain {
                    Ok(req) => req,
                    Err((head, e)) => {
                        tracing::debug!("virtio-net: dropped a transmit chain: {e}");
                        self.drop_tx(head)?;
                        *used = true;
                        continue;
                    }
                };
                match self.send(&req) {
                    Ok(true) => {}
                    Ok(false) => {
                        // Throttled: the chain goes back; the timer brings us here again.
                        self.tx.go_to_previous_position();
                        self.ctx.recycle(req);
                        return Ok(());
                    }
                    Err(()) => {
                        self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.put_used(TX, req.head, 0)?;
                self.frame_done(TX)?;
                self.ctx.recycle(req);
                *used = true;
            }
            let more = self
                .tx
                .enable_notification(&self.ctx.mem)
                .map_err(|e| Malformed::Queue(2 * self.pair + 1, e))?;
            if !more {
                return Ok(());
            }
            // Each re-check costs budget like a frame: a ring that always says "more" but holds
            // nothing (a used ring laid over the available ring rewrites its index each time
            // notifications are switched) must not keep the worker from its events.
            budget = budget.saturating_sub(1);
        }
    }

    fn drop_tx(&mut self, head: u16) -> Result<(), Malformed> {
        self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
        self.put_used(TX, head, 0)?;
        self.frame_done(TX)
    }

    /// Sends one frame; `Ok(false)` when the rate limiter holds it back, `Err` when dropped.
    fn send(&mut self, req: &Request) -> Result<bool, ()> {
        if req.bufs.iter().any(|b| b.writable) {
            return Err(());
        }
        let total: usize = req.bufs.iter().map(|b| b.len as usize).sum();
        if !(VNET_HDR_LEN..=MAX_FRAME).contains(&total) {
            return Err(());
        }
        let mut h = [0u8; VNET_HDR_LEN];
        let mut got = 0;
        for b in &req.bufs {
            let n = (VNET_HDR_LEN - got).min(b.len as usize);
            self.ctx
                .mem
                .read_slice(&mut h[got..got + n], b.addr)
                .map_err(|_| ())?;
            got += n;
            if got == VNET_HDR_LEN {
                break;
            }
        }
        let frame = total - VNET_HDR_LEN;
        if !self.header_ok(&h, frame) {
            return Err(());
        }
        if self.tap.is_none() {
            return Err(());
        }
        if !self.admit(TX, frame as u64) {
            return Ok(false);
        }
        // The iovecs: on the stack for the few buffers a frame usually has.
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut few = [empty; 8];
        let mut many = Vec::new();
        let iov: &mut [libc::iovec] = if req.bufs.len() <= few.len() {
            &mut few
        } else {
            many.resize(req.bufs.len(), empty);
            &mut many
        };
        let mut n = 0;
        for b in req.bufs.iter().filter(|b| b.len > 0) {
            let s = self
                .ctx
                .mem
                .get_slice(b.addr, b.len as usize)
                .map_err(|_| ())?;
            iov[n] = libc::iovec {
                iov_base: s.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: b.len as usize,
            };
            n += 1;
        }
        let iov = &iov[..n];
        let Some(tap) = &self.tap else {
            return Err(());
        };
        // SAFETY: every iovec was checked to lie inside guest memory, which `self.ctx.mem`
        // keeps mapped (regions are never dropped from a `VmMemory`); the kernel only reads
        // from it.
        match unsafe { tap.writev(iov) } {
            Ok(_) => {
                self.tally.tx_frames += 1;
                self.tally.tx_bytes += frame as u64;
                Ok(true)
            }
            Err(e) if net::is_gone(&e) => {
                self.tap_gone(&e);
                Err(())
            }
            Err(e) => {
                tracing::debug!("virtio-net: the TAP refused a frame: {e}");
                Err(())
            }
        }
    }

    /// Moves frames from the TAP into the guest's receive buffers while both have some.
    fn receive(&mut self, used: &mut bool) -> Result<(), Malformed> {
        if self.throttles[RX].waiting {
            return Ok(());
        }
        for _ in 0..QUEUE_SIZE {
            let len = match self.pending {
                Some(len) => len,
                None => {
                    let Some(tap) = self.tap.as_ref().filter(|_| self.tap_readable) else {
                        return Ok(());
                    };
                    match tap.read(&mut self.buf) {
                        Ok(n) if n > VNET_HDR_LEN => n,
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            self.tap_readable = false;
                            return Ok(());
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) if net::is_gone(&e) => {
                            self.tap_gone(&e);
                            return Ok(());
                        }
                        Err(e) => {
                            ratelimit::warn_limited!("virtio-net: reading the TAP: {e}");
                            self.tap_readable = false;
                            return Ok(());
                        }
                    }
                }
            };
            self.pending = Some(len);
            if !self.admit(RX, (len - VNET_HDR_LEN) as u64) {
                return Ok(());
            }
            if !self.deliver(len, used)? {
                // Out of receive buffers: the driver's next notification brings us back.
                return Ok(());
            }
            self.pending = None;
        }
        // More may be queued: come back after a look at the other events.
        let _ = self.rx_evt.write(1);
        Ok(())
    }

    /// Copies the frame in `buf[..len]` into receive chains; false if there were not enough.
    fn deliver(&mut self, len: usize, used: &mut bool) -> Result<bool, Malformed> {
        let mut chains = std::mem::take(&mut self.rx_chains);
        let res = self.fill(len, used, &mut chains);
        for req in chains.drain(..) {
            self.ctx.recycle(req);
        }
        self.rx_chains = chains;
        res
    }

    /// [`deliver`](Self::deliver)'s work, taking chains into `chains`.
    fn fill(
        &mut self,
        len: usize,
        used: &mut bool,
        chains: &mut Vec<Request>,
    ) -> Result<bool, Malformed> {
        let mut room = 0usize;
        while room < len {
            let Some(chain) = self.rx_chain()? else {
                for _ in chains.iter() {
                    self.rx.go_to_previous_position();
                }
                return Ok(false);
            };
            match chain {
                Ok(req) if req.bufs.iter().all(|b| b.writable) => {
                    room += req.bufs.iter().map(|b| b.len as usize).sum::<usize>();
                    chains.push(req);
                    if !self.mrg_rxbuf {
                        break;
                    }
                }
                Ok(req) => {
                    self.rx_bad_chain(req.head)?;
                    self.ctx.recycle(req);
                    *used = true;
                }
                Err((head, e)) => {
                    tracing::debug!("virtio-net: dropped a receive chain: {e}");
                    self.rx_bad_chain(head)?;
                    *used = true;
                }
            }
        }
        if room < len {
            // Without merged buffers one chain must hold the frame: drop the frame, keep the
            // buffer.
            self.rx.go_to_previous_position();
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        let n = chains.len() as u16;
        self.buf[10..12].copy_from_slice(&n.to_le_bytes());
        let mut off = 0;
        for req in chains.iter() {
            let wrote = self.ctx.write_bufs(req, &self.buf[off..len])?;
            off += wrote;
            self.put_used(RX, req.head, wrote as u32)?;
        }
        self.frame_done(RX)?;
        *used = true;
        self.tally.rx_frames += 1;
        self.tally.rx_bytes += (len - VNET_HDR_LEN) as u64;
        Ok(true)
    }

    /// The next receive chain, with the receive queue's notifications off while the driver
    /// keeps it supplied: a driver that hands buffers back then need not notify the device
    /// (an exit per batch of buffers, and a wakeup of this worker), which only needs to hear
    /// of new buffers when it has run out. Out of buffers, notifications go back on, and the
    /// ring is looked at once more for a buffer the driver added just before. A new worker
    /// (activation, restore) does not know the flag, which lives in guest memory: its first
    /// look sets it either way.
    fn rx_chain(&mut self) -> Result<Popped, Malformed> {
        let index = 2 * self.pair;
        loop {
            if let Some(chain) = self.ctx.pop_checked(&mut self.rx, index)? {
                if self.rx_notify != Some(false) {
                    self.rx
                        .disable_notification(&self.ctx.mem)
                        .map_err(|e| Malformed::Queue(index, e))?;
                    self.rx_notify = Some(false);
                }
                return Ok(Some(chain));
            }
            if self.rx_notify == Some(true) {
                return Ok(None);
            }
            self.rx_notify = Some(true);
            let more = self
                .rx
                .enable_notification(&self.ctx.mem)
                .map_err(|e| Malformed::Queue(index, e))?;
            if !more {
                return Ok(None);
            }
        }
    }

    fn rx_bad_chain(&mut self, head: u16) -> Result<(), Malformed> {
        self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
        self.put_used(RX, head, 0)?;
        self.frame_done(RX)
    }
}

/// The control queue: answers the driver's commands.
struct CtrlWorker {
    ctx: Ctx,
    index: u16,
    queue: Queue,
    event: EventFd,
    pairs: u16,
}

impl Handler for CtrlWorker {
    fn fds(&self) -> Vec<RawFd> {
        vec![self.event.as_raw_fd()]
    }

    fn handle(&mut self, _token: usize) -> bool {
        drain(&self.event);
        let mut used = false;
        let res = self.process(&mut used);
        if used {
            self.ctx.signal(&self.queue, self.index);
        }
        match res {
            Ok(()) => true,
            Err(e) => self.ctx.fail(e),
        }
    }
}

impl CtrlWorker {
    fn process(&mut self, used: &mut bool) -> Result<(), Malformed> {
        for _ in 0..QUEUE_SIZE {
            let Some(chain) = self.ctx.pop_checked(&mut self.queue, self.index)? else {
                return Ok(());
            };
            let req = match chain {
                Ok(r) => r,
                Err((head, _)) => {
                    self.ctx.add_used(&mut self.queue, self.index, head, 0)?;
                    *used = true;
                    continue;
                }
            };
            let ack = self.command(&req);
            let len = match req.bufs.last().filter(|b| b.writable && b.len > 0) {
                Some(b) => {
                    let at = GuestAddress(b.addr.0 + u64::from(b.len) - 1);
                    self.ctx.mem.write_obj(ack, at).map_err(Malformed::Memory)?;
                    1
                }
                None => 0,
            };
            self.ctx
                .add_used(&mut self.queue, self.index, req.head, len)?;
            *used = true;
        }
        let _ = self.event.write(1);
        Ok(())
    }

    /// Runs one command; returns VIRTIO_NET_OK or VIRTIO_NET_ERR.
    fn command(&self, req: &Request) -> u8 {
        let mut cmd = [0u8; 4];
        let mut got = 0;
        for b in req.bufs.iter().filter(|b| !b.writable) {
            let n = (cmd.len() - got).min(b.len as usize);
            if self
                .ctx
                .mem
                .read_slice(&mut cmd[got..got + n], b.addr)
                .is_err()
            {
                return VIRTIO_NET_ERR as u8;
            }
            got += n;
            if got == cmd.len() {
                break;
            }
        }
        let ok = match (u32::from(cmd[0]), u32::from(cmd[1])) {
            // Receive filtering: tern hands the guest every frame; promiscuous and multicast
            // settings and MAC tables need nothing.
            (VIRTIO_NET_CTRL_RX, _) | (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => true,
            (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => true,
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
                // Every pair is served whether the driver uses it or not.
                let n = u16::from_le_bytes([cmd[2], cmd[3]]);
                got == 4 && (1..=self.pairs).contains(&n)
            }
            _ => false,
        };
        if ok {
            VIRTIO_NET_OK as u8
        } else {
            VIRTIO_NET_ERR as u8
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use devices::BusDevice;
    use vm_memory::Bytes;

    use super::*;
    use crate::testing::*;

    /// A TAP in a network namespace of this test thread's own, up, with a packet socket on it
    /// standing for the host side.
    struct Wire {
        taps: Option<Vec<Tap>>,
        peer: std::fs::File,
        ns: String,
    }

    fn ioctl_ok(r: libc::c_int, what: &str) {
        assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    }

    fn wire(name: &str) -> Option<Wire> {
        // SAFETY: unshare affects only this thread's network namespace; no memory involved.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = std::io::Error::last_os_error();
            assert!(
                std::env::var_os("CI").is_none(),
                "unshare(CLONE_NEWNET): {e}"
            );
            eprintln!("SKIP: cannot create a network namespace ({e})");
            return None;
        }
        // No IPv6 chatter (router solicitations and the like) on the new interface: the test
        // counts every frame the guest receives.
        for f in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
        }
        let taps = match Tap::open(name, 1) {
            Ok(t) => t,
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("SKIP: no TAP devices here ({e})");
                return None;
            }
            Err(e) => panic!("{e}"),
        };
        // Bring the interface up and find its index.
        // SAFETY: plain socket creation.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        ioctl_ok(s, "socket");
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS/SIOCGIFINDEX read and write a 40-byte ifreq.
        unsafe {
            ioctl_ok(
                libc::ioctl(s, libc::SIOCGIFFLAGS, req.as_mut_ptr()),
                "get flags",
            );
            let flags = i16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as i16;
            req[16..18].copy_from_slice(&flags.to_ne_bytes());
            ioctl_ok(
                libc::ioctl(s, libc::SIOCSIFFLAGS, req.as_mut_ptr()),
                "set up",
            );
            ioctl_ok(
                libc::ioctl(s, libc::SIOCGIFINDEX, req.as_mut_ptr()),
                "index",
            );
            libc::close(s);
        }
        let ifindex = i32::from_ne_bytes([req[16], req[17], req[18], req[19]]);
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; ownership moves into a File below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        ioctl_ok(fd, "packet socket");
        // SAFETY: `fd` is a fresh descriptor we own.
        let peer = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; bind reads `size_of` bytes of it.
        unsafe {
            let mut sa: libc::sockaddr_ll = std::mem::zeroed();
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = proto;
            sa.sll_ifindex = ifindex;
            ioctl_ok(
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ),
                "bind",
            );
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let ns = format!("/proc/{}/task/{}/ns/net", std::process::id(), unsafe {
            // SAFETY: gettid has no preconditions.
            libc::gettid()
        });
        Some(Wire {
            taps: Some(taps),
            peer,
            ns,
        })
    }

    impl Wire {
        /// The next frame the host side sees with ethertype 0x88b5 (IPv6 router chatter and
        /// the like are skipped), or None after a timeout.
        fn recv(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; 70000];
            for _ in 0..20 {
                let n = std::io::Read::read(&mut &self.peer, &mut buf).ok()?;
                if n >= 14 && buf[12..14] == [0x88, 0xb5] {
                    return Some(buf[..n].to_vec());
                }
            }
            None
        }

        fn send(&self, frame: &[u8]) {
            std::io::Write::write_all(&mut &self.peer, frame).unwrap();
        }

        /// Deletes the TAP, as an administrator would.
        fn delete_tap(&self, name: &str) {
            let ok = std::process::Command::new("nsenter")
                .args([&format!("--net={}", self.ns), "ip", "link", "del", name])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "cannot delete the TAP with nsenter + ip");
        }
    }

    const MAC: [u8; 6] = [0x02, 0x74, 0x6e, 1, 2, 3];
    const FEATURES: u64 = VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_MRG_RXBUF;
    const RXBUF: u64 = BUFS;
    const TXBUF: u64 = BUFS + 0x10_0000;

    fn frame(len: usize, tag: u8) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend((14..len).map(|i| (i as u8) ^ tag));
        f
    }

    struct Rig {
        d: Driver,
        rx: VirtQueue,
        tx: VirtQueue,
        counters: Arc<NetCounters>,
        wire: Wire,
    }

    fn rig(name: &str, mtu: u16) -> Option<Rig> {
        rig_with(name, mtu, QSIZE, |_, _| {})
    }

    /// [`rig`], with queues of `size` and `before_ok(driver, rx queue)` run just before the
    /// driver sets DRIVER_OK.
    fn rig_with(
        name: &str,
        mtu: u16,
        size: u16,
        before_ok: impl FnOnce(&Driver, &VirtQueue),
    ) -> Option<Rig> {
        let mut wire = wire(name)?;
        let dev = Net::new(
            wire.taps.take().unwrap(),
            NetOptions {
                mac: MAC,
                mtu,
                offload: true,
                rx: Limits::default(),
                tx: Limits::default(),
            },
        );
        let counters = dev.counters();
        let mut d = Driver::new(Box::new(dev));
        assert!(d.negotiate(FEATURES | 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4));
        let rx = VirtQueue::with_size(0x1000, size);
        let tx = VirtQueue::with_size(0x4000, size);
        d.setup_queue(0, &rx);
        d.setup_queue(1, &tx);
        before_ok(&d, &rx);
        d.add_status(DRIVER_OK);
        assert_eq!(d.read(REG_STATUS) & NEEDS_RESET, 0);
        Some(Rig {
            d,
            rx,
            tx,
            counters,
            wire,
        })
    }

    impl Rig {
        fn transmit(&mut self, hdr: [u8; 12], frame: &[u8]) {
            self.d.mem.write_slice(&hdr, GuestAddress(TXBUF)).unwrap();
            self.d
                .mem
                .write_slice(frame, GuestAddress(TXBUF + 12))
                .unwrap();
            let before = self.tx.used_idx(&self.d.mem);
            self.tx.add_chain(
                &self.d.mem,
                &[(TXBUF, 12, false), (TXBUF + 12, frame.len() as u32, false)],
            );
            self.d.notify(1);
            assert!(wait_for(|| self.tx.used_idx(&self.d.mem) != before));
        }
    }

    #[test]
    fn frames_go_out_and_come_in_through_a_real_tap() {
        let Some(mut r) = rig("ternt0", 1500) else {
            return;
        };
        let mut cfg = [0u8; 12];
        r.d.t.read(0x100, &mut cfg);
        assert_eq!(cfg[..6], MAC);
        assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500);
        // Guest -> host.
        let out = frame(600, 1);
        r.transmit([0; 12], &out);
        assert_eq!(r.wire.recv().as_deref(), Some(&out[..]));
        // Host -> guest, into two 1 KiB buffers merged for a 1500-byte frame.
        for i in 0..2u64 {
            r.rx.add_chain(&r.d.mem, &[(RXBUF + i * 0x1000, 1024, true)]);
        }
        r.d.notify(0);
        let inb = frame(1500, 2);
        r.wire.send(&inb);
        assert!(wait_for(|| r.rx.used_idx(&r.d.mem) == 2));
        assert_eq!(r.rx.used_elem(&r.d.mem, 0).1, 1024);
        assert_eq!(r.rx.used_elem(&r.d.mem, 1).1, 1500 + 12 - 1024);
        let mut got = vec![0u8; 2048];
        r.d.mem
            .read_slice(&mut got[..1024], GuestAddress(RXBUF))
            .unwrap();
        r.d.mem
            .read_slice(&mut got[1024..], GuestAddress(RXBUF + 0x1000))
            .unwrap();
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
        assert_eq!(&got[12..1512], &inb[..]);
        // Counted at the end of the worker's pass, just after the used ring.
        assert!(wait_for(
            || r.counters.rx_frames.load(Ordering::Relaxed) == 1
        ));
        assert!(wait_for(
            || r.counters.tx_frames.load(Ordering::Relaxed) == 1
        ));
    }

    /// A frame in many buffers (more than the few the device gathers on its stack) goes out
    /// whole and in order, and so does a frame in few after it.
    #[test]
    fn a_frame_in_many_buffers_goes_out_whole() {
        let Some(mut r) = rig("ternt7", 1500) else {
            return;
        };
        let out = frame(1200, 7);
        let mut bytes = vec![0u8; 12];
        bytes.extend_from_slice(&out);
        r.d.mem.write_slice(&bytes, GuestAddress(TXBUF)).unwrap();
        // The header, then the frame in 100-byte pieces: 13 buffers.
        let mut bufs = vec![(TXBUF, 12, false)];
        let mut off = 12u64;
        while off < bytes.len() as u64 {
            let len = (bytes.len() as u64 - off).min(100);
            bufs.push((TXBUF + off, len as u32, false));
            off += len;
        }
        assert!(bufs.len() > 8);
        r.tx.add_chain(&r.d.mem, &bufs);
        r.d.notify(1);
        assert_eq!(r.wire.recv().as_deref(), Some(&out[..]));
        let next = frame(300, 8);
        r.transmit([0; 12], &next);
        assert_eq!(r.wire.recv().as_deref(), Some(&next[..]));
        // Counted at the end of the worker's pass, just after the used ring.
        assert!(wait_for(
            || r.counters.tx_frames.load(Ordering::Relaxed) == 2
        ));
        assert_eq!(r.counters.tx_dropped.load(Ordering::Relaxed), 0);
    }

    /// A pass that returns more than [`PUBLISH_EVERY`] chains publishes them all (part on the
    /// way, the rest at its end), across the ring's wrap, and the frames go out in order.
    #[test]
    fn many_frames_in_one_pass_are_all_returned() {
        let Some(mut r) = rig_with("ternt8", 1500, QUEUE_SIZE, |_, _| {}) else {
            return;
        };
        let mut sent = Vec::new();
        let mut want = 0u16;
        // 200 chains, then 100 more: the second pass wraps the 256-entry ring.
        for batch in [200usize, 100] {
            assert!(batch > usize::from(PUBLISH_EVERY) || want > 0);
            for i in 0..batch {
                // Header and frame in one buffer each.
                let out = frame(60 + i % 64, (sent.len() % 251) as u8);
                let at = TXBUF + 0x800 * i as u64;
                let mut bytes = vec![0u8; 12];
                bytes.extend_from_slice(&out);
                r.d.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
                r.tx.add_chain(&r.d.mem, &[(at, bytes.len() as u32, false)]);
                sent.push(out);
            }
            r.d.notify(1);
            want += batch as u16;
            assert!(
                wait_for(|| r.tx.used_idx(&r.d.mem) == want),
                "used index {} of {want}",
                r.tx.used_idx(&r.d.mem)
            );
            // Read before the next batch: the host socket holds only so many.
            for (i, out) in sent.iter().enumerate().skip(sent.len() - batch) {
                assert_eq!(r.wire.recv().as_deref(), Some(&out[..]), "frame {i}");
            }
        }
        assert!(wait_for(
            || r.counters.tx_frames.load(Ordering::Relaxed) == sent.len() as u64
        ));
    }

    /// The driver never sees part of a merged frame: every used index it can read ends on a
    /// frame's last buffer, also where a pass publishes before its end. (Publishing at the
    /// 128th entry whatever the frame showed index 128 here in 3 of 5 runs.)
    #[test]
    fn a_merged_frame_is_published_whole() {
        let Some(r) = rig_with("ternt9", 1500, QUEUE_SIZE, |_, _| {}) else {
            return;
        };
        // Queued in the TAP before there are buffers, so that one pass delivers them all: one
        // frame in one buffer, then 100 in two each, so that the 128th buffer is the first
        // of a frame.
        let frames: Vec<Vec<u8>> = std::iter::once(frame(100, 0))
            .chain((1..=100).map(|i| frame(1500, i as u8)))
            .collect();
        for f in &frames {
            r.wire.send(f);
        }
        let buffers = 1 + 2 * 100u16;
        assert!(buffers > PUBLISH_EVERY && buffers < QUEUE_SIZE);
        let mut rx = r.rx;
        for i in 0..u64::from(buffers) {
            rx.add_chain(&r.d.mem, &[(RXBUF + i * 0x400, 1024, true)]);
        }
        let mut d = r.d;
        d.notify(0);
        // Every value the index takes, read without pause.
        let mut seen = vec![0u16];
        let start = std::time::Instant::now();
        while *seen.last().unwrap() != buffers {
            assert!(start.elapsed() < TIMEOUT, "used index stuck at {seen:?}");
            let idx = rx.used_idx(&d.mem);
            if seen.last() != Some(&idx) {
                seen.push(idx);
            }
        }
        // Walk the used ring frame by frame (num_buffers in each first buffer's header).
        let mut ends = vec![0u16];
        while *ends.last().unwrap() < buffers {
            let at = *ends.last().unwrap();
            let id = rx.used_elem(&d.mem, at).0;
            let n: u16 = d
                .mem
                .read_obj(GuestAddress(RXBUF + u64::from(id) * 0x400 + 10))
                .unwrap();
            assert!(n > 0);
            ends.push(at + n);
        }
        assert_eq!(ends.len(), frames.len() + 1);
        for v in &seen {
            assert!(ends.contains(v), "used index {v} splits a frame ({seen:?})");
        }
    }

    #[test]
    fn the_receive_queue_wants_no_notification_until_it_runs_out_of_buffers() {
        let Some(mut r) = rig("ternt5", 1500) else {
            return;
        };
        // The used ring's flags: VRING_USED_F_NO_NOTIFY (1) or none.
        let flags = |r: &Rig| r.d.mem.read_obj::<u16>(GuestAddress(r.rx.used)).unwrap();
        assert_eq!(flags(&r), 0, "notifications start on");
        for i in 0..2u64 {
            r.rx.add_chain(&r.d.mem, &[(RXBUF + i * 0x1000, 2048, true)]);
        }
        r.d.notify(0);
        r.wire.send(&frame(600, 1));
        assert!(wait_for(|| r.rx.used_idx(&r.d.mem) == 1));
        assert_eq!(flags(&r), 1, "off while the device holds buffers");
        r.wire.send(&frame(600, 2));
        assert!(wait_for(|| r.rx.used_idx(&r.d.mem) == 2));
        assert_eq!(
            flags(&r),
            1,
            "off until the device looks for a buffer and finds none"
        );
        // The third frame finds no buffer: notifications come back on and the frame waits.
        let third = frame(600, 3);
        r.wire.send(&third);
        assert!(wait_for(|| flags(&r) == 0), "on once out of buffers");
        assert_eq!(r.rx.used_idx(&r.d.mem), 2);
        r.rx.add_chain(&r.d.mem, &[(RXBUF + 0x2000, 2048, true)]);
        r.d.notify(0);
        assert!(wait_for(|| r.rx.used_idx(&r.d.mem) == 3));
        let mut got = vec![0u8; 600];
        r.d.mem
            .read_slice(&mut got, GuestAddress(RXBUF + 0x2000 + 12))
            .unwrap();
        assert_eq!(got, third);
        assert_eq!(flags(&r), 1, "off again with a buffer taken");
    }

    /// A restored guest's used ring may say "no notification" from before; a new worker that
    /// finds no buffer must not trust it, or it would wait for a notification that never comes.
    #[test]
    fn a_new_worker_out_of_buffers_turns_notifications_on_whatever_the_ring_said() {
        let Some(r) = rig_with("ternt6", 1500, QSIZE, |d, rx| {
            d.mem.write_obj(1u16, GuestAddress(rx.used)).unwrap();
        }) else {
            return;
        };
        r.wire.send(&frame(600, 1));
        assert!(wait_for(|| r
            .d
            .mem
            .read_obj::<u16>(GuestAddress(r.rx.used))
            .unwrap()
            == 0));
    }

    #[test]
    fn hostile_frames_are_dropped_and_the_device_keeps_working() {
        let Some(mut r) = rig("ternt1", 1500) else {
            return;
        };
        let gso = |kind: u8, hdr_len: u16, size: u16| {
            let mut h = [0u8; 12];
            h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
            h[1] = kind;
            h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
            h[4..6].copy_from_slice(&size.to_le_bytes());
            h[6..8].copy_from_slice(&34u16.to_le_bytes());
            h[8..10].copy_from_slice(&16u16.to_le_bytes());
            h
        };
        let mut csum_past_end = [0u8; 12];
        csum_past_end[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        csum_past_end[6..8].copy_from_slice(&599u16.to_le_bytes());
        let cases: [(&str, [u8; 12], Vec<u8>); 6] = [
            ("unknown GSO type", gso(0x55, 54, 1448), frame(600, 3)),
            (
                "GSO header past the frame",
                gso(1, 4000, 1448),
                frame(600, 3),
            ),
            (
                "GSO not negotiated (TCPv6)",
                gso(4, 54, 1448),
                frame(600, 3),
            ),
            ("checksum past the frame", csum_past_end, frame(600, 3)),
            ("larger than the MTU", [0; 12], frame(1500 + 18 + 100, 3)),
            ("shorter than an Ethernet header", [0; 12], vec![1, 2, 3]),
        ];
        for (n, (what, hdr, f)) in cases.iter().enumerate() {
            r.transmit(*hdr, f);
            assert_eq!(
                r.counters.tx_dropped.load(Ordering::Relaxed),
                n as u64 + 1,
                "{what}"
            );
        }
        // A looping chain is returned unused and counted.
        r.tx.set_desc(&r.d.mem, 10, TXBUF, 12, NEXT, 11);
        r.tx.set_desc(&r.d.mem, 11, TXBUF, 12, NEXT, 10);
        let before = r.tx.used_idx(&r.d.mem);
        r.tx.publish(&r.d.mem, 10);
        r.d.notify(1);
        assert!(wait_for(|| r.tx.used_idx(&r.d.mem) != before));
        assert_eq!(r.counters.tx_dropped.load(Ordering::Relaxed), 7);
        assert_eq!(r.d.read(REG_STATUS) & NEEDS_RESET, 0, "device broken");
        // Nothing malformed reached the host; a good frame still does.
        let good = frame(200, 4);
        r.transmit([0; 12], &good);
        assert_eq!(r.wire.recv().as_deref(), Some(&good[..]));
    }

    #[test]
    fn a_deleted_tap_takes_the_link_down() {
        let Some(mut r) = rig("ternt2", 1500) else {
            return;
        };
        r.wire.delete_tap("ternt2");
        // The next transmission finds the TAP gone (or the TAP's error event did already).
        r.transmit([0; 12], &frame(100, 5));
        assert!(wait_for(
            || r.counters.link_down.load(Ordering::Relaxed) == 1
        ));
        let mut status = [0u8; 2];
        r.d.t.read(0x106, &mut status);
        assert_eq!(status, [0, 0], "link still up");
        assert_ne!(r.d.read(REG_ISR) & 2, 0, "no config interrupt");
        // Frames sent now are dropped, not stuck.
        let before = r.counters.tx_dropped.load(Ordering::Relaxed);
        r.transmit([0; 12], &frame(100, 6));
        assert_eq!(r.counters.tx_dropped.load(Ordering::Relaxed), before + 1);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(r.d.read(REG_STATUS) & NEEDS_RESET, 0);
    }

    /// The link state is the back-end's part of a snapshot; a device restored with its link
    /// down comes back up on the TAP it has when the driver starts it, and tells the guest.
    #[test]
    fn a_restored_link_down_comes_back_up_and_says_so() {
        let Some(mut w) = wire("ternt3") else {
            return;
        };
        let mut dev = Net::new(
            w.taps.take().unwrap(),
            NetOptions {
                mac: MAC,
                mtu: 1500,
                offload: true,
                rx: Limits::default(),
                tx: Limits::default(),
            },
        );
        assert_eq!(
            dev.save_backend(),
            Some(serde_json::json!({ "link_up": true }))
        );
        assert!(dev
            .restore_backend(&serde_json::json!({ "link_up": 1 }))
            .is_err());
        assert!(dev
            .restore_backend(&serde_json::json!({ "up": true }))
            .is_err());
        dev.restore_backend(&serde_json::json!({ "link_up": false }))
            .unwrap();
        assert_eq!(
            dev.save_backend(),
            Some(serde_json::json!({ "link_up": false }))
        );
        let mut d = Driver::new(Box::new(dev));
        assert!(d.negotiate(FEATURES));
        let (rx, tx) = (VirtQueue::new(0x1000), VirtQueue::new(0x2000));
        d.setup_queue(0, &rx);
        d.setup_queue(1, &tx);
        d.add_status(DRIVER_OK);
        let mut status = [0u8; 2];
        d.t.read(0x106, &mut status);
        assert_eq!(status, [1, 0], "link still down");
        assert_ne!(d.read(REG_ISR) & 2, 0, "no config interrupt");
    }

    /// Sets up a device whose queue `q` (0 receive, 1 transmit) has its used ring two bytes
    /// into its available ring, lets `feed` give it work, and checks that the worker still
    /// comes back to its events (a pause returns).
    fn overlaid_ring_does_not_hold_the_worker(
        name: &str,
        q: usize,
        feed: impl FnOnce(&mut Driver, &mut VirtQueue, &Wire),
    ) {
        let Some(mut wire) = wire(name) else {
            return;
        };
        let dev = Net::new(
            wire.taps.take().unwrap(),
            NetOptions {
                mac: MAC,
                mtu: 1500,
                offload: false,
                rx: Limits::default(),
                tx: Limits::default(),
            },
        );
        let mut d = Driver::new(Box::new(dev));
        assert!(d.negotiate(FEATURES));
        let mut queues = [VirtQueue::new(0x1000), VirtQueue::new(0x2000)];
        queues[q].avail += 2;
        queues[q].used = queues[q].avail + 2;
        d.setup_queue(0, &queues[0]);
        d.setup_queue(1, &queues[1]);
        d.add_status(DRIVER_OK);
        feed(&mut d, &mut queues[q], &wire);
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use crate::transport::PauseDevice;
            std::thread::sleep(std::time::Duration::from_millis(50));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            let stopped = d.t.pause_device(deadline);
            let _ = done.send(stopped);
            d
        });
        let paused = wait.recv_timeout(std::time::Duration::from_secs(5)) == Ok(true);
        assert!(paused, "the worker never came back to its events");
    }

    /// As virtio-blk's test of the same name (the virtio_blk fuzz target found that loop; the
    /// transmit queue had the same one): a used ring two bytes into the available ring makes
    /// the ring say "more" at every re-check and hold nothing at every pop.
    #[test]
    fn a_used_ring_over_the_available_ring_does_not_hold_the_worker() {
        overlaid_ring_does_not_hold_the_worker("tnoverlap0", 1, |d, tx, _| {
            tx.set_desc(&d.mem, 0, 0, 0, 0, 0);
            tx.publish(&d.mem, 0);
            d.notify(1);
        });
    }

    /// The same on the receive side, which switches its queue's notifications too, with a
    /// zero-length receive buffer and frames waiting.
    #[test]
    fn a_receive_used_ring_over_the_available_ring_does_not_hold_the_worker() {
        overlaid_ring_does_not_hold_the_worker("tnoverlap1", 0, |d, rx, wire| {
            rx.set_desc(&d.mem, 0, RXBUF, 0, WRITE, 0);
            rx.publish(&d.mem, 0);
            d.notify(0);
            for tag in 0..4 {
                wire.send(&frame(600, tag));
            }
        });
    }
}
