//! virtio-blk (virtio 1.x §5.2) on top of [`Device`] and [`Virtqueue`].
//!
//! A request is a chain of separate descriptors, as Linux builds it: a
//! 16-byte device-readable header `{u32 type, u32 reserved, u64 sector}`, the
//! data buffers (device-writable for reads and get-id, device-readable for
//! writes and discard/write-zeroes segments), then a 1-byte device-writable
//! status. Headers and status bytes live in per-slot areas of one page
//! (slot `k`: header at `32k`, status at `32k + 16`), so several requests can
//! be in flight; the caller picks the slot. The driver polls the used ring.

use core::fmt;

use super::{Buf, Device, Virtqueue};
use crate::rt::clock;
use crate::rt::io::pause;
use crate::rt::phys::PhysAlloc;

/// Feature bits (virtio 1.x §5.2.3).
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Features the driver accepts when offered (MQ is not: one queue is used).
const WANTED: u64 =
    F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES;

/// Request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// Status values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What a status byte holds before the device writes it.
pub const S_UNSET: u8 = 0xff;

/// Bytes per sector (the unit of `sector` and `capacity`).
pub const SECTOR: u64 = 512;
/// Length of the get-id answer.
pub const ID_BYTES: u32 = 20;

/// Device configuration offsets.
const CFG_CAPACITY: u64 = 0;
const CFG_SIZE_MAX: u64 = 8;
const CFG_SEG_MAX: u64 = 12;
const CFG_BLK_SIZE: u64 = 20;
const CFG_NUM_QUEUES: u64 = 34;

/// Largest queue the driver asks for.
pub const MAX_QUEUE: u16 = 256;
/// Most data descriptors in one request the driver builds.
pub const MAX_SEGS: usize = 64;
/// Header + status slot size, and how many fit in the slot page.
const SLOT_BYTES: u64 = 32;
const SLOTS: usize = 128;

/// Why a request did not complete with `S_OK`.
#[derive(Clone, Copy)]
pub enum Error {
    /// Queue or transport problem (timeout, queue full, bad used id …).
    Virtio(&'static str),
    /// The device completed the request with this status.
    Status(u8),
}

impl From<&'static str> for Error {
    fn from(why: &'static str) -> Self {
        Error::Virtio(why)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Virtio(why) => f.write_str(why),
            Error::Status(s) => write!(f, "status {s}"),
        }
    }
}

/// A started virtio-blk device with queue 0 set up.
pub struct Blk {
    pub dev: Device,
    pub q: Virtqueue,
    /// Features the device offers, and those negotiated.
    pub offered: u64,
    pub features: u64,
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// `blk_size` (0 unless F_BLK_SIZE).
    pub blk_size: u32,
    /// `num_queues` (0 unless F_MQ is offered).
    pub num_queues: u16,
    /// Largest data descriptor (size_max rounded down to whole sectors, or
    /// 1 GiB without F_SIZE_MAX).
    pub seg_bytes: u32,
    /// Most data descriptors per request (seg_max, the queue and `MAX_SEGS`).
    pub max_segs: usize,
    slots: u64,
    /// Slot of each in-flight request, by head descriptor.
    owner: [u8; MAX_QUEUE as usize],
    timeout_ns: u64,
}

