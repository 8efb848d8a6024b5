//! virtio-net (virtio 1.x §5.1) on top of [`Device`] and [`Virtqueue`]:
//! queue pair 0 only (rx0 = queue 0, tx0 = queue 1), no control queue, no
//! interrupts.
//!
//! Every frame carries the 12-byte `struct virtio_net_hdr_v1` (VERSION_1
//! makes `num_buffers` part of it in both directions):
//! `{u8 flags, u8 gso_type, u16 hdr_len, u16 gso_size, u16 csum_start,
//! u16 csum_offset, u16 num_buffers}`.
//!
//! - Receive: one device-writable buffer of [`RX_BUF`] bytes per descriptor,
//!   as many as the queue holds (at most [`QUEUE_SIZE`]). With MRG_RXBUF a
//!   frame may span `num_buffers` of them, which [`Net::recv`] joins.
//!   Buffers go back to the ring as soon as they are copied out; the device
//!   is notified once per [`RX_KICK_BATCH`] refills, or when the ring is
//!   found empty.
//! - Transmit: one chain per frame, device-readable, either one descriptor
//!   (header and frame back to back) or two (header, frame), copied into
//!   one of [`QUEUE_SIZE`] slots of [`TX_SLOT`] bytes. [`Net::push_tx`]
//!   takes any hand-built chain (benchmarks, malformed frames).

use super::{Buf, Device, Virtqueue};
use crate::rt::clock;
use crate::rt::io::pause;
use crate::rt::phys::PhysAlloc;

/// Feature bits (virtio 1.x §5.1.3).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_MQ: u64 = 1 << 22;

/// What every user of the driver negotiates when offered.
pub const WANTED: u64 = F_MAC | F_STATUS | F_MTU | F_MRG_RXBUF;
/// Sending TCP/IPv4 GSO frames (HOST_TSO4 needs CSUM).
pub const WANTED_TX_TSO: u64 = F_CSUM | F_HOST_TSO4;
/// Receiving them (GUEST_TSO4 needs GUEST_CSUM); only asked for together
/// with MRG_RXBUF, since the receive buffers are 2 KiB.
pub const WANTED_RX_TSO: u64 = F_GUEST_CSUM | F_GUEST_TSO4;

/// `flags` of the header.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
pub const HDR_F_DATA_VALID: u8 = 2;
/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
/// Size of `struct virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;
/// `status` bit in the configuration.
pub const STATUS_LINK_UP: u16 = 1;
/// MTU assumed without VIRTIO_NET_F_MTU.
pub const DEFAULT_MTU: u16 = 1500;

/// Configuration offsets.
const CFG_MAC: u64 = 0;
const CFG_STATUS: u64 = 6;
const CFG_MAX_PAIRS: u64 = 8;
const CFG_MTU: u64 = 10;

/// Largest queue the driver asks for (both queues).
pub const QUEUE_SIZE: u16 = 256;
/// Bytes per receive buffer.
pub const RX_BUF: u32 = 2048;
/// Bytes per transmit slot; the frame of a two-descriptor chain starts at
/// [`TX_SPLIT_OFF`] in it.
pub const TX_SLOT: u64 = 2048;
const TX_SPLIT_OFF: u64 = 64;
/// Largest frame [`Net::send`] takes.
pub const MAX_SEND: usize = (TX_SLOT - TX_SPLIT_OFF) as usize;
/// Receive buffers recycled before the device is notified.
pub const RX_KICK_BATCH: u16 = 16;
const NO_SLOT: u16 = u16::MAX;

/// `struct virtio_net_hdr_v1`.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Hdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl Hdr {
    /// Store the header at `addr`.
    ///
    /// # Safety
    /// `addr` points to [`HDR_LEN`] bytes of our RAM no device is reading.
    pub unsafe fn write(&self, addr: u64) {
        let p = addr as *mut u8;
        // SAFETY: forwarded; unaligned little-endian stores.
        unsafe {
            p.write_volatile(self.flags);
            p.add(1).write_volatile(self.gso_type);
            for (k, v) in [
                self.hdr_len,
                self.gso_size,
                self.csum_start,
                self.csum_offset,
                self.num_buffers,
            ]
            .into_iter()
            .enumerate()
            {
                (p.add(2 + 2 * k) as *mut u16).write_unaligned(v.to_le());
            }
        }
    }

    /// Load the header at `addr`.
    ///
    /// # Safety
    /// `addr` points to [`HDR_LEN`] bytes of our RAM the device has finished
    /// writing.
    pub unsafe fn read(addr: u64) -> Hdr {
        let p = addr as *const u8;
        // SAFETY: forwarded.
        let w =
            |k: usize| unsafe { u16::from_le((p.add(2 + 2 * k) as *const u16).read_unaligned()) };
        Hdr {
            // SAFETY: forwarded.
            flags: unsafe { p.read_volatile() },
            // SAFETY: forwarded.
            gso_type: unsafe { p.add(1).read_volatile() },
            hdr_len: w(0),
            gso_size: w(1),
            csum_start: w(2),
            csum_offset: w(3),
            num_buffers: w(4),
        }
    }
}

