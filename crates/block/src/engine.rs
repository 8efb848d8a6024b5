//! The I/O engine a virtio-blk queue runs its requests through.
//!
//! - **io_uring** (raw images, where the host has it and allows it): reads, writes and flushes
//!   are queued as SQEs pointing straight at guest memory and submitted in one `io_uring_enter`
//!   per batch; completions are signalled on an eventfd the device's worker polls.
//! - **sync** (qcow2 images, hosts without io_uring, or when asked): each request runs at once on
//!   the worker's thread.
//!
//! Either way the vCPU threads never wait for the disk: they only kick the worker's ioeventfd.
//! Discard and write-zeroes are `fallocate` calls and run synchronously on both engines.
//!
//! An io_uring engine never has more requests in flight than its completion queue holds: a
//! submission that would exceed that first takes completions off the ring (waiting for one if
//! none is there), so the kernel never holds back completions and a full ring cannot make the
//! worker spin.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring, Probe};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::iov::{self, IoSlice};
use crate::{BlockError, Disk};

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

struct Uring {
    ring: IoUring,
    evt: EventFd,
    fd: RawFd,
    /// In-flight requests by slot: the caller's tag, the iovec array the kernel reads and the
    /// expected byte count.
    slots: Vec<Option<(u64, Vec<IoSlice>, u64)>>,
    free: Vec<usize>,
    /// Occupied entries of `slots`: requests queued or running and not yet collected.
    busy: usize,
    /// Most requests in flight at once: the completion queue's size.
    cq_cap: usize,
    unsubmitted: usize,
}