impl Blk {
    /// Reset and start `dev` (queue 0 of up to `max_queue` entries) and read
    /// its configuration.
    pub fn start(
        dev: &Device,
        pa: &mut PhysAlloc,
        max_queue: u16,
        timeout_ns: u64,
    ) -> Result<Blk, &'static str> {
        let mut qs = [Virtqueue::EMPTY; 1];
        let features = dev.start_with(pa, &mut qs, max_queue.min(MAX_QUEUE), WANTED)?;
        let offered = dev.device_features();
        let q = qs[0];
        if q.size < 4 {
            return Err("queue smaller than 4 entries");
        }
        let has = |f| features & f != 0;
        let size_max = if has(F_SIZE_MAX) {
            dev.config32(CFG_SIZE_MAX)?
        } else {
            0
        };
        let seg_bytes = match size_max {
            0 => 1 << 30,
            s if s < SECTOR as u32 => return Err("size_max below 512"),
            s => s.min(1 << 30) & !(SECTOR as u32 - 1),
        };
        let seg_max = if has(F_SEG_MAX) {
            dev.config32(CFG_SEG_MAX)?
        } else {
            u32::MAX
        };
        if seg_max == 0 {
            return Err("seg_max is 0");
        }
        let max_segs = (seg_max as usize)
            .min(MAX_SEGS)
            .min(usize::from(q.size) - 2);
        let slots = pa
            .alloc(SLOTS as u64 * SLOT_BYTES, 4096)
            .ok_or("no memory for request headers")?;
        Ok(Blk {
            dev: *dev,
            q,
            offered,
            features,
            capacity: dev.config64(CFG_CAPACITY)?,
            blk_size: if has(F_BLK_SIZE) {
                dev.config32(CFG_BLK_SIZE)?
            } else {
                0
            },
            num_queues: if offered & F_MQ != 0 {
                dev.config16(CFG_NUM_QUEUES)?
            } else {
                0
            },
            seg_bytes,
            max_segs,
            slots,
            owner: [0; MAX_QUEUE as usize],
            timeout_ns,
        })
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    pub fn read_only(&self) -> bool {
        self.has(F_RO)
    }

    /// Smallest transfer unit: blk_size when it is a power of two from 512
    /// to 64 KiB, else 512.
    pub fn unit(&self) -> u64 {
        match self.blk_size {
            b @ 512..=65536 if b.is_power_of_two() => b.into(),
            _ => SECTOR,
        }
    }

    /// How many requests with `data_segs` data descriptors fit in the queue
    /// (and the slot page) at once.
    pub fn depth(&self, data_segs: usize) -> usize {
        (usize::from(self.q.size) / (data_segs + 2)).min(SLOTS)
    }

    /// Largest request `transfer` sends in one piece.
    pub fn max_request(&self) -> u64 {
        self.max_segs as u64 * u64::from(self.seg_bytes)
    }

    /// Split `len` bytes at `addr` into data descriptors of at most
    /// `seg_bytes`; returns how many were written to `out` (0 if more than
    /// `max_segs` would be needed).
    pub fn segments(
        &self,
        addr: u64,
        len: u64,
        device_writes: bool,
        out: &mut [Buf; MAX_SEGS],
    ) -> usize {
        let mut n = 0;
        let mut off = 0;
        while off < len {
            if n == self.max_segs {
                return 0;
            }
            let l = (len - off).min(u64::from(self.seg_bytes));
            out[n] = Buf {
                addr: addr + off,
                len: l as u32,
                device_writes,
            };
            n += 1;
            off += l;
        }
        n
    }

    /// Header address of `slot`.
    pub fn header(&self, slot: usize) -> u64 {
        self.slots + SLOT_BYTES * slot as u64
    }

    /// The status byte of `slot`'s last request.
    pub fn status(&self, slot: usize) -> u8 {
        // SAFETY: the slot page is ours; the device may write the byte, hence
        // volatile.
        unsafe { ((self.header(slot) + 16) as *const u8).read_volatile() }
    }