/// Receive buffers and transmit slots, allocated once and reused when the
/// device is started again.
#[derive(Clone, Copy)]
pub struct Mem {
    rx: u64,
    tx: u64,
}

impl Mem {
    pub fn alloc(pa: &mut PhysAlloc) -> Option<Mem> {
        let n = u64::from(QUEUE_SIZE);
        Some(Mem {
            rx: pa.alloc(n * u64::from(RX_BUF), 4096)?,
            tx: pa.alloc(n * TX_SLOT, 4096)?,
        })
    }
}

/// A received frame (its bytes went to the caller's buffer).
#[derive(Clone, Copy)]
pub struct Frame {
    /// Frame length (without the virtio-net header).
    pub len: usize,
    /// Bytes copied out (less than `len` when the buffer was too small).
    pub copied: usize,
    pub hdr: Hdr,
    /// Receive buffers the frame spanned.
    pub buffers: u16,
}

/// A started virtio-net device with rx0 full of buffers and an empty tx0.
pub struct Net {
    pub dev: Device,
    pub rx: Virtqueue,
    pub tx: Virtqueue,
    /// Features the device offers, and those negotiated.
    pub offered: u64,
    pub features: u64,
    /// `mac` (zero without F_MAC), `status` (None without F_STATUS), `mtu`
    /// (None without F_MTU), `max_virtqueue_pairs` (0 without F_MQ).
    pub mac: [u8; 6],
    pub status: Option<u16>,
    pub mtu: Option<u16>,
    pub max_pairs: u16,
    pub timeout_ns: u64,
    mem: Mem,
    /// Receive buffer of each posted head descriptor.
    rx_addr: [u64; QUEUE_SIZE as usize],
    rx_unkicked: u16,
    /// Transmit slot of each in-flight head descriptor (`NO_SLOT`: a chain
    /// from `push_tx`), and the free slots.
    tx_slot_of: [u16; QUEUE_SIZE as usize],
    tx_free: [u16; QUEUE_SIZE as usize],
    tx_nfree: usize,
    /// Chains on tx0 the device has not returned yet.
    pub tx_inflight: u32,
}

