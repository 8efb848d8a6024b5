//! What every device back-end shares: the worker thread, validated descriptor chains, the
//! used ring and interrupts, and the "broken" state a malformed request leads to (the policy is
//! described in the parent module).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ratelimit::RateLimiter;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::timerfd::TimerFd;

use lifecycle::event_loop::EventLoop;
pub use lifecycle::threads::Device;
use virtio_bindings::bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{GuestMemoryMmap, Interrupt, InterruptKind, VmMemory};

/// The most bytes one descriptor chain may describe. Anything larger is not a request any
/// driver of these devices makes (Linux stays below 64 KiB) and is rejected as malformed, which
/// bounds the work one request costs the worker.
pub(crate) const MAX_CHAIN_BYTES: u64 = 1 << 20;

/// Bytes copied through the host per step.
pub(crate) const CHUNK: usize = 4096;

/// Why a device gave up on the driver.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Malformed {
    #[error("queue {0}: {1}")]
    Queue(u16, virtio_queue::Error),
    #[error("descriptor chain {0} is empty, loops, outgrows the queue or leaves the table")]
    Truncated(u16),
    #[error("descriptor chain {head}: buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { head: u16, addr: u64, len: u32 },
    #[error("descriptor chain {0}: a device-readable buffer follows a device-writable one")]
    Order(u16),
    #[error("descriptor chain {0} describes more than {1} bytes")]
    TooLong(u16, u64),
    #[error("descriptor chain {0} has {1} buffers, which this queue does not take")]
    Direction(u16, &'static str),
    #[error("guest memory: {0}")]
    Memory(GuestMemoryError),
    #[error("queue {0}: descriptor chain {1} was made available again while still in use")]
    InUse(u16, u16),
}

/// One guest buffer of a validated chain (known to lie inside guest memory).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// A validated descriptor chain popped from the available ring.
#[derive(Debug)]
pub(crate) struct Request {
    pub head: u16,
    pub bufs: Vec<Buf>,
}

impl Request {
    /// Fails unless every buffer is device-writable (`writable`) or device-readable.
    pub fn expect(&self, writable: bool) -> Result<(), Malformed> {
        if self.bufs.iter().all(|b| b.writable == writable) {
            return Ok(());
        }
        let wrong = if writable {
            "device-readable"
        } else {
            "device-writable"
        };
        Err(Malformed::Direction(self.head, wrong))
    }
}

/// What [`Ctx::pop_checked`] took from a queue: nothing (the ring is empty), a checked request,
/// or the head of a chain that failed its checks and why.
pub(crate) type Popped = Option<Result<Request, (u16, Malformed)>>;

/// What a device's worker holds besides its queues.
pub(crate) struct Ctx {
    /// The VM's memory, of which `mem` is the view the worker uses; [`pop`](Self::pop) takes
    /// the current one per request.
    space: VmMemory,
    /// `space`'s change count when `mem` was taken (read before it).
    changes: u64,
    /// Guest memory as the worker uses it now: a clone of a view of `space` (same regions).
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn Interrupt>,
    pub broken: Arc<AtomicBool>,
    pub name: &'static str,
    /// Most bytes a chain may describe ([`MAX_CHAIN_BYTES`] unless the device needs more).
    pub max_chain: u64,
    /// Buffer lists of requests handed back by [`recycle`](Self::recycle), emptied, for the
    /// next chains popped: a device that recycles pops without allocating.
    spare: Vec<Vec<Buf>>,
}

/// Most buffer lists a [`Ctx`] keeps for reuse (a queue's worth of chains in flight).
const SPARE_MAX: usize = 256;
/// Longest buffer list kept for reuse: a guest's long chains must not make the worker hold on
/// to their memory (at most `SPARE_MAX` × 16 buffers are kept, 64 KiB).
const SPARE_BUFS: usize = 16;

impl Ctx {
    /// A worker's context over the VM's memory `space`, starting from its current view.
    pub fn new(
        space: VmMemory,
        interrupt: Arc<dyn Interrupt>,
        broken: Arc<AtomicBool>,
        name: &'static str,
        max_chain: u64,
    ) -> Self {
        let changes = space.changes();
        Ctx {
            mem: (*space.memory()).clone(),
            changes,
            space,
            interrupt,
            broken,
            name,
            max_chain,
            spare: Vec::new(),
        }
    }

    /// Takes back a request the device has finished with, to reuse its buffer list.
    pub fn recycle(&mut self, req: Request) {
        if self.spare.len() < SPARE_MAX && req.bufs.capacity() <= SPARE_BUFS {
            let mut bufs = req.bufs;
            bufs.clear();
            self.spare.push(bufs);
        }
    }

    /// Takes the VM's current memory view, if it changed (a region was added): one load when
    /// it did not. Regions are never removed, so buffers checked against the old view (I/O in
    /// flight) stay mapped in the new one.
    fn refresh(&mut self) {
        let changes = self.space.changes();
        if changes == self.changes {
            return;
        }
        self.changes = changes;
        self.mem = (*self.space.memory()).clone();
    }