    /// Queue a request in `slot` (< `depth(data.len())`): header, `data`, status. The
    /// caller notifies with [`Blk::kick`].
    pub fn submit(
        &mut self,
        slot: usize,
        kind: u32,
        sector: u64,
        data: &[Buf],
    ) -> Result<(), Error> {
        if slot >= SLOTS || data.len() > MAX_SEGS {
            return Err(Error::Virtio("bad request slot or too many segments"));
        }
        let h = self.header(slot);
        // SAFETY: the slot's header and status belong to the driver while the
        // slot has no request in flight.
        unsafe {
            (h as *mut u32).write_volatile(kind);
            ((h + 4) as *mut u32).write_volatile(0);
            ((h + 8) as *mut u64).write_volatile(sector);
            ((h + 16) as *mut u8).write_volatile(S_UNSET);
        }
        let mut chain = [Buf {
            addr: 0,
            len: 0,
            device_writes: false,
        }; MAX_SEGS + 2];
        chain[0] = Buf {
            addr: h,
            len: 16,
            device_writes: false,
        };
        chain[1..=data.len()].copy_from_slice(data);
        chain[data.len() + 1] = Buf {
            addr: h + 16,
            len: 1,
            device_writes: true,
        };
        let head = self.q.push(&chain[..data.len() + 2])?;
        self.owner[usize::from(head)] = slot as u8;
        Ok(())
    }

    /// Notify the device of new requests.
    pub fn kick(&self) {
        self.dev.notify(&self.q);
    }

    /// The next completed request `(slot, status)`, if any.
    pub fn complete(&mut self) -> Result<Option<(usize, u8)>, Error> {
        Ok(self.q.pop_used()?.map(|(id, _)| {
            let slot = usize::from(self.owner[usize::from(id)]);
            (slot, self.status(slot))
        }))
    }

    /// Wait (up to the timeout) for the next completed request.
    pub fn wait(&mut self) -> Result<(usize, u8), Error> {
        let start = clock::now_ns();
        loop {
            if let Some(done) = self.complete()? {
                return Ok(done);
            }
            if clock::now_ns().wrapping_sub(start) > self.timeout_ns {
                return Err(Error::Virtio("request timed out"));
            }
            pause();
        }
    }

    /// One request in slot 0, nothing else in flight; returns its status.
    pub fn request(&mut self, kind: u32, sector: u64, data: &[Buf]) -> Result<u8, Error> {
        self.submit(0, kind, sector, data)?;
        self.kick();
        let (slot, status) = self.wait()?;
        if slot != 0 {
            return Err(Error::Virtio("device completed an unknown request"));
        }
        Ok(status)
    }

    /// A hand-built chain (headers and status wherever the caller put them);
    /// waits for it and returns the used length.
    pub fn raw(&mut self, chain: &[Buf]) -> Result<u32, Error> {
        self.q.push(chain)?;
        self.kick();
        Ok(self.q.wait_used(self.timeout_ns)?.1)
    }

    /// Read (`write` false) or write `len` bytes at `sector` from/to `addr`,
    /// in as many requests as the segment limits need; every one must end
    /// with `S_OK`.
    pub fn transfer(&mut self, write: bool, sector: u64, addr: u64, len: u64) -> Result<(), Error> {
        let kind = if write { T_OUT } else { T_IN };
        let step = self.max_request().min(len.max(1));
        let mut segs = [Buf {
            addr: 0,
            len: 0,
            device_writes: false,
        }; MAX_SEGS];
        let mut off = 0;
        while off < len {
            let l = step.min(len - off);
            let n = self.segments(addr + off, l, !write, &mut segs);
            if n == 0 {
                return Err(Error::Virtio("request does not fit the segment limits"));
            }
            match self.request(kind, sector + off / SECTOR, &segs[..n])? {
                S_OK => {}
                s => return Err(Error::Status(s)),
            }
            off += l;
        }
        Ok(())
    }

    /// A discard or write-zeroes request for one range (flags 0).
    pub fn range_op(&mut self, kind: u32, sector: u64, sectors: u32) -> Result<u8, Error> {
        // The segment goes in the next slot's header area (slot 1, unused by
        // `request`).
        let seg = self.header(1);
        // SAFETY: slot 1 belongs to the driver; nothing is in flight.
        unsafe {
            (seg as *mut u64).write_volatile(sector);
            ((seg + 8) as *mut u32).write_volatile(sectors);
            ((seg + 12) as *mut u32).write_volatile(0);
        }
        self.request(
            kind,
            0,
            &[Buf {
                addr: seg,
                len: 16,
                device_writes: false,
            }],
        )
    }
}