impl Net {
    /// Reset and start `dev`, negotiating [`WANTED`] plus `extra`, and fill
    /// rx0 with buffers from `mem`.
    pub fn start(
        dev: &Device,
        pa: &mut PhysAlloc,
        mem: Mem,
        extra: u64,
        timeout_ns: u64,
    ) -> Result<Net, &'static str> {
        let offered = dev.device_features();
        let mut wanted = WANTED | extra;
        if offered & F_MRG_RXBUF == 0 {
            // 2 KiB buffers cannot take a 64 KiB frame.
            wanted &= !(F_GUEST_TSO4 | F_GUEST_TSO6);
        }
        let mut qs = [Virtqueue::EMPTY; 2];
        let features = dev.start_with(pa, &mut qs, QUEUE_SIZE, wanted)?;
        let [rx, tx] = qs;
        if rx.size < 2 || tx.size < 2 {
            return Err("queue smaller than 2 entries");
        }
        let has = |f| features & f != 0;
        let mut mac = [0; 6];
        if has(F_MAC) {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = dev.config8(CFG_MAC + i as u64)?;
            }
        }
        let mut n = Net {
            dev: *dev,
            rx,
            tx,
            offered,
            features,
            mac,
            status: None,
            mtu: if has(F_MTU) {
                Some(dev.config16(CFG_MTU)?)
            } else {
                None
            },
            max_pairs: if offered & F_MQ != 0 {
                dev.config16(CFG_MAX_PAIRS)?
            } else {
                0
            },
            timeout_ns,
            mem,
            rx_addr: [0; QUEUE_SIZE as usize],
            rx_unkicked: 0,
            tx_slot_of: [NO_SLOT; QUEUE_SIZE as usize],
            tx_free: [0; QUEUE_SIZE as usize],
            tx_nfree: QUEUE_SIZE as usize,
            tx_inflight: 0,
        };
        n.status = n.read_status()?;
        for (i, s) in n.tx_free.iter_mut().enumerate() {
            *s = i as u16;
        }
        for i in 0..u64::from(n.rx.size.min(QUEUE_SIZE)) {
            n.post_rx(mem.rx + i * u64::from(RX_BUF))?;
        }
        n.kick_rx();
        Ok(n)
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// The configuration's `status` now (None without F_STATUS).
    pub fn read_status(&self) -> Result<Option<u16>, &'static str> {
        if self.has(F_STATUS) {
            Ok(Some(self.dev.config16(CFG_STATUS)?))
        } else {
            Ok(None)
        }
    }

    /// Whether the link is up (always, without F_STATUS).
    pub fn link_up(&self) -> bool {
        self.status.is_none_or(|s| s & STATUS_LINK_UP != 0)
    }

    /// The MTU (from the configuration, else 1500).
    pub fn mtu(&self) -> u16 {
        self.mtu.unwrap_or(DEFAULT_MTU)
    }

    fn post_rx(&mut self, addr: u64) -> Result<(), &'static str> {
        let head = self.rx.push(&[Buf {
            addr,
            len: RX_BUF,
            device_writes: true,
        }])?;
        self.rx_addr[usize::from(head)] = addr;
        self.rx_unkicked += 1;
        Ok(())
    }

    /// Notify rx0 of recycled buffers, if any.
    pub fn kick_rx(&mut self) {
        if self.rx_unkicked > 0 {
            self.dev.notify(&self.rx);
            self.rx_unkicked = 0;
        }
    }

    /// The next completed receive buffer `(address, bytes written)`,
    /// waiting up to the timeout if `wait`.
    fn pop_rx(&mut self, wait: bool) -> Result<Option<(u64, usize)>, &'static str> {
        let start = clock::now_ns();
        loop {
            if let Some((id, len)) = self.rx.pop_used()? {
                let addr = self.rx_addr[usize::from(id)];
                if addr == 0 {
                    return Err("device returned an rx descriptor it was not given");
                }
                self.rx_addr[usize::from(id)] = 0;
                if len > RX_BUF {
                    return Err("device wrote more than the rx buffer holds");
                }
                return Ok(Some((addr, len as usize)));
            }
            if !wait {
                return Ok(None);
            }
            self.kick_rx();
            if clock::now_ns().wrapping_sub(start) > self.timeout_ns {
                return Err("rest of a merged rx frame missing");
            }
            pause();
        }
    }

    /// Give a receive buffer back to the device.
    fn recycle(&mut self, addr: u64) -> Result<(), &'static str> {
        self.post_rx(addr)?;
        if self.rx_unkicked >= RX_KICK_BATCH {
            self.kick_rx();
        }
        Ok(())
    }

    /// The next received frame, if one is waiting: its bytes (without the
    /// header) go to `out`, as many as fit.
    pub fn recv(&mut self, out: &mut [u8]) -> Result<Option<Frame>, &'static str> {
        let Some((addr, len)) = self.pop_rx(false)? else {
            self.kick_rx();
            return Ok(None);
        };
        if len < HDR_LEN {
            self.recycle(addr)?;
            return Err("rx buffer shorter than the virtio-net header");
        }
        // SAFETY: the device has returned the buffer; it holds `len` bytes.
        let hdr = unsafe { Hdr::read(addr) };
        let buffers = if self.has(F_MRG_RXBUF) {
            hdr.num_buffers
        } else {
            1
        };
        if buffers == 0 {
            self.recycle(addr)?;
            return Err("rx frame with num_buffers 0");
        }
        let mut f = Frame {
            len: 0,
            copied: 0,
            hdr,
            buffers,
        };
        let mut take = |f: &mut Frame, src: u64, n: usize| {
            let c = n.min(out.len() - f.copied);
            // SAFETY: `src` holds `n` bytes the device has finished writing,
            // and `out` has room for `c` more.
            unsafe {
                core::ptr::copy_nonoverlapping(src as *const u8, out[f.copied..].as_mut_ptr(), c)
            };
            f.copied += c;
            f.len += n;
        };
        take(&mut f, addr + HDR_LEN as u64, len - HDR_LEN);
        self.recycle(addr)?;
        for _ in 1..buffers {
            let (a, n) = self.pop_rx(true)?.ok_or("rx buffer missing")?;
            take(&mut f, a, n);
            self.recycle(a)?;
        }
        Ok(Some(f))
    }

    /// Take every completed transmit chain off tx0; returns how many.
    pub fn reap_tx(&mut self) -> Result<u32, &'static str> {
        let mut n = 0;
        while let Some((id, _)) = self.tx.pop_used()? {
            let slot = core::mem::replace(&mut self.tx_slot_of[usize::from(id)], NO_SLOT);
            if slot != NO_SLOT {
                self.tx_free[self.tx_nfree] = slot;
                self.tx_nfree += 1;
            }
            self.tx_inflight = self.tx_inflight.saturating_sub(1);
            n += 1;
        }
        Ok(n)
    }

    /// Stop waiting for one transmit chain the device keeps (its
    /// descriptors stay lost until the next start).
    pub fn forget_tx(&mut self) {
        self.tx_inflight = self.tx_inflight.saturating_sub(1);
    }

    /// Wait until the device has returned every transmit chain.
    pub fn wait_tx_idle(&mut self) -> Result<(), &'static str> {
        let start = clock::now_ns();
        while self.tx_inflight > 0 {
            if self.reap_tx()? == 0 {
                if clock::now_ns().wrapping_sub(start) > self.timeout_ns {
                    return Err("tx chain not returned");
                }
                pause();
            }
        }
        Ok(())
    }

    /// Put a hand-built chain on tx0 (without notifying), reaping
    /// completions and waiting up to the timeout while the queue is full;
    /// `edit` as for [`Virtqueue::push_edited`]. Returns the head.
    pub fn push_tx_edited(
        &mut self,
        bufs: &[Buf],
        edit: impl FnOnce(&Virtqueue, u16),
    ) -> Result<u16, &'static str> {
        self.room(bufs.len(), false)?;
        let head = self.tx.push_edited(bufs, edit)?;
        self.tx_inflight += 1;
        Ok(head)
    }

    /// [`Net::push_tx_edited`] without edits.
    pub fn push_tx(&mut self, bufs: &[Buf]) -> Result<u16, &'static str> {
        self.push_tx_edited(bufs, |_, _| {})
    }

    /// Notify tx0.
    pub fn kick_tx(&self) {
        self.dev.notify(&self.tx);
    }

    /// Wait until tx0 has `descs` free descriptors (and a free slot if
    /// `slot`).
    fn room(&mut self, descs: usize, slot: bool) -> Result<(), &'static str> {
        if descs > usize::from(self.tx.size) {
            return Err("chain longer than the queue");
        }
        let start = clock::now_ns();
        loop {
            self.reap_tx()?;
            if usize::from(self.tx.num_free()) >= descs && (!slot || self.tx_nfree > 0) {
                return Ok(());
            }
            if clock::now_ns().wrapping_sub(start) > self.timeout_ns {
                return Err("tx queue stays full");
            }
            pause();
        }
    }

    /// Send one frame with header `hdr`: copied into a slot, as one
    /// descriptor, or as two (header, frame) if `split`. Notifies.
    pub fn send(&mut self, hdr: &Hdr, frame: &[u8], split: bool) -> Result<(), &'static str> {
        if frame.len() > MAX_SEND {
            return Err("frame longer than a tx slot");
        }
        self.room(if split { 2 } else { 1 }, true)?;
        self.tx_nfree -= 1;
        let slot = self.tx_free[self.tx_nfree];
        let base = self.mem.tx + u64::from(slot) * TX_SLOT;
        let data = if split {
            base + TX_SPLIT_OFF
        } else {
            base + HDR_LEN as u64
        };
        // SAFETY: the slot is free, so no chain the device may read uses it.
        unsafe {
            hdr.write(base);
            core::ptr::copy_nonoverlapping(frame.as_ptr(), data as *mut u8, frame.len());
        }
        let r = |addr, len| Buf {
            addr,
            len,
            device_writes: false,
        };
        let len = frame.len() as u32;
        let one = [r(base, HDR_LEN as u32 + len)];
        let two = [r(base, HDR_LEN as u32), r(data, len)];
        let head = self.tx.push(if split { &two } else { &one })?;
        self.tx_slot_of[usize::from(head)] = slot;
        self.tx_inflight += 1;
        self.kick_tx();
        Ok(())
    }
}
