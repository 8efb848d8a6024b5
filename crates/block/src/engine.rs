//! The I/O engine a virtio-blk queue runs its requests through.
//!
//! - **io_uring** (where the host has it and allows it): reads, writes and flushes are queued
//!   as SQEs pointing straight at guest memory and submitted in one `io_uring_enter` per batch;
//!   completions are signalled on an eventfd the device's worker polls. A raw image's request
//!   is one SQE at its own offset. A qcow2 image's request is first mapped to host extents
//!   ([`Qcow2Disk::map`](crate::Qcow2Disk::map)): one SQE per extent of data, ranges that read
//!   as zeroes filled at once. What does not map (writes that allocate, compressed clusters)
//!   and qcow2 flushes (imago's metadata first) run synchronously through imago.
//! - **sync** (hosts without io_uring, or when asked): each request runs at once on the
//!   worker's thread.
//!
//! Either way the vCPU threads never wait for the disk: they only kick the worker's ioeventfd.
//! Discard and write-zeroes run synchronously on both engines ([`Engine::zero_range`]).
//!
//! An io_uring engine never has more SQEs in flight than its completion queue holds: a
//! submission that would exceed that first takes completions off the ring (waiting for one if
//! none is there), so the kernel never holds back completions and a full ring cannot make the
//! worker spin.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring, Probe};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::iov::{self, IoSlice};
use crate::{BlockError, Disk, Extent};

/// Which engine runs the requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// Asynchronous, through io_uring.
    IoUring,
    /// Synchronous system calls on the worker thread.
    Sync,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::Sync => "sync",
        })
    }
}

/// An I/O operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Read into the buffers.
    Read,
    /// Write from the buffers.
    Write,
    /// Make completed writes durable.
    Flush,
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// What the submitter passed in.
    pub user_data: u64,
    /// The outcome.
    pub result: Result<(), BlockError>,
}

/// Entries in a vector whose places are reused once taken out.
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }

    fn insert(&mut self, item: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.items[i] = Some(item);
                i
            }
            None => {
                self.items.push(Some(item));
                self.items.len() - 1
            }
        }
    }

    fn get(&self, i: usize) -> Option<&T> {
        self.items.get(i).and_then(Option::as_ref)
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i).and_then(Option::as_mut)
    }

    fn take(&mut self, i: usize) -> Option<T> {
        let item = self.items.get_mut(i)?.take()?;
        self.free.push(i);
        Some(item)
    }
}

/// One SQE in flight: its request, the iovec array the kernel reads and the expected byte
/// count.
struct Part {
    req: usize,
    iov: Vec<IoSlice>,
    len: u64,
}

/// A request in flight: the caller's tag, its SQEs still running, its outcome so far, and
/// whether its qcow2 disk counts it as mapped.
struct Request {
    user_data: u64,
    left: usize,
    result: Result<(), BlockError>,
    mapped: bool,
}

struct Uring {
    ring: IoUring,
    evt: EventFd,
    /// SQEs queued or running and not yet collected, by the tag the kernel hands back.
    parts: Slab<Part>,
    reqs: Slab<Request>,
    /// Entries of `parts` in use.
    busy: usize,
    /// Most SQEs in flight at once: the completion queue's size.
    cq_cap: usize,
    unsubmitted: usize,
}

/// Ends a request the disk counted as mapped.
fn unmap(disk: &Disk) {
    if let Disk::Qcow2(q) = disk {
        q.unmap();
    }
}

