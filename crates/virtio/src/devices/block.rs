//! virtio-blk (device type 2): a disk image ([`block::Disk`], raw or qcow2) served to the guest.
//!
//! Each queue has its own worker thread and its own I/O [`Engine`] (io_uring where it can), so
//! with `queues=N` (VIRTIO_BLK_F_MQ) N guest CPUs submit in parallel. Requests: read, write,
//! flush, get-id, discard and write-zeroes; a read-only disk refuses the writing ones with
//! VIRTIO_BLK_S_IOERR and never touches the file.
//!
//! Hostile requests are answered, not fatal: a request whose header or buffers make no sense
//! (past the end of the disk, a zero-length buffer, writable buffers overlapping anything, more
//! than [`MAX_DATA`] bytes, a length that is not whole sectors, buffers in the wrong direction)
//! completes with VIRTIO_BLK_S_IOERR, an unknown type with VIRTIO_BLK_S_UNSUPP, and the device
//! keeps serving. Only a broken *chain* (see [the devices module](super)) or one without a
//! status byte stops it, and so does a driver that makes a chain available again while the
//! device still has it (its head index is in flight): answering the second copy would put
//! the head in the used ring twice and write a status byte the first request still owns, so
//! the device stops and asks for a reset (DEVICE_NEEDS_RESET) instead, as the virtio spec lets
//! a device do with a driver that broke the rules. Requests in flight are therefore tracked by
//! head index, at most one per descriptor of the queue.
//!
//! An optional rate limiter (ops/s and bytes/s token buckets, shared by the queues) delays
//! reads, writes, discards and write-zeroes: a request that does not fit is put back on the
//! available ring and the queue sleeps on a timerfd until the buckets refill. Each request
//! counts as one operation and its length in bytes (a discard or write-zeroes counts the
//! length of its range, like a write of that size); flushes and get-id are not limited.
//!
//! Discard and write-zeroes run synchronously on the worker (they are `fallocate` calls, or
//! writes of zeroes where the file system cannot punch holes), in pieces of at most
//! [`ZERO_CHUNK`] bytes and at most [`ZERO_CHUNKS_PER_WAKE`] pieces per wake-up of the worker;
//! a range left over is taken up again on the next wake-up, and the request completes when
//! its whole range is done, so a guest cannot make one wake-up run gigabytes of I/O.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use block::{Completion, Disk, Engine, EngineKind, IoOp, IoSlice};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::common::{
    drain, shared_limiter, Buf, ConfigIrq, Ctx, Handler, Malformed, Request, SharedLimiter,
    Throttle, Worker,
};
use crate::{ActivateError, GuestMemoryMmap, Interrupt, QueueEvent, VirtioDevice, VmMemory};

/// Size of each request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Most data one request may carry; larger ones fail with IOERR. Linux sends at most 1.25 MiB
/// (BLK_DEF_MAX_SECTORS) unless told otherwise.
pub const MAX_DATA: u64 = 8 << 20;
/// Most bytes one chain may describe before it counts as a broken chain.
const MAX_CHAIN: u64 = 64 << 20;
/// Most sectors one discard or write-zeroes segment may cover (2 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Discard and write-zeroes run in pieces of at most this many bytes, aligned to it on the disk.
pub const ZERO_CHUNK: u64 = 16 << 20;
/// Most discard or write-zeroes pieces one wake-up of a queue's worker runs.
pub const ZERO_CHUNKS_PER_WAKE: usize = 4;
/// Bytes of device configuration space (`struct virtio_blk_config` up to `unused1`).
const CONFIG_LEN: usize = 60;
/// Length of a get-id answer.
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// How a virtio-blk device is set up.
#[derive(Clone, Debug)]
pub struct BlockOptions {
    /// What get-id answers (at most 20 bytes are used).
    pub serial: String,
    /// Number of request queues (1 = no multiqueue).
    pub queues: u16,
    /// io_uring or synchronous I/O (io_uring falls back to synchronous where unavailable).
    pub engine: EngineKind,
    /// Operations per second (0 = unlimited).
    pub iops: u64,
    /// Bytes per second (0 = unlimited).
    pub bandwidth: u64,
}

/// I/O counters of one device.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Read requests completed.
    pub read_ops: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Write requests completed.
    pub write_ops: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Flushes completed.
    pub flush_ops: AtomicU64,
    /// Discard and write-zeroes requests completed.
    pub discard_ops: AtomicU64,
    /// Requests answered with an error status.
    pub errors: AtomicU64,
    /// Times a queue waited for the rate limiter.
    pub throttled: AtomicU64,
}

/// The image behind a disk and the workers serving its queues: replaced together when the
/// VMM puts another image behind the running disk ([`BlockHandle::replace`]). The image has a
/// lock of its own, held only to read or swap the pointer, so that a vCPU reading the
/// configuration never waits for the workers to finish their requests.
struct Backend {
    disk: Arc<Mutex<Arc<Disk>>>,
    workers: Mutex<Workers>,
}

struct Workers {
    list: Vec<Worker<BlkWorker>>,
    /// Whether the device is paused (a worker started again stays paused then).
    paused: bool,
}

type SharedBackend = Arc<Backend>;

impl Backend {
    fn disk(&self) -> Arc<Disk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, Workers> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The logical block size the guest addresses a disk in.
fn logical_block(d: &Disk) -> u32 {
    d.device_block_sizes().map_or(SECTOR as u32, |b| b.logical)
}

/// The virtio-blk device.
pub struct Block {
    backend: SharedBackend,
    opts: BlockOptions,
    queue_sizes: Vec<u16>,
    config: [u8; CONFIG_LEN],
    acked: u64,
    limiter: SharedLimiter,
    /// Raised when the disk grows.
    interrupt: Arc<ConfigIrq>,
    counters: Arc<BlockCounters>,
    broken: Arc<AtomicBool>,
}

/// What the VMM changes on a disk while the guest runs: its rate limits, its size and the
/// image behind it.
#[derive(Clone)]
pub struct BlockHandle {
    backend: SharedBackend,
    engine: EngineKind,
    broken: Arc<AtomicBool>,
    limiter: SharedLimiter,
    interrupt: Arc<ConfigIrq>,
}

impl BlockHandle {
    /// New limits, in operations/s and bytes/s (0 = unlimited), from the next request on.
    pub fn set_limits(&self, iops: u64, bandwidth: u64) {
        self.limiter.set(iops, bandwidth);
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.backend.disk().size()
    }

    /// Grows the disk to `size` bytes (see [`Disk::grow`]) and tells the driver its capacity
    /// changed (a configuration change interrupt, when the driver runs; one that is not
    /// running reads the capacity when it starts).
    pub fn grow(&self, size: u64) -> Result<(), block::BlockError> {
        let disk = self.backend.disk();
        let before = disk.size();
        disk.grow(size)?;
        if disk.size() != before {
            self.capacity_changed(&disk);
        }
        Ok(())
    }

    fn capacity_changed(&self, disk: &Disk) {
        if let Err(e) = self.interrupt.raise() {
            tracing::warn!(
                "virtio-blk {}: its capacity changed to {} bytes, but {e}",
                disk.path().display(),
                disk.size()
            );
        }
    }