impl Uring {
    /// Moves the completions the kernel has posted into `done`, freeing their slots; returns
    /// how many there were.
    fn collect(&mut self, done: &mut VecDeque<Completion>, path: &Path) -> usize {
        let mut n = 0;
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some((user_data, _iov, len)) = self.slots.get_mut(slot).and_then(Option::take)
            else {
                tracing::error!("io_uring completion for unknown slot {slot}");
                continue;
            };
            self.free.push(slot);
            self.busy -= 1;
            n += 1;
            let res = cqe.result();
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if res as u64 != len {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {res} of {len} bytes"),
                ))
            } else {
                Ok(())
            }
            .map_err(|err| BlockError::Io {
                path: path.to_path_buf(),
                err,
            });
            done.push_back(Completion { user_data, result });
        }
        n
    }

    /// Submits what is queued and returns once at least one request has completed (moved
    /// into `done`) or none is in flight. Never returns with nothing collected while requests
    /// are in flight, whatever the kernel answers: callers rely on it to free ring space and
    /// to know when guest buffers are no longer used.
    fn wait(&mut self, done: &mut VecDeque<Completion>, path: &Path) {
        loop {
            if self.collect(done, path) > 0 || self.busy == 0 {
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
}

/// One queue's engine.
pub struct Engine {
    disk: Arc<Disk>,
    uring: Option<Uring>,
    done: VecDeque<Completion>,
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
    /// io_uring engine itself never has more in flight than its completion queue, twice the
    /// submission queue, holds: beyond that a submission waits for completions). io_uring is
    /// used when `prefer` asks for it, the image is raw and the host supports it; otherwise
    /// requests run synchronously.
    pub fn new(disk: Arc<Disk>, depth: u32, prefer: EngineKind) -> Self {
        let uring = match (&*disk, prefer) {
            (Disk::Raw(raw), EngineKind::IoUring) => Self::uring(raw.fd(), depth)
                .map_err(|e| tracing::info!("io_uring unavailable ({e}); using synchronous I/O"))
                .ok(),
            _ => None,
        };
        Engine {
            disk,
            uring,
            done: VecDeque::new(),
        }
    }

    fn uring(fd: RawFd, depth: u32) -> io::Result<Uring> {
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
            fd,
            slots: Vec::new(),
            free: Vec::new(),
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

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.uring.as_ref().map_or(0, |u| u.busy)
    }

    /// Starts `op` on `iov` at `offset`; its [`Completion`] comes from [`reap`](Self::reap).
    ///
    /// # Safety
    /// Every buffer of `iov` must stay valid (writable for reads, readable for writes) until the
    /// request's completion has been reaped, or the engine dropped.
    pub unsafe fn submit(&mut self, op: IoOp, iov: Vec<IoSlice>, offset: u64, user_data: u64) {
        let len = iov::total(&iov);
        let direct_bounce = match &*self.disk {
            Disk::Raw(r) => r.direct() && op != IoOp::Flush && !iov::aligned(&iov, offset),
            Disk::Qcow2(_) => true,
        };
        let checked = match op {
            IoOp::Read => crate::check_range(self.disk.path(), offset, len, self.disk.size()),
            IoOp::Write if self.disk.read_only() => {
                Err(BlockError::ReadOnly(self.disk.path().to_path_buf()))
            }
            IoOp::Write => crate::check_range(self.disk.path(), offset, len, self.disk.size()),
            IoOp::Flush => Ok(()),
        };
        // Buffered reads the page cache can serve at once are done right here: one
        // `preadv2(RWF_NOWAIT)` costs less than a trip through io_uring (whose buffered reads
        // may be handed to a kernel worker). Anything else goes to the ring.
        if let (Some(u), IoOp::Read, Ok(()), false) = (&self.uring, op, &checked, direct_bounce) {
            if !self.disk_direct() && len > 0 && Self::read_cached(u.fd, &iov, offset, len) {
                self.done.push_back(Completion {
                    user_data,
                    result: Ok(()),
                });
                return;
            }
        }
        let Some(u) = self
            .uring
            .as_mut()
            .filter(|_| !direct_bounce && checked.is_ok())
        else {
            // SAFETY: forwarded from the caller; the buffers are used before this returns.
            let result = checked.and_then(|()| unsafe {
                match op {
                    IoOp::Read => self.disk.readv(&iov, offset),
                    IoOp::Write => self.disk.writev(&iov, offset),
                    IoOp::Flush => self.disk.flush(),
                }
            });
            self.done.push_back(Completion { user_data, result });
            return;
        };
        let path = self.disk.path();
        // Room for the completion first (see the module documentation).
        while u.busy >= u.cq_cap {
            u.wait(&mut self.done, path);
        }
        let slot = u.free.pop().unwrap_or_else(|| {
            u.slots.push(None);
            u.slots.len() - 1
        });
        let fd = types::Fd(u.fd);
        let entry = match op {
            IoOp::Read => opcode::Readv::new(fd, IoSlice::as_iovecs(&iov), iov.len() as u32)
                .offset(offset)
                .build(),
            IoOp::Write => opcode::Writev::new(fd, IoSlice::as_iovecs(&iov), iov.len() as u32)
                .offset(offset)
                .build(),
            IoOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(slot as u64);
        loop {
            // SAFETY: the SQE points at `iov`'s heap buffer, which moves into `slots` right
            // after this push (the buffer itself stays put) and stays there until the
            // completion is collected; the caller keeps the buffers it lists valid as long.
            let pushed = unsafe { u.ring.submission().push(&entry) };
            match pushed {
                Ok(()) => break,
                // Submission queue full: hand it to the kernel and retry; if the kernel cannot
                // take it now, take completions off the ring (waiting for one) first.
                Err(_) => match u.ring.submit() {
                    Ok(_) => u.unsubmitted = 0,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => u.wait(&mut self.done, path),
                },
            }
        }
        u.slots[slot] = Some((user_data, iov, if op == IoOp::Flush { 0 } else { len }));
        u.busy += 1;
        u.unsubmitted += 1;
    }

    fn disk_direct(&self) -> bool {
        matches!(&*self.disk, Disk::Raw(r) if r.direct())
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
            u.collect(&mut self.done, self.disk.path());
        }
        out.extend(self.done.drain(..));
    }

    /// Waits until every submitted request has completed (their buffers are then free).
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        self.commit();
        if let Some(u) = self.uring.as_mut() {
            while u.busy > 0 {
                u.wait(&mut self.done, self.disk.path());
            }
        }
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