    /// Marks the device broken and tells the driver (a config interrupt); returns false so
    /// handlers can `return ctx.fail(e)` to stop their worker.
    pub fn fail(&self, e: Malformed) -> bool {
        ratelimit::warn_limited!("virtio-{}: {e}; device needs a reset", self.name);
        self.broken.store(true, Ordering::SeqCst);
        if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
            ratelimit::warn_limited!(
                "virtio-{}: cannot raise the config interrupt: {e}",
                self.name
            );
        }
        false
    }

    /// Pops and validates the next available chain of queue `index`.
    pub fn pop(&mut self, q: &mut Queue, index: u16) -> Result<Option<Request>, Malformed> {
        match self.pop_checked(q, index)? {
            None => Ok(None),
            Some(Ok(r)) => Ok(Some(r)),
            Some(Err((_, e))) => Err(e),
        }
    }

    /// Like [`pop`](Self::pop), but a malformed chain whose head is a valid descriptor index
    /// comes back as `Some(Err((head, why)))`, so a device may return it unused and carry on
    /// (virtio-net drops such frames). A bad available ring is still an error.
    #[allow(clippy::type_complexity)]
    pub fn pop_checked(&mut self, q: &mut Queue, index: u16) -> Result<Popped, Malformed> {
        self.refresh();
        let size = q.size();
        let chain = q
            .iter(&self.mem)
            .map_err(|e| Malformed::Queue(index, e))?
            .next();
        let Some(chain) = chain else {
            return Ok(None);
        };
        let head = chain.head_index();
        let bufs = self.spare.pop().unwrap_or_default();
        match self.validate(chain, bufs) {
            Ok(r) => Ok(Some(Ok(r))),
            Err(e) if head < size => Ok(Some(Err((head, e)))),
            Err(e) => Err(e),
        }
    }

    /// Checks a chain's descriptors (order, total length, each in guest memory) into `bufs`
    /// (empty), marking the device-writable ones dirty in the VM's log.
    fn validate(
        &self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mut bufs: Vec<Buf>,
    ) -> Result<Request, Malformed> {
        let head = chain.head_index();
        let mut total = 0u64;
        // The chain iterator stops quietly at a loop (after queue-size descriptors), at an index
        // outside the table or at an unreadable descriptor; a last descriptor that still says
        // NEXT (or no descriptor at all) tells us that happened.
        let mut more = true;
        for d in chain {
            more = d.has_next();
            let writable = d.is_write_only();
            if !writable && bufs.last().is_some_and(|b: &Buf| b.writable) {
                return Err(Malformed::Order(head));
            }
            total += u64::from(d.len());
            if total > self.max_chain {
                return Err(Malformed::TooLong(head, self.max_chain));
            }
            let access = if writable {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !self.mem.check_range(d.addr(), d.len() as usize, access) {
                return Err(Malformed::OutOfRange {
                    head,
                    addr: d.addr().0,
                    len: d.len(),
                });
            }
            if writable {
                self.space.dirty().mark(d.addr().0, u64::from(d.len()));
            }
            bufs.push(Buf {
                addr: d.addr(),
                len: d.len(),
                writable,
            });
        }
        if more {
            return Err(Malformed::Truncated(head));
        }
        Ok(Request { head, bufs })
    }

    /// Marks guest memory the device changed other than by writing a buffer (which
    /// validation marks) in the VM's dirty log.
    pub fn mark_dirty(&self, addr: u64, len: u64) {
        self.space.dirty().mark(addr, len);
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn add_used(
        &self,
        q: &mut Queue,
        index: u16,
        head: u16,
        len: u32,
    ) -> Result<(), Malformed> {
        q.add_used(&self.mem, head, len)
            .map_err(|e| Malformed::Queue(index, e))
    }

    /// Like [`Self::add_used`], but the driver sees the entry only at the next
    /// [`Self::publish_used`]. `virtio_queue` writes the used index with every entry; a worker
    /// that returns many chains in one pass can instead write the entries and publish the
    /// index once. A driver polling that index (on another CPU) then takes its cache line from
    /// the worker once per batch, not once per chain, and the worker's next store to it does
    /// not wait for the line to come back.
    pub fn put_used(
        &self,
        q: &mut Queue,
        index: u16,
        head: u16,
        len: u32,
    ) -> Result<(), Malformed> {
        let size = q.size();
        if head >= size {
            return Err(Malformed::Queue(
                index,
                virtio_queue::Error::InvalidDescriptorIndex,
            ));
        }
        let next = q.next_used();
        // The used ring: flags and index (2 bytes each), then 8-byte entries (id, len).
        let addr = q
            .used_ring()
            .checked_add(4 + 8 * u64::from(next % size))
            .ok_or(Malformed::Queue(
                index,
                virtio_queue::Error::AddressOverflow,
            ))?;
        let entry = (u64::from(len) << 32) | u64::from(head);
        self.mem
            .write_obj(entry.to_le(), GuestAddress(addr))
            .map_err(Malformed::Memory)?;
        q.set_next_used(next.wrapping_add(1));
        Ok(())
    }

    /// Makes the entries [`Self::put_used`] wrote visible to the driver: stores the used
    /// index after them (release ordering: the entries first).
    pub fn publish_used(&self, q: &Queue, index: u16) -> Result<(), Malformed> {
        let addr = q.used_ring().checked_add(2).ok_or(Malformed::Queue(
            index,
            virtio_queue::Error::AddressOverflow,
        ))?;
        self.mem
            .store(q.next_used().to_le(), GuestAddress(addr), Ordering::Release)
            .map_err(Malformed::Memory)
    }

    /// Interrupts the guest for queue `index` unless the driver asked not to be
    /// (VRING_AVAIL_F_NO_INTERRUPT). On a queue with EVENT_IDX (only virtio-net offers it),
    /// where the flag means nothing, it interrupts every time: a caller that does not track what
    /// it returned since its last interrupt (virtio-net's control queue) cannot apply the
    /// driver's `used_event`, and an interrupt more than that asks for is allowed (the spec's
    /// "SHOULD NOT"), while one fewer would leave the driver waiting.
    pub fn signal(&self, q: &Queue, index: u16) {
        if !q.event_idx_enabled() {
            // Order the used-ring update before reading the driver's flags.
            fence(Ordering::SeqCst);
            let flags: u16 = self
                .mem
                .read_obj(GuestAddress(q.avail_ring()))
                .map(u16::from_le)
                .unwrap_or(0);
            if flags & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0 {
                return;
            }
        }
        self.trigger(index);
    }

    /// Like [`Self::signal`], on a queue whose used entries are returned with
    /// [`Self::put_used`]: `*since` is the used index when this was last called for the queue
    /// (the queue's when the worker started), and becomes the current one. With EVENT_IDX the
    /// guest is interrupted only if the used index went past the driver's `used_event` (the
    /// word after the available ring) since then, the spec's rule; `virtio_queue`'s own test
    /// counts the entries `add_used` made, which `put_used` does not.
    pub fn signal_since(&self, q: &Queue, index: u16, since: &mut u16) {
        if !q.event_idx_enabled() {
            *since = q.next_used();
            return self.signal(q, index);
        }
        // Order the used index's store before reading the driver's `used_event`.
        fence(Ordering::SeqCst);
        let new = q.next_used();
        let old = std::mem::replace(since, new);
        let event = q
            .avail_ring()
            .checked_add(4 + 2 * u64::from(q.size()))
            .and_then(|a| self.mem.read_obj::<u16>(GuestAddress(a)).ok())
            .map(u16::from_le);
        // Unreadable: interrupt (a spurious interrupt is harmless, a missing one hangs).
        if event.is_none_or(|e| new.wrapping_sub(e).wrapping_sub(1) < new.wrapping_sub(old)) {
            self.trigger(index);
        }
    }

    fn trigger(&self, index: u16) {
        if let Err(e) = self.interrupt.trigger(InterruptKind::Queue(index)) {
            ratelimit::warn_limited!(
                "virtio-{}: cannot raise the queue interrupt: {e}",
                self.name
            );
        }
    }

    /// Writes `data` across the writable buffers of `req` in order; returns the bytes written.
    pub fn write_bufs(&self, req: &Request, mut data: &[u8]) -> Result<usize, Malformed> {
        let mut done = 0;
        for b in req.bufs.iter().filter(|b| b.writable) {
            if data.is_empty() {
                break;
            }
            let n = data.len().min(b.len as usize);
            self.mem
                .write_slice(&data[..n], b.addr)
                .map_err(Malformed::Memory)?;
            data = &data[n..];
            done += n;
        }
        Ok(done)
    }
}

/// Copies `data.len()` bytes of a device's configuration space `config` from `offset`; bytes
/// beyond its end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}

/// The transport's interrupt while a device is active, kept where the device's owner can
/// raise a configuration change (a new balloon target, a new requested size).
#[derive(Default)]
pub(crate) struct ConfigIrq(Mutex<Option<Arc<dyn Interrupt>>>);

impl ConfigIrq {
    /// Keeps `irq` (on activation) or forgets it (`None`, on reset).
    pub fn set(&self, irq: Option<Arc<dyn Interrupt>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = irq;
    }

    /// Tells the driver the configuration changed; nothing while the device is inactive (the
    /// driver reads the configuration when it starts).
    pub fn raise(&self) -> Result<(), String> {
        let irq = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match irq {
            Some(irq) => irq
                .trigger(InterruptKind::Config)
                .map_err(|e| format!("cannot tell the guest: {e}")),
            None => Ok(()),
        }
    }
}

/// A device's rate limits (ops/s and bytes/s), shared by its queues and changeable while the
/// device runs (`PATCH /v1/vm/disks/{id}`): a new limit takes effect at the next request; a
/// queue already waiting for the old limit's timer waits that wait out.
pub struct Limiter {
    /// Whether any limit is set: the unlimited fast path takes no lock.
    limited: AtomicBool,
    buckets: Mutex<RateLimiter>,
}

impl Limiter {
    /// A limiter for `ops` operations/s and `bytes` bytes/s (0 = unlimited), with the default
    /// bursts.
    pub fn new(ops: u64, bytes: u64) -> Self {
        let l = Limiter {
            limited: AtomicBool::new(false),
            buckets: Mutex::new(RateLimiter::default()),
        };
        l.set(ops, bytes);
        l
    }

    /// Replaces the limits (full buckets of the new size).
    pub fn set(&self, ops: u64, bytes: u64) {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        *b = RateLimiter::new((ops, 0), (bytes, 0), Instant::now());
        self.limited.store(b.is_limited(), Ordering::SeqCst);
    }
}

pub(crate) type SharedLimiter = Arc<Limiter>;

/// A limiter for `ops` operations/s and `bytes` bytes/s (0 = unlimited).
pub(crate) fn shared_limiter(ops: u64, bytes: u64) -> SharedLimiter {
    Arc::new(Limiter::new(ops, bytes))
}

/// One queue's side of a rate limiter: a timerfd to wait on when a request does not fit.
pub(crate) struct Throttle {
    limiter: SharedLimiter,
    timer: TimerFd,
    /// The queue waits for the timer.
    pub waiting: bool,
}

impl Throttle {
    pub fn new(limiter: SharedLimiter) -> io::Result<Self> {
        Ok(Throttle {
            limiter,
            timer: TimerFd::new().map_err(io::Error::from)?,
            waiting: false,
        })
    }

    /// The timer's descriptor, for the worker's epoll.
    pub fn fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// The timer fired: the queue may go on.
    pub fn fired(&mut self) {
        let _ = self.timer.wait();
        self.waiting = false;
    }

    /// Whether an operation of `bytes` may go now; if not, arms the timer for when it may,
    /// sets `waiting` and counts a wait in `waits`.
    pub fn admit(&mut self, bytes: u64, waits: &AtomicU64) -> bool {
        if !self.limiter.limited.load(Ordering::Relaxed) {
            return true;
        }
        let mut l = self
            .limiter
            .buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if l.try_admit(bytes, now) {
            return true;
        }
        let wait = l.wait_time(bytes, now).max(Duration::from_micros(50));
        drop(l);
        waits.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.timer.reset(wait, None) {
            ratelimit::warn_limited!("cannot arm a rate-limit timer: {e}");
            return true;
        }
        self.waiting = true;
        false
    }
}

/// Drains an eventfd (created non-blocking) so a level-triggered epoll does not fire again.
pub(crate) fn drain(evt: &EventFd) {
    // WouldBlock (a spurious wakeup) is the only expected error; nothing to do either way.
    let _ = evt.read();
}

/// The event side of a device worker.
pub(crate) trait Handler: Send + 'static {
    /// The file descriptors to wait on; the index of each is the token passed to `handle`.
    fn fds(&self) -> Vec<RawFd>;
    /// Whether fd `token` is watched edge-triggered (then `handle` need not drain it at once,
    /// but must remember that it may have more). Level-triggered by default.
    fn edge_triggered(&self, _token: usize) -> bool {
        false
    }
    /// Before the worker parks for a pause: finish in-flight work (the device must not touch
    /// guest memory while paused).
    fn quiesce(&mut self) {}
    /// Whether the worker polls for its next event before it sleeps (see [`Poller`]). Worth it
    /// where waking the worker costs more than the work (block requests); not where the CPU
    /// it spins on is what the other end needs (a NIC's receive side, fed by host threads:
    /// polling cost virtio-net 15–30% of its receive rate on a 2-core host).
    const POLLS: bool = false;
    /// Handles readiness of fd `token`; must consume the event (epoll is level-triggered).
    /// Returns false to stop the worker (the device is broken).
    fn handle(&mut self, token: usize) -> bool;
}