    /// Puts `disk` behind the running disk in place of its image, as a drive whose medium
    /// changed: every queue's worker stops once its in-flight requests are answered (within
    /// `deadline`), takes up the new image and goes on; the guest is told the capacity
    /// (a configuration change interrupt). The new image must be writable or read-only as the
    /// old one was, and addressed in the same logical blocks (the guest negotiated both).
    /// Returns the old image. On an error nothing changed, except when a worker had failed
    /// or cannot be started again: then the device is broken (its driver must reset it, and
    /// goes on with the old image) and the error says so.
    pub fn replace(
        &self,
        disk: Arc<Disk>,
        deadline: std::time::Instant,
    ) -> Result<Arc<Disk>, String> {
        let mut w = self.backend.workers();
        let old = self.backend.disk();
        let rw = |d: &Disk| {
            if d.read_only() {
                "read-only"
            } else {
                "writable"
            }
        };
        if disk.read_only() != old.read_only() {
            return Err(format!(
                "{} is {}, and the guest knows this disk as {}",
                disk.path().display(),
                rw(&disk),
                rw(&old)
            ));
        }
        if logical_block(&disk) != logical_block(&old) {
            return Err(format!(
                "{} has {}-byte blocks, and the guest addresses this disk in {}-byte blocks",
                disk.path().display(),
                logical_block(&disk),
                logical_block(&old)
            ));
        }
        if !super::common::pause_all(&w.list, deadline) {
            if !w.paused {
                w.list.iter().for_each(|x| x.resume());
            }
            return Err("its in-flight requests did not finish in time; nothing changed".into());
        }
        let broken = |why: String| {
            self.broken.store(true, Ordering::SeqCst);
            format!("{why}; the device needs a reset by the guest's driver")
        };
        let mut handlers = Vec::new();
        for x in w.list.drain(..) {
            match x.stop() {
                Some(h) => handlers.push(h),
                None => return Err(broken("a queue's worker had failed".into())),
            }
        }
        for mut h in handlers {
            h.engine = Engine::new(disk.clone(), u32::from(QUEUE_SIZE), self.engine);
            let name = format!("virtio-blk-q{}", h.index);
            let x = Worker::spawn(lifecycle::threads::Device::Block, &name, h)
                .map_err(|e| broken(format!("cannot start a queue's worker again: {e}")))?;
            if w.paused {
                x.pause(deadline);
            }
            w.list.push(x);
        }
        *self.backend.disk.lock().unwrap_or_else(|p| p.into_inner()) = disk.clone();
        drop(w);
        self.capacity_changed(&disk);
        Ok(old)
    }
}

impl Block {
    /// A device serving `disk`.
    pub fn new(disk: Arc<Disk>, mut opts: BlockOptions) -> Self {
        opts.queues = opts.queues.max(1);
        let mut config = [0u8; CONFIG_LEN];
        let put = |c: &mut [u8; CONFIG_LEN], off: usize, v: &[u8]| {
            c[off..off + v.len()].copy_from_slice(v)
        };
        put(&mut config, 0, &(disk.size() / SECTOR).to_le_bytes());
        put(&mut config, 12, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        put(&mut config, 20, &(SECTOR as u32).to_le_bytes()); // blk_size
        if let Some(bs) = disk.device_block_sizes() {
            // A host block device: the guest addresses it in its logical blocks and learns
            // its physical ones (topology: physical_block_exp, min_io_size in logical blocks).
            let per = (bs.physical / bs.logical).max(1);
            put(&mut config, 20, &bs.logical.to_le_bytes());
            config[24] = per.trailing_zeros() as u8;
            put(
                &mut config,
                26,
                &(per.min(u32::from(u16::MAX)) as u16).to_le_bytes(),
            );
        }
        put(&mut config, 34, &opts.queues.to_le_bytes());
        put(&mut config, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(&mut config, 40, &1u32.to_le_bytes()); // max_discard_seg
                                                   // discard_sector_alignment: 4 KiB, or the device's physical block if larger.
        let align = disk
            .device_block_sizes()
            .map_or(8, |bs| (bs.physical / SECTOR as u32).max(8));
        put(&mut config, 44, &align.to_le_bytes());
        put(&mut config, 48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(&mut config, 52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        config[56] = 1; // write_zeroes_may_unmap
        let limiter = shared_limiter(opts.iops, opts.bandwidth);
        Block {
            queue_sizes: vec![QUEUE_SIZE; usize::from(opts.queues)],
            backend: Arc::new(Backend {
                disk: Arc::new(Mutex::new(disk)),
                workers: Mutex::new(Workers {
                    list: Vec::new(),
                    paused: false,
                }),
            }),
            opts,
            config,
            acked: 0,
            limiter,
            interrupt: Arc::default(),
            counters: Arc::default(),
            broken: Arc::default(),
        }
    }

    /// The image behind the disk now.
    fn disk(&self) -> Arc<Disk> {
        self.backend.disk()
    }

    /// What the VMM changes while the guest runs.
    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            backend: self.backend.clone(),
            engine: self.opts.engine,
            broken: self.broken.clone(),
            limiter: self.limiter.clone(),
            interrupt: self.interrupt.clone(),
        }
    }

    /// The device's I/O counters.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn min_queues(&self) -> usize {
        1
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        let disk = self.disk();
        if disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if self.opts.queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        if disk.device_block_sizes().is_some() {
            f |= 1 << VIRTIO_BLK_F_TOPOLOGY;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if off < CONFIG_LEN {
            let mut config = self.config;
            // The capacity, in sectors, as the disk is now (it grows while in use).
            config[..8].copy_from_slice(&(self.disk().size() / SECTOR).to_le_bytes());
            let n = data.len().min(CONFIG_LEN - off);
            data[..n].copy_from_slice(&config[off..off + n]);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // `writeback` (VIRTIO_BLK_F_CONFIG_WCE) is not offered: nothing is writable.
    }

    fn activate(
        &mut self,
        mem: VmMemory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<QueueEvent>,
    ) -> Result<(), ActivateError> {
        self.reset();
        if queues.is_empty() || queues.len() > usize::from(self.opts.queues) {
            return Err(ActivateError::BadQueue(format!(
                "1 to {} queues expected, got {}",
                self.opts.queues,
                queues.len()
            )));
        }
        self.interrupt.set(Some(interrupt.clone()));
        let mut serial = [0u8; ID_LEN];
        let s = self.opts.serial.as_bytes();
        serial[..s.len().min(ID_LEN)].copy_from_slice(&s[..s.len().min(ID_LEN)]);
        let disk = self.backend.disk();
        let mut w = self.backend.workers();
        for (i, q) in queues.into_iter().enumerate() {
            let index = i as u16;
            let engine = Engine::new(disk.clone(), u32::from(QUEUE_SIZE), self.opts.engine);
            tracing::debug!(
                "virtio-blk {}: queue {index} uses {} I/O",
                disk.path().display(),
                engine.kind()
            );
            let handler = BlkWorker {
                ctx: Ctx::new(
                    mem.clone(),
                    interrupt.clone(),
                    self.broken.clone(),
                    "blk",
                    MAX_CHAIN,
                ),
                queue: q.queue,
                index,
                event: q.event,
                engine,
                throttle: Throttle::new(self.limiter.clone()).map_err(ActivateError::Worker)?,
                pending: (0..QUEUE_SIZE).map(|_| None).collect(),
                zeroing: VecDeque::new(),
                serial,
                counters: self.counters.clone(),
                done: Vec::new(),
            };
            let name = format!("virtio-blk-q{index}");
            w.list.push(
                Worker::spawn(lifecycle::threads::Device::Block, &name, handler)
                    .map_err(ActivateError::Worker)?,
            );
        }
        Ok(())
    }

    fn reset(&mut self) {
        // Each worker's engine waits for its in-flight I/O when it is dropped.
        for w in self.backend.workers().list.drain(..) {
            w.stop();
        }
        self.interrupt.set(None);
        self.broken.store(false, Ordering::SeqCst);
    }

    fn pause(&mut self, deadline: std::time::Instant) -> bool {
        let mut w = self.backend.workers();
        w.paused = true;
        super::common::pause_all(&w.list, deadline)
    }

    fn resume(&mut self) {
        let mut w = self.backend.workers();
        w.paused = false;
        w.list.iter().for_each(|x| x.resume());
    }

    fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
}

/// A request whose I/O is running: where its status goes and what it returns.
struct Pending {
    status: GuestAddress,
    used_len: u32,
    work: Work,
    bytes: u64,
}

/// What a pending request waits for.
enum Work {
    /// Its I/O in the engine.
    Io(IoOp),
    /// The worker to discard or zero `[next, end)` of the disk.
    Zero { discard: bool, next: u64, end: u64 },
}

/// What a request turned out to be.
enum Action {
    /// Answer at once with this status; `used_len` bytes were written before the status.
    Done { status: u8, written: u32 },
    /// Run I/O, then answer.
    Io {
        op: IoOp,
        iov: Vec<IoSlice>,
        offset: u64,
        bytes: u64,
    },
    /// Discard (or zero) `len` bytes at `offset`, then answer.
    Zero {
        discard: bool,
        offset: u64,
        len: u64,
    },
}

fn err(status: u32) -> Action {
    Action::Done {
        status: status as u8,
        written: 0,
    }
}

struct BlkWorker {
    ctx: Ctx,
    queue: Queue,
    index: u16,
    event: EventFd,
    engine: Engine,
    throttle: Throttle,
    /// Requests being served, by head index (one entry per descriptor of the queue).
    pending: Vec<Option<Pending>>,
    /// Heads of the pending discards and write-zeroes, oldest first.
    zeroing: VecDeque<u16>,
    serial: [u8; ID_LEN],
    counters: Arc<BlockCounters>,
    done: Vec<Completion>,
}

const TOKEN_QUEUE: usize = 0;
const TOKEN_TIMER: usize = 1;

impl Handler for BlkWorker {
    const POLLS: bool = true;

    fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.event.as_raw_fd(), self.throttle.fd()];
        fds.extend(self.engine.event_fd());
        fds
    }

    fn quiesce(&mut self) {
        // Finish the I/O in flight and answer it, so nothing writes guest memory while paused.
        let mut done = std::mem::take(&mut self.done);
        self.engine.drain(&mut done);
        self.done = done;
        let mut used = 0u32;
        let res = self
            .complete(&mut used)
            .and_then(|()| self.run_zeroing(&mut used, usize::MAX));
        if used > 0 {
            self.ctx.signal(&self.queue, self.index);
        }
        if let Err(e) = res {
            self.ctx.fail(e);
        }
    }

    fn handle(&mut self, token: usize) -> bool {
        let mut used = 0u32;
        let res = match token {
            TOKEN_QUEUE => {
                drain(&self.event);
                if self.throttle.waiting {
                    Ok(())
                } else {
                    self.process(&mut used)
                }
            }
            TOKEN_TIMER => {
                self.throttle.fired();
                self.process(&mut used)
            }
            _ => Ok(()),
        };
        let res = res
            .and_then(|()| self.complete(&mut used))
            .and_then(|()| self.run_zeroing(&mut used, ZERO_CHUNKS_PER_WAKE));
        if used > 0 {
            self.ctx.signal(&self.queue, self.index);
        }
        match res {
            Ok(()) => true,
            Err(e) => self.ctx.fail(e),
        }
    }
}

impl Drop for BlkWorker {
    fn drop(&mut self) {
        // Let the kernel finish with guest buffers before the requests are forgotten.
        let mut sink = Vec::new();
        self.engine.drain(&mut sink);
    }
}

impl BlkWorker {
    /// Takes requests off the available ring until it is empty, the rate limiter says wait, or
    /// a queue's worth of work was done (then the queue event is re-raised so a reset is not
    /// starved).
    fn process(&mut self, used: &mut u32) -> Result<(), Malformed> {
        // While the worker drains the ring the driver need not notify it
        // (VRING_USED_F_NO_NOTIFY): each notification is a VM exit. Notifications are enabled
        // again when the ring looks empty, and the ring re-checked to close the race.
        let mut taken = 0;
        loop {
            self.queue
                .disable_notification(&self.ctx.mem)
                .map_err(|e| Malformed::Queue(self.index, e))?;
            if !self.drain_ring(used, &mut taken)? {
                // Throttled or out of budget: leave notifications off; the timer or the
                // re-raised queue event brings the worker back.
                break;
            }
            let more = self
                .queue
                .enable_notification(&self.ctx.mem)
                .map_err(|e| Malformed::Queue(self.index, e))?;
            // Each re-check costs budget like a request: a ring that always says "more" but
            // holds nothing (a used ring laid over the available ring rewrites its index each
            // time notifications are switched) must not keep the worker from its events.
            if !more || self.spend(&mut taken) {
                break;
            }
        }
        self.engine.commit();
        Ok(())
    }