impl Uring {
    /// Moves the completions the kernel has posted onto their requests, and the requests they
    /// finish into `done`; returns how many SQEs completed.
    fn collect(&mut self, done: &mut VecDeque<Completion>, disk: &Disk) -> usize {
        let mut n = 0;
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(part) = self.parts.take(slot) else {
                tracing::error!("io_uring completion for unknown slot {slot}");
                continue;
            };
            self.busy -= 1;
            n += 1;
            let res = cqe.result();
            let outcome = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if res as u64 != part.len {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {res} of {} bytes", part.len),
                ))
            } else {
                Ok(())
            };
            let Some(req) = self.reqs.get_mut(part.req) else {
                tracing::error!("io_uring completion for unknown request {}", part.req);
                continue;
            };
            if let (Err(err), Ok(())) = (outcome, &req.result) {
                req.result = Err(BlockError::Io {
                    path: disk.path().to_path_buf(),
                    err,
                });
            }
            req.left -= 1;
            if req.left == 0 {
                let req = self.reqs.take(part.req).expect("the request is there");
                if req.mapped {
                    unmap(disk);
                }
                done.push_back(Completion {
                    user_data: req.user_data,
                    result: req.result,
                });
            }
        }
        n
    }

    /// Submits what is queued and returns once at least one SQE has completed (collected
    /// into `done`) or none is in flight. Never returns with nothing collected while SQEs are
    /// in flight, whatever the kernel answers: callers rely on it to free ring space and to
    /// know when guest buffers are no longer used.
    fn wait(&mut self, done: &mut VecDeque<Completion>, disk: &Disk) {
        loop {
            if self.collect(done, disk) > 0 || self.busy == 0 {
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.unsubmitted = 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EAGAIN/EBUSY: the kernel is short of resources. Wait for the ring to
                    // have completions (or a while) rather than spin, and retry.
                    ratelimit::warn_limited!("io_uring wait: {e}");
                    let mut pfd = libc::pollfd {
                        fd: self.ring.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: `pfd` is one valid pollfd that outlives the call.
                    unsafe { libc::poll(&mut pfd, 1, 10) };
                }
            }
        }
    }

    /// Queues one SQE of request `req`: `op` on `fd` at `offset`, from or into `iov`.
    fn push(
        &mut self,
        done: &mut VecDeque<Completion>,
        disk: &Disk,
        (op, fd, offset): (IoOp, RawFd, u64),
        iov: Vec<IoSlice>,
        req: usize,
    ) {
        let len = if op == IoOp::Flush {
            0
        } else {
            iov::total(&iov)
        };
        let slot = self.parts.insert(Part { req, iov, len });
        let iov = &self.parts.get(slot).expect("just inserted").iov;
        let fd = types::Fd(fd);
        let entry = match op {
            IoOp::Read => opcode::Readv::new(fd, IoSlice::as_iovecs(iov), iov.len() as u32)
                .offset(offset)
                .build(),
            IoOp::Write => opcode::Writev::new(fd, IoSlice::as_iovecs(iov), iov.len() as u32)
                .offset(offset)
                .build(),
            IoOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(slot as u64);
        loop {
            // SAFETY: the SQE points at the iovec array held in `parts` (its heap buffer stays
            // put) until the completion is collected; the submitter keeps the buffers it lists
            // valid as long.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            match pushed {
                Ok(()) => break,
                // Submission queue full: hand it to the kernel and retry; if the kernel cannot
                // take it now, take completions off the ring (waiting for one) first.
                Err(_) => match self.ring.submit() {
                    Ok(_) => self.unsubmitted = 0,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => self.wait(done, disk),
                },
            }
        }
        self.busy += 1;
        self.unsubmitted += 1;
    }
}

/// One queue's engine.
pub struct Engine {
    disk: Arc<Disk>,
    uring: Option<Uring>,
    done: VecDeque<Completion>,
    /// Scratch space for a request's extents.
    extents: Vec<Extent>,
}

/// Whether io_uring can run readv, writev and fsync here (not disabled by sysctl or seccomp).
fn uring_usable(ring: &IoUring) -> bool {
    let mut probe = Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err() {
        return false;
    }
    [
        opcode::Readv::CODE,
        opcode::Writev::CODE,
        opcode::Fsync::CODE,
    ]
    .iter()
    .all(|&c| probe.is_supported(c))
}

impl Engine {
    /// An engine for `disk` sized for `depth` requests in flight (the caller's bound; the
    /// io_uring engine itself never has more SQEs in flight than its completion queue, twice
    /// the submission queue, holds: beyond that a submission waits for completions). io_uring
    /// is used when `prefer` asks for it and the host supports it; otherwise requests run
    /// synchronously.
    pub fn new(disk: Arc<Disk>, depth: u32, prefer: EngineKind) -> Self {
        let uring = match prefer {
            EngineKind::IoUring => Self::uring(depth)
                .map_err(|e| tracing::info!("io_uring unavailable ({e}); using synchronous I/O"))
                .ok(),
            EngineKind::Sync => None,
        };
        Engine {
            disk,
            uring,
            done: VecDeque::new(),
            extents: Vec::new(),
        }
    }