const CTL_TOKEN: u64 = u64::MAX;

/// What the owner wants of a worker thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

/// The owner's side of a worker's control: the wish, whether the worker is parked, and the
/// eventfd that makes it look.
struct Control {
    state: Mutex<(Want, bool)>,
    cv: Condvar,
    evt: EventFd,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Want, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A device's worker thread: epolls its handler's fds and a control eventfd (pause, resume,
/// stop).
pub(crate) struct Worker<H: Handler> {
    ctl: Arc<Control>,
    thread: Option<JoinHandle<H>>,
}

impl<H: Handler> Worker<H> {
    /// Starts thread `name` serving `handler` for a device of kind `kind` (which decides what
    /// the thread may do).
    pub fn spawn(kind: Device, name: &str, handler: H) -> io::Result<Self> {
        let events = EventLoop::new()?;
        let ctl = Arc::new(Control {
            state: Mutex::new((Want::Run, false)),
            cv: Condvar::new(),
            evt: EventFd::new(EFD_NONBLOCK)?,
        });
        for (i, fd) in handler.fds().into_iter().enumerate() {
            events.add_with(fd, i as u64, handler.edge_triggered(i))?;
        }
        events.add(ctl.evt.as_raw_fd(), CTL_TOKEN)?;
        let thread_ctl = ctl.clone();
        let thread = lifecycle::threads::spawn(
            lifecycle::threads::Role::DeviceWorker(kind),
            name,
            move || run(events, thread_ctl, handler),
        )?;
        Ok(Worker {
            ctl,
            thread: Some(thread),
        })
    }

    fn want(&self, w: Want) {
        self.ctl.lock().0 = w;
        self.ctl.cv.notify_all();
        if let Err(e) = self.ctl.evt.write(1) {
            tracing::error!("cannot signal a virtio worker: {e}");
        }
    }

    /// Stops the worker between two events, after its handler quiesced (in-flight I/O
    /// finished and answered); returns true once it is parked (or gone), false if it was not
    /// by `deadline` (its I/O hangs, say). The pause stays requested then: the worker parks
    /// when it gets there, unless [`resume`](Self::resume) was called meanwhile.
    pub fn pause(&self, deadline: Instant) -> bool {
        if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
            return true;
        }
        self.want(Want::Pause);
        let mut s = self.ctl.lock();
        while !s.1 && self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .ctl
                .cv
                .wait_timeout(s, left.min(Duration::from_millis(10)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    /// Lets a paused worker go on.
    pub fn resume(&self) {
        self.want(Want::Run);
    }

    /// Stops the thread and returns its handler (None if it panicked).
    pub fn stop(mut self) -> Option<H> {
        self.join()
    }

    fn join(&mut self) -> Option<H> {
        let thread = self.thread.take()?;
        self.want(Want::Stop);
        thread
            .join()
            .map_err(|_| tracing::error!("a virtio worker panicked"))
            .ok()
    }
}

impl<H: Handler> Drop for Worker<H> {
    fn drop(&mut self) {
        self.join();
    }
}

/// Pauses every worker of `workers` against one `deadline` (see [`Worker::pause`]); true if
/// all of them parked.
pub(crate) fn pause_all<'a, H: Handler>(
    workers: impl IntoIterator<Item = &'a Worker<H>>,
    deadline: Instant,
) -> bool {
    // Every worker is asked, even after one failed: the caller resumes them all.
    let mut all = true;
    for w in workers {
        all &= w.pause(deadline);
    }
    all
}

/// Handles the owner's wish; false when the worker is to stop.
fn obey<H: Handler>(ctl: &Control, handler: &mut H) -> bool {
    let _ = ctl.evt.read();
    let mut s = ctl.lock();
    if s.0 == Want::Pause {
        drop(s);
        handler.quiesce();
        s = ctl.lock();
        s.1 = true;
        ctl.cv.notify_all();
        while s.0 == Want::Pause {
            s = ctl.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.1 = false;
    }
    s.0 != Want::Stop
}

/// Longest a worker polls for its next event before it sleeps (see [`Poller`]).
const POLL_MAX: Duration = Duration::from_micros(64);

/// A worker's adaptive polling ([`Handler::POLLS`]), the scheme QEMU's event loops use.
/// Waking a sleeping worker (the vCPU's notification signals an eventfd, the kernel schedules
/// the worker on another CPU) costs a block device more than its work at low queue depths; so
/// after each event the worker keeps checking for the next one for a while before it sleeps. The window grows (4 µs, then
/// doubling, up to [`POLL_MAX`]) while events come sooner than [`POLL_MAX`] after a wait
/// began, and drops to zero after a longer wait: an idle device polls not at all.
#[derive(Default)]
struct Poller {
    window: Duration,
}

impl Poller {
    /// Adapts the window to a wait that lasted `waited`.
    fn adjust(&mut self, waited: Duration) {
        if waited <= self.window {
            // Found while polling: the window fits.
        } else if waited > POLL_MAX {
            self.window = Duration::ZERO;
        } else {
            self.window = (self.window * 2).clamp(Duration::from_micros(4), POLL_MAX);
        }
    }
}

fn run<H: Handler>(mut events: EventLoop, ctl: Arc<Control>, mut handler: H) -> H {
    let mut poll = Poller::default();
    let mut ready: Vec<u64> = Vec::new();
    loop {
        let start = Instant::now();
        ready.clear();
        loop {
            let polling = start.elapsed() < poll.window;
            match events.wait(polling.then_some(Duration::ZERO)) {
                Ok(r) => ready.extend(r.iter()),
                Err(e) => {
                    tracing::error!("virtio worker: epoll failed: {e}");
                    return handler;
                }
            }
            if !ready.is_empty() || !polling {
                break;
            }
            std::hint::spin_loop();
        }
        if H::POLLS {
            poll.adjust(start.elapsed());
        }
        // The owner's wish first: a paused worker handles nothing else.
        if ready.contains(&CTL_TOKEN) && !obey(&ctl, &mut handler) {
            return handler;
        }
        for &token in ready.iter().filter(|&&t| t != CTL_TOKEN) {
            if !handler.handle(token as usize) {
                return handler;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::testing::*;

    #[test]
    fn recycled_buffer_lists_are_reused_up_to_a_bound() {
        let (mut ctx, _, mut vq, mut q) = rig();
        let req = |n: usize| Request {
            head: 0,
            bufs: Vec::with_capacity(n),
        };
        ctx.recycle(req(4));
        ctx.recycle(req(SPARE_BUFS + 1));
        assert_eq!(ctx.spare.len(), 1, "a long list is not kept");
        let before = ctx.spare[0].as_ptr();
        vq.add_chain(&ctx.mem, &[(BUFS, 16, false)]);
        let r = ctx.pop(&mut q, 0).unwrap().unwrap();
        assert_eq!(r.bufs.len(), 1);
        assert_eq!(
            r.bufs.as_ptr(),
            before,
            "the kept list is the one popped into"
        );
        assert!(ctx.spare.is_empty());
        for _ in 0..SPARE_MAX + 1 {
            ctx.recycle(req(1));
        }
        assert_eq!(ctx.spare.len(), SPARE_MAX);
    }

    #[test]
    fn the_polling_window_grows_with_dense_events_and_closes_when_idle() {
        let us = Duration::from_micros;
        let mut p = Poller::default();
        assert_eq!(p.window, Duration::ZERO);
        // Events 25 µs apart: 4, 8, 16, 32 µs, where the next event is found while polling.
        for want in [4, 8, 16, 32] {
            p.adjust(us(25));
            assert_eq!(p.window, us(want));
        }
        p.adjust(us(25));
        assert_eq!(p.window, us(32), "found while polling: the window stays");
        for _ in 0..4 {
            p.adjust(us(60));
        }
        assert_eq!(p.window, POLL_MAX, "never more than POLL_MAX");
        p.adjust(POLL_MAX + us(1));
        assert_eq!(p.window, Duration::ZERO, "a long wait closes it");
    }

    #[derive(Default)]
    struct Rec(Mutex<Vec<InterruptKind>>);
    impl Interrupt for Rec {
        fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
            self.0.lock().unwrap().push(kind);
            Ok(())
        }
    }

    fn rig() -> (Ctx, Arc<Rec>, VirtQueue, Queue) {
        let rec = Arc::new(Rec::default());
        let ctx = Ctx::new(
            VmMemory::new(mem()),
            rec.clone(),
            Arc::new(AtomicBool::new(false)),
            "test",
            MAX_CHAIN_BYTES,
        );
        let vq = VirtQueue::new(0x1000);
        let mut q = Queue::new(256).unwrap();
        q.set_size(vq.size);
        q.try_set_desc_table_address(GuestAddress(vq.desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(vq.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(vq.used)).unwrap();
        q.set_ready(true);
        assert!(q.is_valid(&ctx.mem));
        (ctx, rec, vq, q)
    }

    #[test]
    fn valid_chain() {
        let (mut ctx, _, mut vq, mut q) = rig();
        assert!(ctx.pop(&mut q, 0).unwrap().is_none());
        let h = vq.add_chain(
            &ctx.mem,
            &[(BUFS, 3, false), (BUFS + 8, 0, true), (BUFS + 16, 5, true)],
        );
        let req = ctx.pop(&mut q, 0).unwrap().unwrap();
        assert_eq!(req.head, h);
        assert_eq!(req.bufs.len(), 3);
        assert!(req.expect(true).is_err() && req.expect(false).is_err());
        assert_eq!(ctx.write_bufs(&req, b"abcdefgh").unwrap(), 5);
        let mut got = [0u8; 5];
        ctx.mem
            .read_slice(&mut got, GuestAddress(BUFS + 16))
            .unwrap();
        assert_eq!(&got, b"abcde");
        ctx.add_used(&mut q, 0, req.head, 5).unwrap();
        assert_eq!(vq.used_elem(&ctx.mem, 0), (h.into(), 5));
        assert!(ctx.pop(&mut q, 0).unwrap().is_none());
    }

    #[test]
    fn entries_put_are_seen_when_published() {
        let (mut ctx, _, mut vq, mut q) = rig();
        let mut heads = Vec::new();
        for i in 0..3u32 {
            heads.push(vq.add_chain(&ctx.mem, &[(BUFS + 16 * u64::from(i), 4, true)]));
        }
        for (i, &h) in heads.iter().enumerate() {
            let req = ctx.pop(&mut q, 0).unwrap().unwrap();
            ctx.put_used(&mut q, 0, req.head, 10 + i as u32).unwrap();
            assert_eq!(vq.used_elem(&ctx.mem, i as u16), (h.into(), 10 + i as u32));
        }
        assert_eq!(vq.used_idx(&ctx.mem), 0, "nothing published yet");
        ctx.publish_used(&q, 0).unwrap();
        assert_eq!(vq.used_idx(&ctx.mem), 3);
        // The index wraps at 65,536: entry 65,535 lands in the last slot, the next in slot 0.
        q.set_next_used(u16::MAX);
        ctx.put_used(&mut q, 0, heads[0], 7).unwrap();
        ctx.put_used(&mut q, 0, heads[1], 8).unwrap();
        assert_eq!(vq.used_elem(&ctx.mem, u16::MAX), (heads[0].into(), 7));
        assert_eq!(vq.used_elem(&ctx.mem, 0), (heads[1].into(), 8));
        ctx.publish_used(&q, 0).unwrap();
        assert_eq!(vq.used_idx(&ctx.mem), 1);
        // A head outside the table is the driver's fault, not a panic.
        let e = ctx.put_used(&mut q, 0, vq.size, 0).unwrap_err();
        assert!(matches!(e, Malformed::Queue(0, _)), "{e}");
    }

    #[test]
    fn with_event_idx_the_guest_is_interrupted_once_the_used_index_passes_used_event() {
        let (ctx, rec, vq, mut q) = rig();
        q.set_event_idx(true);
        let interrupts = || rec.0.lock().unwrap().len();
        // The driver's used_event: the word after the available ring.
        let event_at = GuestAddress(vq.avail + 4 + 2 * u64::from(vq.size));
        let set_event = |e: u16| ctx.mem.write_obj(e.to_le(), event_at).unwrap();
        let put = |q: &mut Queue, n: u16| {
            for _ in 0..n {
                ctx.put_used(q, 0, 0, 1).unwrap();
            }
            ctx.publish_used(q, 0).unwrap();
        };
        let mut since = q.next_used();
        set_event(2);
        ctx.signal_since(&q, 0, &mut since);
        assert_eq!(interrupts(), 0, "nothing returned");
        put(&mut q, 2);
        ctx.signal_since(&q, 0, &mut since);
        assert_eq!(interrupts(), 0, "used index 2 has not passed used_event 2");
        put(&mut q, 1);
        ctx.signal_since(&q, 0, &mut since);
        assert_eq!(interrupts(), 1, "used index 3 passed it");
        put(&mut q, 5);
        ctx.signal_since(&q, 0, &mut since);
        assert_eq!(interrupts(), 1, "passed before the previous interrupt");
        // The driver asks again, for an index already passed while it was not looking, then
        // for one within the next batch; the batch's whole range counts.
        set_event(9);
        put(&mut q, 4);
        ctx.signal_since(&q, 0, &mut since);
        assert_eq!(interrupts(), 2, "9 lies in 8..12");
        // Across the index's wrap at 65,536.
        q.set_next_used(u16::MAX - 1);
        since = q.next_used();
        set_event(u16::MAX);
        put(&mut q, 2);
        assert_eq!(q.next_used(), 0);
        ctx.signal_since(&q, 0, &mut since);
        assert_eq!(interrupts(), 3, "65,535 lies in 65,534..0");
        // Without EVENT_IDX the driver's flag decides, and used_event means nothing.
        q.set_event_idx(false);
        ctx.mem
            .write_obj(
                (VRING_AVAIL_F_NO_INTERRUPT as u16).to_le(),
                GuestAddress(vq.avail),
            )
            .unwrap();
        put(&mut q, 1);
        ctx.signal_since(&q, 0, &mut since);
        assert_eq!(interrupts(), 3, "the driver said no interrupts");
        ctx.mem.write_obj(0u16, GuestAddress(vq.avail)).unwrap();
        put(&mut q, 1);
        ctx.signal_since(&q, 0, &mut since);
        assert_eq!(interrupts(), 4);
    }

    #[test]
    fn malformed_chains() {
        type Setup = fn(&GuestMemoryMmap, &mut VirtQueue);
        type Check = fn(&Malformed) -> bool;
        let cases: [(&str, Setup, Check); 7] = [
            (
                "loop",
                |m, q| {
                    q.set_desc(m, 0, BUFS, 1, NEXT, 1);
                    q.set_desc(m, 1, BUFS, 1, NEXT, 0);
                    q.publish(m, 0);
                },
                |e| matches!(e, Malformed::Truncated(0)),
            ),
            (
                "next outside table",
                |m, q| {
                    q.set_desc(m, 2, BUFS, 1, NEXT, QSIZE);
                    q.publish(m, 2);
                },
                |e| matches!(e, Malformed::Truncated(2)),
            ),
            (
                "head outside table",
                |m, q| q.publish(m, QSIZE),
                |e| matches!(e, Malformed::Truncated(_)),
            ),
            (
                "order",
                |m, q| {
                    q.add_chain(m, &[(BUFS, 1, true), (BUFS, 1, false)]);
                },
                |e| matches!(e, Malformed::Order(0)),
            ),
            (
                "range",
                |m, q| {
                    q.add_chain(m, &[(MEM_SIZE - 1, 2, true)]);
                },
                |e| matches!(e, Malformed::OutOfRange { .. }),
            ),
            (
                "too long",
                |m, q| {
                    q.add_chain(m, &[(0, MAX_CHAIN_BYTES as u32, false), (0, 1, false)]);
                },
                |e| matches!(e, Malformed::TooLong(0, _)),
            ),
            (
                "avail index",
                |m, q| q.set_avail_idx(m, QSIZE + 1),
                |e| {
                    matches!(
                        e,
                        Malformed::Queue(0, virtio_queue::Error::InvalidAvailRingIndex)
                    )
                },
            ),
        ];
        for (what, setup, check) in cases {
            let (mut ctx, rec, mut vq, mut q) = rig();
            setup(&ctx.mem, &mut vq);
            let e = ctx.pop(&mut q, 0).unwrap_err();
            assert!(check(&e), "{what}: {e}");
            assert!(!ctx.fail(e));
            assert!(ctx.broken.load(Ordering::SeqCst));
            assert_eq!(*rec.0.lock().unwrap(), vec![InterruptKind::Config]);
        }
    }

    struct Echo {
        evt: EventFd,
        seen: Arc<Mutex<Vec<usize>>>,
    }
    impl Handler for Echo {
        fn fds(&self) -> Vec<RawFd> {
            vec![self.evt.as_raw_fd()]
        }
        fn handle(&mut self, token: usize) -> bool {
            drain(&self.evt);
            self.seen.lock().unwrap().push(token);
            self.seen.lock().unwrap().len() < 2
        }
    }

    #[test]
    fn worker_stops_on_kill_or_when_the_handler_says_so() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let handler = Echo {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        };
        let w = Worker::spawn(Device::Rng, "test", handler).unwrap();
        evt.write(1).unwrap();
        assert!(wait_for(|| seen.lock().unwrap().len() == 1));
        assert!(w.stop().is_some());

        let handler = Echo {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        };
        let w = Worker::spawn(Device::Rng, "test", handler).unwrap();
        evt.write(1).unwrap();
        assert!(wait_for(|| seen.lock().unwrap().len() == 2));
        // The handler stopped the thread; stopping it again returns at once.
        assert!(w.stop().is_some());
    }

    #[test]
    fn a_paused_worker_handles_nothing_until_resumed() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let handler = Echo {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        };
        let w = Worker::spawn(Device::Rng, "test", handler).unwrap();
        assert!(w.pause(far()));
        evt.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(seen.lock().unwrap().is_empty(), "handled while paused");
        w.resume();
        assert!(wait_for(|| seen.lock().unwrap().len() == 1));
        // Stopping a paused worker works too.
        assert!(w.pause(far()));
        assert!(w.stop().is_some());
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// A handler whose in-flight work hangs until the test lets it finish.
    struct Stuck {
        evt: EventFd,
        release: Arc<(Mutex<bool>, Condvar)>,
        seen: Arc<Mutex<Vec<usize>>>,
    }
    impl Handler for Stuck {
        fn fds(&self) -> Vec<RawFd> {
            vec![self.evt.as_raw_fd()]
        }
        fn quiesce(&mut self) {
            let (m, cv) = &*self.release;
            let mut go = m.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
        }
        fn handle(&mut self, token: usize) -> bool {
            drain(&self.evt);
            self.seen.lock().unwrap().push(token);
            true
        }
    }

    #[test]
    fn a_worker_whose_io_hangs_fails_to_pause_by_the_deadline_and_resumes() {
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let handler = Stuck {
            evt: evt.try_clone().unwrap(),
            release: release.clone(),
            seen: seen.clone(),
        };
        let w = Arc::new(Worker::spawn(Device::Rng, "test", handler).unwrap());
        // The pause gives up at its deadline (the caller's thread is not held hostage).
        let w2 = w.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let ok = w2.pause(Instant::now() + Duration::from_millis(200));
            let _ = tx.send((ok, t0.elapsed()));
        });
        let (ok, took) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("Worker::pause waited past its deadline");
        assert!(!ok, "a worker stuck in its I/O reported paused");
        assert!(took >= Duration::from_millis(200), "{took:?}");
        // Resumed meanwhile: once its I/O finishes the worker runs on instead of parking.
        w.resume();
        {
            let (m, cv) = &*release;
            *m.lock().unwrap() = true;
            cv.notify_all();
        }
        evt.write(1).unwrap();
        assert!(wait_for(|| seen.lock().unwrap().len() == 1));
        // And a later pause works.
        assert!(w.pause(far()));
        assert!(pause_all([&*w], far()));
    }
}