    /// Counts one unit of work; once a queue's worth was done, hands what was taken to the
    /// kernel, re-raises the queue event (the worker comes back after a chance to see a reset
    /// or a pause) and returns true.
    fn spend(&mut self, taken: &mut u16) -> bool {
        *taken += 1;
        if *taken < QUEUE_SIZE {
            return false;
        }
        self.engine.commit();
        let _ = self.event.write(1);
        true
    }

    /// Takes requests until the ring is empty (true), or the rate limiter or the per-wakeup
    /// budget stops it (false).
    fn drain_ring(&mut self, used: &mut u32, taken: &mut u16) -> Result<bool, Malformed> {
        while let Some(req) = self.ctx.pop(&mut self.queue, self.index)? {
            match self.pending.get(usize::from(req.head)) {
                Some(None) => {}
                _ => return Err(Malformed::InUse(self.index, req.head)),
            }
            let Some(last) = req.bufs.last().copied().filter(|b| b.writable && b.len > 0) else {
                // No status byte to answer in: return the chain with nothing written.
                ratelimit::warn_limited!("virtio-blk: request {} has no status byte", req.head);
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.ctx
                    .add_used(&mut self.queue, self.index, req.head, 0)?;
                *used += 1;
                continue;
            };
            let status = GuestAddress(last.addr.0 + u64::from(last.len) - 1);
            match self.parse(&req) {
                Action::Done { status: s, written } => {
                    if s != VIRTIO_BLK_S_OK as u8 {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    self.finish(req.head, status, s, written + 1)?;
                    *used += 1;
                }
                Action::Io {
                    op,
                    iov,
                    offset,
                    bytes,
                } => {
                    if matches!(op, IoOp::Read | IoOp::Write) && !self.admit(bytes) {
                        self.queue.go_to_previous_position();
                        return Ok(false);
                    }
                    let used_len = if op == IoOp::Read {
                        bytes as u32 + 1
                    } else {
                        1
                    };
                    self.pending[usize::from(req.head)] = Some(Pending {
                        status,
                        used_len,
                        work: Work::Io(op),
                        bytes,
                    });
                    // SAFETY: `iov` points into guest memory (checked by `parse`), which
                    // `self.ctx.mem` keeps mapped as long as the worker lives (a later view
                    // the worker takes still holds every region: a `VmMemory` never drops
                    // one); the worker's `Drop` drains the engine, which returns only once no
                    // request is in flight, before `self.ctx.mem` is dropped.
                    unsafe { self.engine.submit(op, iov, offset, u64::from(req.head)) };
                }
                Action::Zero {
                    discard,
                    offset,
                    len,
                } => {
                    if !self.admit(len) {
                        self.queue.go_to_previous_position();
                        return Ok(false);
                    }
                    self.pending[usize::from(req.head)] = Some(Pending {
                        status,
                        used_len: 1,
                        work: Work::Zero {
                            discard,
                            next: offset,
                            end: offset + len,
                        },
                        bytes: len,
                    });
                    self.zeroing.push_back(req.head);
                }
            }
            if self.spend(taken) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether the rate limiter lets a request of `bytes` through now.
    fn admit(&mut self, bytes: u64) -> bool {
        self.throttle.admit(bytes, &self.counters.throttled)
    }

    /// Answers the requests whose I/O finished.
    fn complete(&mut self, used: &mut u32) -> Result<(), Malformed> {
        let mut done = std::mem::take(&mut self.done);
        self.engine.reap(&mut done);
        for c in done.drain(..) {
            let head = c.user_data as u16;
            let Some(p) = self
                .pending
                .get_mut(usize::from(head))
                .and_then(|p| p.take_if(|p| matches!(p.work, Work::Io(_))))
            else {
                continue;
            };
            let Work::Io(op) = p.work else {
                continue;
            };
            let (status, len) = match c.result {
                Ok(()) => {
                    let (ops, bytes) = match op {
                        IoOp::Read => (&self.counters.read_ops, &self.counters.read_bytes),
                        IoOp::Write => (&self.counters.write_ops, &self.counters.write_bytes),
                        IoOp::Flush => (&self.counters.flush_ops, &self.counters.flush_ops),
                    };
                    ops.fetch_add(1, Ordering::Relaxed);
                    if op != IoOp::Flush {
                        bytes.fetch_add(p.bytes, Ordering::Relaxed);
                    }
                    (VIRTIO_BLK_S_OK as u8, p.used_len)
                }
                Err(e) => {
                    ratelimit::warn_limited!("virtio-blk: {e}");
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    (VIRTIO_BLK_S_IOERR as u8, 1)
                }
            };
            self.finish(head, p.status, status, len)?;
            *used += 1;
        }
        self.done = done;
        Ok(())
    }

    /// Runs at most `chunks` pieces of the pending discards and write-zeroes, oldest first,
    /// answering those that are done; with work left over, re-raises the queue event so the
    /// next wake-up goes on.
    fn run_zeroing(&mut self, used: &mut u32, mut chunks: usize) -> Result<(), Malformed> {
        while let Some(&head) = self.zeroing.front() {
            let Some(Pending {
                work: Work::Zero { discard, next, end },
                ..
            }) = self
                .pending
                .get_mut(usize::from(head))
                .and_then(Option::as_mut)
            else {
                self.zeroing.pop_front();
                continue;
            };
            let mut res = Ok(());
            while *next < *end && chunks > 0 && res.is_ok() {
                let stop = (*next / ZERO_CHUNK + 1)
                    .saturating_mul(ZERO_CHUNK)
                    .min(*end);
                res = self.engine.zero_range(*discard, *next, stop - *next);
                *next = stop;
                chunks -= 1;
            }
            if res.is_ok() && *next < *end {
                // Out of pieces for this wake-up.
                let _ = self.event.write(1);
                return Ok(());
            }
            self.zeroing.pop_front();
            let Some(p) = self.pending[usize::from(head)].take() else {
                continue;
            };
            let status = match res {
                Ok(()) => {
                    self.counters.discard_ops.fetch_add(1, Ordering::Relaxed);
                    VIRTIO_BLK_S_OK as u8
                }
                Err(e) => {
                    ratelimit::warn_limited!("virtio-blk: {e}");
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    VIRTIO_BLK_S_IOERR as u8
                }
            };
            self.finish(head, p.status, status, p.used_len)?;
            *used += 1;
        }
        Ok(())
    }

    fn finish(
        &mut self,
        head: u16,
        status: GuestAddress,
        s: u8,
        len: u32,
    ) -> Result<(), Malformed> {
        self.ctx
            .mem
            .write_obj(s, status)
            .map_err(Malformed::Memory)?;
        self.ctx.add_used(&mut self.queue, self.index, head, len)
    }

    /// Makes sense of a request (whose last byte is its status), answering what is wrong.
    fn parse(&mut self, req: &Request) -> Action {
        let Some(segs) = Segments::split(&self.ctx.mem, &req.bufs) else {
            return err(VIRTIO_BLK_S_IOERR);
        };
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = segs.header;
        let kind = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes(s);
        let disk = self.engine.disk().clone();
        let data_len = segs.data_len();
        let writing = matches!(
            kind,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
        );
        if writing && disk.read_only() {
            return err(VIRTIO_BLK_S_IOERR);
        }
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let reading = kind == VIRTIO_BLK_T_IN;
                if data_len == 0
                    || data_len % SECTOR != 0
                    || data_len > MAX_DATA
                    || !segs.data.iter().all(|b| b.writable == reading)
                {
                    return err(VIRTIO_BLK_S_IOERR);
                }
                let Some(offset) = sector
                    .checked_mul(SECTOR)
                    .filter(|o| o.checked_add(data_len).is_some_and(|e| e <= disk.size()))
                else {
                    return err(VIRTIO_BLK_S_IOERR);
                };
                let Some(iov) = segs.iovecs(&self.ctx.mem) else {
                    return err(VIRTIO_BLK_S_IOERR);
                };
                Action::Io {
                    op: if reading { IoOp::Read } else { IoOp::Write },
                    iov,
                    offset,
                    bytes: data_len,
                }
            }
            VIRTIO_BLK_T_FLUSH => Action::Io {
                op: IoOp::Flush,
                iov: Vec::new(),
                offset: 0,
                bytes: 0,
            },
            VIRTIO_BLK_T_GET_ID => {
                if !segs.data.iter().all(|b| b.writable) {
                    return err(VIRTIO_BLK_S_IOERR);
                }
                let n = (data_len as usize).min(ID_LEN);
                let mut left = &self.serial[..n];
                for b in &segs.data {
                    let k = left.len().min(b.len as usize);
                    if self.ctx.mem.write_slice(&left[..k], b.addr).is_err() {
                        return err(VIRTIO_BLK_S_IOERR);
                    }
                    left = &left[k..];
                }
                Action::Done {
                    status: VIRTIO_BLK_S_OK as u8,
                    written: n as u32,
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => self.discard(kind, &segs, &disk),
            _ => err(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// Discard or write-zeroes of one `virtio_blk_discard_write_zeroes` segment.
    fn discard(&mut self, kind: u32, segs: &Segments, disk: &Disk) -> Action {
        if segs.data_len() != 16 || !segs.data.iter().all(|b| !b.writable) {
            return err(VIRTIO_BLK_S_IOERR);
        }
        let mut raw = [0u8; 16];
        let mut off = 0;
        for b in &segs.data {
            let n = b.len as usize;
            if self
                .ctx
                .mem
                .read_slice(&mut raw[off..off + n], b.addr)
                .is_err()
            {
                return err(VIRTIO_BLK_S_IOERR);
            }
            off += n;
        }
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let count = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
        let allowed = if kind == VIRTIO_BLK_T_WRITE_ZEROES {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return err(VIRTIO_BLK_S_UNSUPP);
        }
        let len = u64::from(count) * SECTOR;
        let Some(offset) = sector
            .checked_mul(SECTOR)
            .filter(|o| o.checked_add(len).is_some_and(|e| e <= disk.size()))
        else {
            return err(VIRTIO_BLK_S_IOERR);
        };
        if count > MAX_DISCARD_SECTORS {
            return err(VIRTIO_BLK_S_IOERR);
        }
        Action::Zero {
            discard: kind == VIRTIO_BLK_T_DISCARD,
            offset,
            len,
        }
    }
}

/// A request's buffers split into header, data and status.
struct Segments {
    header: [u8; 16],
    data: Vec<Buf>,
}

impl Segments {
    /// Splits `bufs` (the last byte of the last buffer is the status): the first 16
    /// device-readable bytes are the header, the rest is data. `None` for a request that is
    /// malformed: a short header, a zero-length buffer, or a device-writable byte overlapping
    /// any other byte of the request.
    fn split(mem: &GuestMemoryMmap, bufs: &[Buf]) -> Option<Self> {
        if bufs.iter().any(|b| b.len == 0) {
            return None;
        }
        let mut header = [0u8; 16];
        let mut need = 16usize;
        let mut data = Vec::new();
        let mut ranges = Vec::with_capacity(bufs.len() + 2);
        let last = bufs.len() - 1;
        for (i, b) in bufs.iter().enumerate() {
            let mut addr = b.addr.0;
            let mut len = u64::from(b.len);
            if i == last {
                len -= 1;
                ranges.push((addr + len, 1, true));
            }
            if need > 0 && len > 0 {
                if b.writable {
                    return None;
                }
                let n = need.min(len as usize);
                mem.read_slice(&mut header[16 - need..16 - need + n], GuestAddress(addr))
                    .ok()?;
                ranges.push((addr, n as u64, false));
                need -= n;
                addr += n as u64;
                len -= n as u64;
            }
            if len > 0 {
                ranges.push((addr, len, b.writable));
                data.push(Buf {
                    addr: GuestAddress(addr),
                    len: len as u32,
                    writable: b.writable,
                });
            }
        }
        if need > 0 || overlaps(&mut ranges) {
            return None;
        }
        Some(Segments { header, data })
    }

    fn data_len(&self) -> u64 {
        self.data.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Host addresses of the data buffers; `None` if one crosses a memory region boundary.
    fn iovecs(&self, mem: &GuestMemoryMmap) -> Option<Vec<IoSlice>> {
        self.data
            .iter()
            .map(|b| {
                let s = mem.get_slice(b.addr, b.len as usize).ok()?;
                Some(IoSlice::new(s.ptr_guard_mut().as_ptr(), b.len as usize))
            })
            .collect()
    }
}

/// Whether any device-writable range `(addr, len, writable)` overlaps another range. Readable
/// ranges may overlap each other (Linux writes one zero page to many sectors).
fn overlaps(ranges: &mut [(u64, u64, bool)]) -> bool {
    ranges.sort_unstable_by_key(|r| r.0);
    let (mut end_any, mut end_writable) = (0u64, 0u64);
    for &(start, len, writable) in ranges.iter() {
        if start < end_writable || (writable && start < end_any) {
            return true;
        }
        let end = start.saturating_add(len);
        end_any = end_any.max(end);
        if writable {
            end_writable = end_writable.max(end);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use block::DiskOptions;
    use vm_memory::Bytes;

    use super::*;
    use crate::testing::*;

    const HDR: u64 = BUFS;
    const STATUS: u64 = BUFS + 0x100;
    const DATA: u64 = BUFS + 0x1000;

    struct Rig {
        d: Driver,
        q: VirtQueue,
        path: PathBuf,
        counters: Arc<BlockCounters>,
        handle: BlockHandle,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            std::fs::remove_file(&self.path).ok();
        }
    }

    fn image(name: &str, size: usize) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tern-vblk-{}-{name}", std::process::id()));
        let content: Vec<u8> = (0..size).map(|i| (i / 512) as u8).collect();
        std::fs::write(&p, content).unwrap();
        p
    }

    fn rig(name: &str, read_only: bool, engine: EngineKind, direct: bool, iops: u64) -> Rig {
        rig_on(image(name, 64 << 10), read_only, engine, direct, (iops, 0))
    }

    /// A rig on the image at `path`, with an (ops/s, bytes/s) limit.
    fn rig_on(
        path: PathBuf,
        read_only: bool,
        engine: EngineKind,
        direct: bool,
        (iops, bandwidth): (u64, u64),
    ) -> Rig {
        let opts = DiskOptions {
            path: path.clone(),
            format: None,
            read_only,
            direct,
            ..DiskOptions::default()
        };
        let disk = Arc::new(Disk::open(&opts).unwrap().0);
        let dev = Block::new(
            disk,
            BlockOptions {
                serial: "serial-0123456789abcdef".into(),
                queues: 1,
                engine,
                iops,
                bandwidth,
            },
        );
        let counters = dev.counters();
        let handle = dev.handle();
        let mut d = Driver::new(Box::new(dev));
        let q = VirtQueue::new(0x1000);
        assert_eq!(d.start(&[&q]), 0xf);
        Rig {
            d,
            q,
            path,
            counters,
            handle,
        }
    }

    impl Rig {
        /// Sends one request; returns (status, used length).
        fn send(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
            let mem = &self.d.mem;
            mem.write_obj(kind, GuestAddress(HDR)).unwrap();
            mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
            mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mut bufs = vec![(HDR, 16, false)];
            bufs.extend_from_slice(data);
            bufs.push((STATUS, 1, true));
            let before = self.q.used_idx(mem);
            self.q.add_chain(mem, &bufs);
            self.d.notify(0);
            assert!(wait_for(|| self.q.used_idx(&self.d.mem) != before));
            let (_, len) = self.q.used_elem(&self.d.mem, before);
            let status = self.d.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
            (status, len)
        }

        fn fill(&self, addr: u64, len: usize, byte: u8) {
            self.d
                .mem
                .write_slice(&vec![byte; len], GuestAddress(addr))
                .unwrap();
        }

        fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.d.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        fn file(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    fn read_write_on(engine: EngineKind, direct: bool) {
        let mut r = rig(&format!("rw-{engine}-{direct}"), false, engine, direct, 0);
        assert_eq!(r.d.read(0x100), 128, "capacity in sectors");
        // Read sectors 3..5 into two buffers (the second one 512 bytes in).
        let (s, len) = r.send(
            VIRTIO_BLK_T_IN,
            3,
            &[(DATA, 512, true), (DATA + 0x1000, 512, true)],
        );
        assert_eq!((s, len), (OK, 1025));
        assert_eq!(r.bytes(DATA, 512), vec![3; 512]);
        assert_eq!(r.bytes(DATA + 0x1000, 512), vec![4; 512]);
        // Write 4 KiB at sector 8 and flush.
        r.fill(DATA, 4096, 0xa5);
        assert_eq!(r.send(VIRTIO_BLK_T_OUT, 8, &[(DATA, 4096, false)]), (OK, 1));
        assert_eq!(r.send(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
        let f = r.file();
        assert_eq!(&f[8 * 512..16 * 512], &[0xa5; 4096][..]);
        assert_eq!(&f[7 * 512..8 * 512], &[7; 512][..]);
        assert_eq!(&f[16 * 512..17 * 512], &[16; 512][..]);
        assert_eq!(r.counters.write_bytes.load(Ordering::Relaxed), 4096);
        assert_eq!(r.counters.read_bytes.load(Ordering::Relaxed), 1024);
    }

    #[test]
    fn reads_and_writes_through_io_uring_and_sync_io() {
        read_write_on(EngineKind::IoUring, false);
        read_write_on(EngineKind::Sync, false);
        // O_DIRECT: the 512-byte buffers above are bounced, the 4 KiB write is not.
        read_write_on(EngineKind::IoUring, true);
        read_write_on(EngineKind::Sync, true);
    }

    #[test]
    fn get_id_discard_and_write_zeroes() {
        let mut r = rig("misc", false, EngineKind::IoUring, false, 0);
        let (s, len) = r.send(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
        assert_eq!((s, len), (OK, 21));
        assert_eq!(r.bytes(DATA, 20), b"serial-0123456789abc");
        let seg = |sector: u64, n: u32, flags: u32| {
            let mut v = sector.to_le_bytes().to_vec();
            v.extend_from_slice(&n.to_le_bytes());
            v.extend_from_slice(&flags.to_le_bytes());
            v
        };
        r.d.mem
            .write_slice(&seg(8, 8, 0), GuestAddress(DATA))
            .unwrap();
        assert_eq!(r.send(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, false)]).0, OK);
        r.d.mem
            .write_slice(&seg(32, 4, 1), GuestAddress(DATA))
            .unwrap();
        assert_eq!(
            r.send(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, false)]).0,
            OK
        );
        let f = r.file();
        assert!(f[8 * 512..16 * 512].iter().all(|&b| b == 0));
        assert!(f[32 * 512..36 * 512].iter().all(|&b| b == 0));
        assert_eq!(&f[16 * 512..17 * 512], &[16; 512][..]);
        // Discard takes no flags; a range past the end fails.
        r.d.mem
            .write_slice(&seg(8, 8, 1), GuestAddress(DATA))
            .unwrap();
        assert_eq!(
            r.send(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, false)]).0,
            UNSUPP
        );
        r.d.mem
            .write_slice(&seg(127, 2, 0), GuestAddress(DATA))
            .unwrap();
        assert_eq!(
            r.send(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, false)]).0,
            IOERR
        );
    }

    #[test]
    fn read_only_disks_refuse_writes_and_keep_the_file() {
        let mut r = rig("ro", true, EngineKind::IoUring, false, 0);
        let before = r.file();
        r.fill(DATA, 512, 0x11);
        assert_eq!(r.send(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]).0, IOERR);
        r.d.mem.write_slice(&[0u8; 16], GuestAddress(DATA)).unwrap();
        assert_eq!(
            r.send(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, false)]).0,
            IOERR
        );
        assert_eq!(
            r.send(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, false)]).0,
            IOERR
        );
        assert_eq!(r.send(VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
        assert_eq!(r.send(VIRTIO_BLK_T_IN, 1, &[(DATA, 512, true)]).0, OK);
        assert_eq!(r.bytes(DATA, 512), vec![1; 512]);
        assert_eq!(r.file(), before);
    }

    #[test]
    fn hostile_requests_get_an_error_status_and_the_device_keeps_serving() {
        let mut r = rig("hostile", false, EngineKind::IoUring, false, 0);
        type Case = (&'static str, u32, u64, Vec<(u64, u32, bool)>, u8);
        let cases: [Case; 10] = [
            (
                "past the end",
                VIRTIO_BLK_T_IN,
                128,
                vec![(DATA, 512, true)],
                IOERR,
            ),
            (
                "straddling the end",
                VIRTIO_BLK_T_IN,
                127,
                vec![(DATA, 1024, true)],
                IOERR,
            ),
            (
                "sector overflow",
                VIRTIO_BLK_T_IN,
                u64::MAX / 2,
                vec![(DATA, 512, true)],
                IOERR,
            ),
            (
                "zero-length buffer",
                VIRTIO_BLK_T_IN,
                0,
                vec![(DATA, 0, true), (DATA + 0x1000, 512, true)],
                IOERR,
            ),
            (
                "overlapping buffers",
                VIRTIO_BLK_T_IN,
                0,
                vec![(DATA, 512, true), (DATA + 256, 512, true)],
                IOERR,
            ),
            (
                "data over the header",
                VIRTIO_BLK_T_IN,
                0,
                vec![(HDR, 512, true)],
                IOERR,
            ),
            (
                "data over the status",
                VIRTIO_BLK_T_IN,
                0,
                vec![(STATUS - 511, 512, true)],
                IOERR,
            ),
            (
                "partial sector",
                VIRTIO_BLK_T_OUT,
                0,
                vec![(DATA, 100, false)],
                IOERR,
            ),
            (
                "too much data",
                VIRTIO_BLK_T_OUT,
                0,
                vec![(0x20_0000, (MAX_DATA as u32) / 4, false); 5],
                IOERR,
            ),
            ("unknown type", 0x55, 0, vec![], UNSUPP),
        ];
        let before = r.file();
        for (what, kind, sector, data, want) in cases {
            assert_eq!(r.send(kind, sector, &data).0, want, "{what}");
            assert_eq!(r.d.read(REG_STATUS) & NEEDS_RESET, 0, "{what}: broken");
            assert_eq!(
                r.send(VIRTIO_BLK_T_IN, 2, &[(DATA, 512, true)]).0,
                OK,
                "{what}"
            );
        }
        // Readable buffers may overlap: one zero page written to two sectors.
        r.fill(DATA, 512, 0);
        assert_eq!(
            r.send(
                VIRTIO_BLK_T_OUT,
                4,
                &[(DATA, 512, false), (DATA, 512, false)]
            )
            .0,
            OK
        );
        let f = r.file();
        assert!(f[4 * 512..6 * 512].iter().all(|&b| b == 0));
        assert_eq!(f[..4 * 512], before[..4 * 512]);
        assert_eq!(r.counters.errors.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn a_chain_without_a_status_byte_is_returned_unanswered() {
        let mut r = rig("nostatus", false, EngineKind::Sync, false, 0);
        let mem = &r.d.mem;
        r.q.add_chain(mem, &[(HDR, 16, false)]);
        r.d.notify(0);
        assert!(wait_for(|| r.q.used_idx(&r.d.mem) == 1));
        assert_eq!(r.q.used_elem(&r.d.mem, 0).1, 0);
        assert_eq!(r.send(VIRTIO_BLK_T_IN, 2, &[(DATA, 512, true)]).0, OK);
    }

    #[test]
    fn multiqueue_serves_each_queue_and_runs_with_fewer() {
        let path = image("mq", 64 << 10);
        let opts = DiskOptions {
            path: path.clone(),
            format: None,
            read_only: false,
            direct: false,
            ..DiskOptions::default()
        };
        let disk = Arc::new(Disk::open(&opts).unwrap().0);
        let mk = || {
            Block::new(
                disk.clone(),
                BlockOptions {
                    serial: String::new(),
                    queues: 3,
                    engine: EngineKind::IoUring,
                    iops: 0,
                    bandwidth: 0,
                },
            )
        };
        let dev = mk();
        assert_ne!(dev.features() & (1 << VIRTIO_BLK_F_MQ), 0);
        let mut cfg = [0u8; 2];
        dev.read_config(34, &mut cfg);
        assert_eq!(u16::from_le_bytes(cfg), 3);
        // Two of three queues enabled (a 2-vCPU Linux guest): both serve, in parallel.
        let mut d = Driver::new(Box::new(dev));
        let mut q0 = VirtQueue::new(0x1000);
        let mut q1 = VirtQueue::new(0x2000);
        assert_eq!(d.start(&[&q0, &q1]), 0xf);
        for (i, q) in [&mut q0, &mut q1].into_iter().enumerate() {
            let base = BUFS + 0x10000 * i as u64;
            d.mem.write_slice(&[0u8; 16], GuestAddress(base)).unwrap();
            d.mem
                .write_obj(5u64 + i as u64, GuestAddress(base + 8))
                .unwrap();
            q.add_chain(
                &d.mem,
                &[
                    (base, 16, false),
                    (base + 0x1000, 512, true),
                    (base + 0x100, 1, true),
                ],
            );
            d.notify(i as u32);
        }
        for (i, q) in [&q0, &q1].into_iter().enumerate() {
            let base = BUFS + 0x10000 * i as u64;
            assert!(wait_for(|| q.used_idx(&d.mem) == 1), "queue {i}");
            assert_eq!(
                d.mem.read_obj::<u8>(GuestAddress(base + 0x100)).unwrap(),
                OK
            );
            let mut got = vec![0u8; 512];
            d.mem
                .read_slice(&mut got, GuestAddress(base + 0x1000))
                .unwrap();
            assert_eq!(got, vec![5 + i as u8; 512], "queue {i}");
        }
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn the_rate_limiter_holds_requests_back() {
        // 20 ops/s with the default burst (2): 2 pass at once, the next waits ~50 ms.
        let mut r = rig("limit", false, EngineKind::IoUring, false, 20);
        for _ in 0..2 {
            assert_eq!(r.send(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0, OK);
        }
        assert_eq!(r.counters.throttled.load(Ordering::Relaxed), 0);
        assert_eq!(r.send(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0, OK);
        assert!(r.counters.throttled.load(Ordering::Relaxed) >= 1);
        assert_eq!(r.counters.read_ops.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn limits_change_while_the_device_runs() {
        let mut r = rig("relimit", false, EngineKind::IoUring, false, 0);
        for _ in 0..20 {
            assert_eq!(r.send(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0, OK);
        }
        assert_eq!(r.counters.throttled.load(Ordering::Relaxed), 0);
        // 20 ops/s: a burst of 2, then about 50 ms each.
        r.handle.set_limits(20, 0);
        let start = std::time::Instant::now();
        for _ in 0..6 {
            assert_eq!(r.send(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0, OK);
        }
        assert!(start.elapsed() >= std::time::Duration::from_millis(150));
        assert!(r.counters.throttled.load(Ordering::Relaxed) >= 3);
        r.handle.set_limits(0, 0);
        let waits = r.counters.throttled.load(Ordering::Relaxed);
        for _ in 0..20 {
            assert_eq!(r.send(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0, OK);
        }
        assert_eq!(r.counters.throttled.load(Ordering::Relaxed), waits);
    }

    #[test]
    fn a_grown_disk_shows_its_new_capacity_with_a_config_interrupt() {
        let mut r = rig("grow", false, EngineKind::IoUring, false, 0);
        let capacity = |r: &mut Rig| u64::from(r.d.read(0x100)) | u64::from(r.d.read(0x104)) << 32;
        assert_eq!(capacity(&mut r), 128);
        let generation = r.d.read(0xfc);
        // Past the end: refused.
        assert_eq!(r.send(VIRTIO_BLK_T_IN, 200, &[(DATA, 512, true)]).0, IOERR);
        let _ = r.d.irq.read();
        let _ = r.d.read(REG_ISR);
        r.handle.grow(256 << 10).unwrap();
        assert_eq!(r.handle.size(), 256 << 10);
        assert_eq!(capacity(&mut r), 512);
        assert_ne!(r.d.read(0xfc), generation, "the config generation moves on");
        assert!(r.d.irq.read().is_ok(), "no interrupt");
        assert_ne!(r.d.read(REG_ISR) & 2, 0, "no config interrupt");
        r.fill(DATA, 512, 0x77);
        assert_eq!(r.send(VIRTIO_BLK_T_OUT, 500, &[(DATA, 512, false)]).0, OK);
        assert_eq!(r.send(VIRTIO_BLK_T_IN, 200, &[(DATA, 512, true)]).0, OK);
        assert_eq!(r.bytes(DATA, 512), vec![0u8; 512]);
        // Shrinking is refused and changes nothing.
        let e = r.handle.grow(64 << 10).unwrap_err().to_string();
        assert!(e.contains("shrinking"), "{e}");
        assert_eq!(capacity(&mut r), 512);
    }

    #[test]
    fn a_replaced_image_serves_the_queue_and_shows_its_capacity() {
        let mut r = rig("swap-old", false, EngineKind::IoUring, false, 0);
        let capacity = |r: &mut Rig| u64::from(r.d.read(0x100)) | u64::from(r.d.read(0x104)) << 32;
        assert_eq!(capacity(&mut r), 128);
        // The new image: 256 sectors, each holding its number + 0x40.
        let path = std::env::temp_dir().join(format!("tern-vblk-{}-swap-new", std::process::id()));
        let content: Vec<u8> = (0..256 * 512).map(|i| (i / 512 + 0x40) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let open = |read_only| {
            let opts = DiskOptions {
                path: path.clone(),
                read_only,
                ..DiskOptions::default()
            };
            Arc::new(Disk::open(&opts).unwrap().0)
        };
        let far = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // A read-only image cannot replace a writable one: nothing changes.
        let e = r.handle.replace(open(true), far).unwrap_err();
        assert!(e.contains("read-only"), "{e}");
        assert_eq!(r.send(VIRTIO_BLK_T_IN, 3, &[(DATA, 512, true)]).0, OK);
        assert_eq!(r.bytes(DATA, 512), vec![3u8; 512]);
        let _ = r.d.irq.read();
        let _ = r.d.read(REG_ISR);
        let old = r.handle.replace(open(false), far).unwrap();
        assert_eq!(old.size(), 64 << 10);
        drop(old);
        assert_eq!(capacity(&mut r), 256);
        assert_ne!(r.d.read(REG_ISR) & 2, 0, "no config interrupt");
        // The same queue, now on the new image: reads and writes reach it.
        assert_eq!(r.send(VIRTIO_BLK_T_IN, 150, &[(DATA, 512, true)]).0, OK);
        assert_eq!(r.bytes(DATA, 512), vec![150 + 0x40; 512]);
        r.fill(DATA, 512, 0x99);
        assert_eq!(r.send(VIRTIO_BLK_T_OUT, 7, &[(DATA, 512, false)]).0, OK);
        let now = std::fs::read(&path).unwrap();
        assert_eq!(&now[7 * 512..8 * 512], &[0x99u8; 512][..]);
        let _ = std::fs::remove_file(&path);
    }

    /// A `virtio_blk_discard_write_zeroes` segment.
    fn zero_seg(sector: u64, n: u32, flags: u32) -> Vec<u8> {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
    }

    #[test]
    fn a_chain_made_available_again_while_in_flight_needs_a_reset() {
        let mut r = rig("again", false, EngineKind::IoUring, false, 0);
        let mem = r.d.mem.clone();
        mem.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(8u64, GuestAddress(HDR + 8)).unwrap();
        r.fill(DATA, 4096, 0x5a);
        let head = r.q.add_chain(
            &mem,
            &[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)],
        );
        // The same head made available seven more times before the device answered it.
        for _ in 0..7 {
            r.q.publish(&mem, head);
        }
        r.d.notify(0);
        assert!(r.d.wait_needs_reset(), "re-posted head accepted");
        // No copy is answered twice; the device took one and stopped at the next.
        assert!(r.q.used_idx(&mem) <= 1, "{} answers", r.q.used_idx(&mem));
    }

    #[test]
    fn discards_and_write_zeroes_count_against_the_rate_limiter() {
        // 20 ops/s with the default burst (2): the third waits.
        let mut r = rig("zero-iops", false, EngineKind::IoUring, false, 20);
        r.d.mem
            .write_slice(&zero_seg(8, 8, 0), GuestAddress(DATA))
            .unwrap();
        for kind in [
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            VIRTIO_BLK_T_DISCARD,
        ] {
            assert_eq!(r.send(kind, 0, &[(DATA, 16, false)]).0, OK);
        }
        assert!(r.counters.throttled.load(Ordering::Relaxed) >= 1);
        assert_eq!(r.counters.discard_ops.load(Ordering::Relaxed), 3);
        // 1 MiB/s (a burst of 1/10 s: 100 KiB): each 32 KiB range counts its length.
        let path = image("zero-bw", 1 << 20);
        let mut r = rig_on(path, false, EngineKind::IoUring, false, (0, 1 << 20));
        r.d.mem
            .write_slice(&zero_seg(64, 64, 0), GuestAddress(DATA))
            .unwrap();
        for _ in 0..4 {
            assert_eq!(
                r.send(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, false)]).0,
                OK
            );
        }
        assert!(r.counters.throttled.load(Ordering::Relaxed) >= 1);
    }

    struct NoIrq;
    impl crate::Interrupt for NoIrq {
        fn trigger(&self, _kind: crate::InterruptKind) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A queue worker on the image at `path` (synchronous I/O), driven by hand: each
    /// `handle` call is one wake-up.
    fn worker(path: &std::path::Path) -> (BlkWorker, VirtQueue) {
        let opts = DiskOptions {
            path: path.to_path_buf(),
            ..DiskOptions::default()
        };
        let disk = Arc::new(Disk::open(&opts).unwrap().0);
        let ctx = Ctx::new(
            VmMemory::new(mem()),
            Arc::new(NoIrq),
            Arc::default(),
            "blk",
            MAX_CHAIN,
        );
        let vq = VirtQueue::new(0x1000);
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(vq.size);
        queue
            .try_set_desc_table_address(GuestAddress(vq.desc))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(vq.avail))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(vq.used))
            .unwrap();
        queue.set_ready(true);
        let w = BlkWorker {
            ctx,
            queue,
            index: 0,
            event: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
            engine: Engine::new(disk, u32::from(QUEUE_SIZE), EngineKind::Sync),
            throttle: Throttle::new(shared_limiter(0, 0)).unwrap(),
            pending: (0..QUEUE_SIZE).map(|_| None).collect(),
            zeroing: VecDeque::new(),
            serial: [0; ID_LEN],
            counters: Arc::default(),
            done: Vec::new(),
        };
        (w, vq)
    }

    #[test]
    fn a_big_write_zeroes_runs_in_pieces_across_wake_ups() {
        // A sparse image of three wake-ups' worth of pieces, with data at both ends and
        // right after the first wake-up's share.
        let per_wake = ZERO_CHUNKS_PER_WAKE as u64 * ZERO_CHUNK;
        let size = 3 * per_wake;
        let path = std::env::temp_dir().join(format!("tern-vblk-{}-bigzero", std::process::id()));
        let f = {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            f.set_len(size).unwrap();
            f.write_all_at(&[0x11; 4096], 0).unwrap();
            f.write_all_at(&[0x22; 4096], per_wake).unwrap();
            f.write_all_at(&[0x33; 4096], size - 4096).unwrap();
            f
        };
        let at = |off: u64| {
            use std::os::unix::fs::FileExt;
            let mut b = [0u8; 4096];
            f.read_exact_at(&mut b, off).unwrap();
            b
        };
        let (mut w, mut vq) = worker(&path);
        let mem = w.ctx.mem.clone();
        // Zero everything but the first and last 4 KiB...
        let sectors = ((size - 8192) / SECTOR) as u32;
        mem.write_obj(VIRTIO_BLK_T_WRITE_ZEROES, GuestAddress(HDR))
            .unwrap();
        mem.write_obj(0u64, GuestAddress(HDR + 8)).unwrap();
        mem.write_slice(&zero_seg(8, sectors, 0), GuestAddress(DATA))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let zero = vq.add_chain(
            &mem,
            &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
        );
        // ... and read sector 1 right behind it.
        let (hdr2, buf2, status2) = (BUFS + 0x8000, BUFS + 0x9000, BUFS + 0x8100);
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(hdr2)).unwrap();
        mem.write_obj(1u64, GuestAddress(hdr2 + 8)).unwrap();
        let read = vq.add_chain(
            &mem,
            &[(hdr2, 16, false), (buf2, 512, true), (status2, 1, true)],
        );
        // Wake-up 1: the read is answered, the write-zeroes has done one wake-up's share
        // (the data right after it is still there) and the worker is to come back.
        assert!(w.handle(TOKEN_QUEUE));
        assert_eq!(vq.used_idx(&mem), 1);
        assert_eq!(vq.used_elem(&mem, 0).0, u32::from(read));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(status2)).unwrap(), OK);
        assert_eq!(r_bytes(&mem, buf2, 512), vec![0x11; 512]);
        assert_eq!(at(per_wake - 4096), [0; 4096]);
        assert_eq!(at(per_wake), [0x22; 4096]);
        assert_eq!(w.event.read().unwrap(), 1, "queue event re-raised");
        // Wake-ups 2 and 3 finish it; then it is answered.
        assert!(w.handle(TOKEN_QUEUE));
        assert_eq!(vq.used_idx(&mem), 1);
        assert_eq!(at(per_wake), [0; 4096]);
        assert!(w.handle(TOKEN_QUEUE));
        assert_eq!(vq.used_idx(&mem), 2);
        assert_eq!(vq.used_elem(&mem, 1), (u32::from(zero), 1));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
        assert_eq!(at(0), [0x11; 4096]);
        assert_eq!(at(size - 8192), [0; 4096]);
        assert_eq!(at(size - 4096), [0x33; 4096]);
        assert_eq!(w.counters.discard_ops.load(Ordering::Relaxed), 1);
        assert!(w.zeroing.is_empty() && w.pending.iter().all(Option::is_none));
        std::fs::remove_file(path).ok();
    }

    fn r_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A driver of a device on a fresh 64 KiB image (the caller removes it), not started.
    fn plain_rig(name: &str) -> (Driver, PathBuf) {
        let path = image(name, 64 << 10);
        let opts = DiskOptions {
            path: path.clone(),
            ..DiskOptions::default()
        };
        let dev = Block::new(
            Arc::new(Disk::open(&opts).unwrap().0),
            BlockOptions {
                serial: String::new(),
                queues: 1,
                engine: EngineKind::Sync,
                iops: 0,
                bandwidth: 0,
            },
        );
        (Driver::new(Box::new(dev)), path)
    }

    /// Pauses the device on another thread; whether that returned within 5 s.
    fn pauses(d: Driver) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use crate::transport::PauseDevice;
            let mut d = d;
            std::thread::sleep(Duration::from_millis(50));
            let stopped =
                d.t.pause_device(std::time::Instant::now() + Duration::from_secs(3));
            let _ = tx.send(stopped);
            d
        });
        rx.recv_timeout(Duration::from_secs(5)) == Ok(true)
    }

    /// A used ring laid two bytes into the available ring: each time the worker turns
    /// notifications on or off it rewrites the available index, so the ring looks non-empty
    /// when it checks and empty when it pops. The worker must still come back to its events
    /// (a pause returns) instead of spinning forever. Found by the virtio_blk fuzz target.
    #[test]
    fn a_used_ring_over_the_available_ring_does_not_hold_the_worker() {
        let (mut d, path) = plain_rig("overlap");
        let mut q = VirtQueue::new(0x1000);
        // The used ring's flags are the available ring's index (rings need 2- and 4-byte
        // alignment).
        q.avail += 2;
        q.used = q.avail + 2;
        assert_eq!(d.start(&[&q]), 0xf);
        // One chain (descriptor 0: empty, so no status byte) made available.
        q.set_desc(&d.mem, 0, 0, 0, 0, 0);
        q.publish(&d.mem, 0);
        d.notify(0);
        let paused = pauses(d);
        std::fs::remove_file(path).ok();
        assert!(paused, "the worker never came back to its events");
    }
}