    fn uring(depth: u32) -> io::Result<Uring> {
        let mut ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(depth.next_power_of_two().max(8))
            .or_else(|_| IoUring::new(depth.next_power_of_two().max(8)))?;
        if !uring_usable(&ring) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "readv, writev or fsync not supported",
            ));
        }
        let evt = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(evt.as_raw_fd())?;
        let cq_cap = ring.completion().capacity();
        Ok(Uring {
            ring,
            evt,
            parts: Slab::new(),
            reqs: Slab::new(),
            busy: 0,
            cq_cap,
            unsubmitted: 0,
        })
    }

    /// The engine in use.
    pub fn kind(&self) -> EngineKind {
        if self.uring.is_some() {
            EngineKind::IoUring
        } else {
            EngineKind::Sync
        }
    }

    /// The eventfd signalled when asynchronous requests complete (io_uring only).
    pub fn event_fd(&self) -> Option<RawFd> {
        self.uring.as_ref().map(|u| u.evt.as_raw_fd())
    }

    /// The disk.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// SQEs submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.uring.as_ref().map_or(0, |u| u.busy)
    }

    /// Whether the disk bypasses the host page cache.
    fn direct(&self) -> bool {
        match &*self.disk {
            Disk::Raw(r) => r.direct(),
            Disk::Qcow2(q) => q.direct(),
        }
    }

    /// Where `op` on `iov` at `offset` goes on the ring: its extents into `out`, and whether
    /// the disk counted it as mapped (a qcow2 request). None: it runs synchronously.
    fn plan(&self, op: IoOp, iov: &[IoSlice], offset: u64, out: &mut Vec<Extent>) -> Option<bool> {
        let u = self.uring.as_ref()?;
        out.clear();
        let len = iov::total(iov);
        if self.direct() && op != IoOp::Flush && !iov::aligned(iov, offset) {
            return None;
        }
        match &*self.disk {
            Disk::Raw(r) => {
                out.push(Extent::Data {
                    fd: r.fd(),
                    offset,
                    len,
                });
                Some(false)
            }
            Disk::Qcow2(_) if op == IoOp::Flush => None,
            Disk::Qcow2(q) => {
                if !q.map(offset, len, op == IoOp::Write, u.cq_cap, out) {
                    return None;
                }
                // Clusters smaller than the O_DIRECT alignment can split a request unaligned.
                let a = iov::DIRECT_ALIGN as u64;
                let misaligned = out.iter().any(|e| match *e {
                    Extent::Data { offset, len, .. } => offset % a != 0 || len % a != 0,
                    Extent::Zero { len } => len % a != 0,
                });
                if self.direct() && misaligned {
                    q.unmap();
                    return None;
                }
                Some(true)
            }
        }
    }

    /// Starts `op` on `iov` at `offset`; its [`Completion`] comes from [`reap`](Self::reap).
    ///
    /// # Safety
    /// Every buffer of `iov` must stay valid (writable for reads, readable for writes) until the
    /// request's completion has been reaped, or the engine dropped.
    pub unsafe fn submit(&mut self, op: IoOp, iov: Vec<IoSlice>, offset: u64, user_data: u64) {
        let len = iov::total(&iov);
        let checked = match op {
            IoOp::Read => crate::check_range(self.disk.path(), offset, len, self.disk.size()),
            IoOp::Write if self.disk.read_only() => {
                Err(BlockError::ReadOnly(self.disk.path().to_path_buf()))
            }
            IoOp::Write => crate::check_range(self.disk.path(), offset, len, self.disk.size()),
            IoOp::Flush => Ok(()),
        };
        let mut extents = std::mem::take(&mut self.extents);
        match checked.map(|()| self.plan(op, &iov, offset, &mut extents)) {
            Err(e) => self.done.push_back(Completion {
                user_data,
                result: Err(e),
            }),
            Ok(None) => {
                // SAFETY: forwarded from the caller; the buffers are used before this returns.
                let result = unsafe {
                    match op {
                        IoOp::Read => self.disk.readv(&iov, offset),
                        IoOp::Write => self.disk.writev(&iov, offset),
                        IoOp::Flush => self.disk.flush(),
                    }
                };
                self.done.push_back(Completion { user_data, result });
            }
            // SAFETY: forwarded from the caller.
            Ok(Some(mapped)) => unsafe {
                self.submit_extents(op, iov, &extents, user_data, mapped)
            },
        }
        self.extents = extents;
    }

    /// Queues a request planned onto the ring, one SQE per data extent; zero extents are
    /// filled here. Buffered reads the page cache can serve at once are done right here: one
    /// `preadv2(RWF_NOWAIT)` costs less than a trip through io_uring (whose buffered reads may
    /// be handed to a kernel worker).
    ///
    /// # Safety
    /// As for [`submit`](Self::submit).
    unsafe fn submit_extents(
        &mut self,
        op: IoOp,
        mut iov: Vec<IoSlice>,
        extents: &[Extent],
        user_data: u64,
        mapped: bool,
    ) {
        let finish_now = |engine: &mut Self| {
            if mapped {
                unmap(&engine.disk);
            }
            engine.done.push_back(Completion {
                user_data,
                result: Ok(()),
            });
        };
        if let (IoOp::Read, false, [Extent::Data { fd, offset, len }]) =
            (op, self.direct(), extents)
        {
            if *len > 0 && Self::read_cached(*fd, &iov, *offset, *len) {
                return finish_now(self);
            }
        }
        let data = extents
            .iter()
            .filter(|e| matches!(e, Extent::Data { .. }))
            .count();
        if data == 0 {
            // SAFETY: the caller vouched for `iov` being writable (only reads map to zeroes).
            unsafe { iov::zero(&iov) };
            return finish_now(self);
        }
        let u = self.uring.as_mut().expect("planned onto the ring");
        // Room for the completions first (see the module documentation).
        while u.busy + data > u.cq_cap {
            u.wait(&mut self.done, &self.disk);
        }
        let req = u.reqs.insert(Request {
            user_data,
            left: data,
            result: Ok(()),
            mapped,
        });
        for (i, e) in extents.iter().enumerate() {
            let piece = if i + 1 == extents.len() {
                std::mem::take(&mut iov)
            } else {
                iov::split_front(&mut iov, e.len())
            };
            match *e {
                // SAFETY: as above.
                Extent::Zero { .. } => unsafe { iov::zero(&piece) },
                Extent::Data { fd, offset, .. } => {
                    u.push(&mut self.done, &self.disk, (op, fd, offset), piece, req)
                }
            }
        }
    }

    /// Reads `len` bytes at `offset` into `iov` if the page cache holds all of them (no
    /// waiting); false when that was not possible (the request then goes to io_uring, which
    /// reads it all again).
    fn read_cached(fd: RawFd, iov: &[IoSlice], offset: u64, len: u64) -> bool {
        let cnt = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the caller of `submit` vouched for `iov` being writable guest memory; the
        // kernel writes at most the iovecs' lengths.
        let r = unsafe {
            libc::preadv2(
                fd,
                IoSlice::as_iovecs(iov),
                cnt,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        r >= 0 && r as u64 == len
    }

    /// Discards (`discard`) or zeroes a range, synchronously. This engine's own requests in
    /// flight finish first: a qcow2 image waits for every mapped request before it frees
    /// clusters, this engine's included.
    pub fn zero_range(&mut self, discard: bool, offset: u64, len: u64) -> Result<(), BlockError> {
        if matches!(&*self.disk, Disk::Qcow2(_)) {
            self.settle();
        }
        if discard {
            self.disk.discard(offset, len)
        } else {
            self.disk.write_zeroes(offset, len)
        }
    }

    /// Hands queued requests to the kernel.
    pub fn commit(&mut self) {
        if let Some(u) = self.uring.as_mut().filter(|u| u.unsubmitted > 0) {
            loop {
                match u.ring.submit() {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EAGAIN/EBUSY: the kernel is short of resources; completions will
                        // free some and the next commit retries.
                        tracing::debug!("io_uring submit: {e}");
                        return;
                    }
                }
            }
            u.unsubmitted = 0;
        }
    }

    /// Moves finished requests into `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        if let Some(u) = self.uring.as_mut() {
            // Drain the eventfd first so a completion arriving after this pass signals again.
            let _ = u.evt.read();
            u.collect(&mut self.done, &self.disk);
        }
        out.extend(self.done.drain(..));
    }

    /// Waits until every submitted request has completed; their completions wait for
    /// [`reap`](Self::reap).
    fn settle(&mut self) {
        self.commit();
        if let Some(u) = self.uring.as_mut() {
            while u.busy > 0 {
                u.wait(&mut self.done, &self.disk);
            }
        }
    }

    /// Waits until every submitted request has completed (their buffers are then free).
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        self.settle();
        self.reap(out);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The kernel may still write into buffers of in-flight requests; wait for them.
        let mut sink = Vec::new();
        self.drain(&mut sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DiskOptions;

    fn disk(name: &str, direct: bool) -> (Arc<Disk>, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("tern-engine-{}-{name}", std::process::id()));
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let opts = DiskOptions {
            path: p.clone(),
            format: None,
            read_only: false,
            direct,
            ..DiskOptions::default()
        };
        (Arc::new(Disk::open(&opts).unwrap().0), p)
    }

    #[test]
    fn io_uring_is_used_where_the_host_allows_it() {
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|s| s.trim() != "0")
            .unwrap_or(false);
        let (d, p) = disk("kind", false);
        let e = Engine::new(d.clone(), 64, EngineKind::IoUring);
        if disabled {
            eprintln!("SKIP: io_uring is disabled on this host; checking the fallback only");
            assert_eq!(e.kind(), EngineKind::Sync);
        } else {
            assert_eq!(e.kind(), EngineKind::IoUring);
            assert!(e.event_fd().is_some());
        }
        assert_eq!(
            Engine::new(d, 64, EngineKind::Sync).kind(),
            EngineKind::Sync
        );
        std::fs::remove_file(p).ok();
    }

    /// `n` aligned 4 KiB buffers, buffer `i` filled with the byte `i`.
    fn numbered_pages(n: usize) -> Vec<crate::iov::AlignedBuf> {
        (0..n)
            .map(|i| {
                let mut b = crate::iov::AlignedBuf::new(4096).unwrap();
                b.as_mut_slice().fill(i as u8);
                b
            })
            .collect()
    }

    fn many_requests(kind: EngineKind, direct: bool) {
        let (d, p) = disk(&format!("many-{kind}-{direct}"), direct);
        let mut e = Engine::new(d, 64, kind);
        let mut bufs = numbered_pages(48);
        for (i, b) in bufs.iter().enumerate() {
            let iov = vec![IoSlice::from_ref(b.as_slice())];
            // SAFETY: `bufs` outlives the drain below.
            unsafe { e.submit(IoOp::Write, iov, i as u64 * 4096, i as u64) };
        }
        // SAFETY: no buffers.
        unsafe { e.submit(IoOp::Flush, Vec::new(), 0, 99) };
        // Past the end: fails without reaching the kernel.
        let mut tail = crate::iov::AlignedBuf::new(4096).unwrap();
        let iov = vec![IoSlice::from_mut(tail.as_mut_slice())];
        // SAFETY: `tail` outlives the drain below.
        unsafe { e.submit(IoOp::Read, iov, 1 << 20, 100) };
        let mut done = Vec::new();
        e.drain(&mut done);
        assert_eq!(done.len(), 50);
        for c in &done {
            assert_eq!(c.result.is_ok(), c.user_data != 100, "{c:?}");
        }
        for b in &mut bufs {
            b.as_mut_slice().fill(0xee);
        }
        for (i, b) in bufs.iter_mut().enumerate() {
            let iov = vec![IoSlice::from_mut(b.as_mut_slice())];
            // SAFETY: `bufs` outlives the drain below.
            unsafe { e.submit(IoOp::Read, iov, i as u64 * 4096, i as u64) };
        }
        done.clear();
        e.drain(&mut done);
        assert!(done.iter().all(|c| c.result.is_ok()));
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&x| x == i as u8), "block {i}");
        }
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn many_requests_in_flight() {
        many_requests(EngineKind::IoUring, false);
        many_requests(EngineKind::IoUring, true);
        many_requests(EngineKind::Sync, false);
    }

    #[test]
    fn a_small_ring_with_many_requests_in_flight() {
        let (d, p) = disk("small-ring", false);
        // An 8-entry submission queue (16 completions), 200 requests, nothing reaped meanwhile.
        let mut e = Engine::new(d, 8, EngineKind::IoUring);
        let Some(cap) = e.uring.as_ref().map(|u| u.cq_cap) else {
            eprintln!("SKIP: io_uring is not usable on this host");
            std::fs::remove_file(p).ok();
            return;
        };
        assert!(cap <= 16, "completion queue of {cap}");
        let bufs = numbered_pages(200);
        for (i, b) in bufs.iter().enumerate() {
            let iov = vec![IoSlice::from_ref(b.as_slice())];
            // SAFETY: `bufs` outlives the drain below.
            unsafe { e.submit(IoOp::Write, iov, (i as u64 % 256) * 4096, i as u64) };
            assert!(e.in_flight() <= cap, "{} in flight", e.in_flight());
        }
        let mut done = Vec::new();
        e.drain(&mut done);
        assert_eq!(e.in_flight(), 0);
        assert_eq!(done.len(), 200);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        let mut ids: Vec<u64> = done.iter().map(|c| c.user_data).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..200).collect::<Vec<_>>());
        std::fs::remove_file(p).ok();
    }
}
