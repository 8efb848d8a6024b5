//! PCI INTx through KVM: each line a resampling irqfd, and one thread that raises a line
//! again when the guest acknowledges it while its function still has an interrupt pending.
//! Lines come and go with their functions (hotplug).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lifecycle::event_loop::EventLoop;
use virtio::transport::pci::IntxLine;
use vmm_sys_util::eventfd::EventFd;

use crate::error::{setup, VmmError};
use crate::sync::lock;

/// INTx through a KVM irqfd in resample mode.
pub(crate) struct KvmIntx {
    pub(crate) irqfd: EventFd,
}

impl IntxLine for KvmIntx {
    fn assert(&self) -> std::io::Result<()> {
        self.irqfd.write(1)
    }
}

/// A function's INTA# as the resampler serves it: the resample eventfd KVM signals on EOI,
/// the line, and whether the function's interrupt is still pending.
pub(crate) struct IntxParts {
    pub(crate) resample: EventFd,
    pub(crate) line: Arc<KvmIntx>,
    pub(crate) pending: Pending,
}

pub(crate) type Pending = Arc<dyn Fn() -> bool + Send + Sync>;

type Lines = Arc<Mutex<BTreeMap<u64, Arc<IntxParts>>>>;

/// Tokens of the resampler's own events (lines have small ones).
const STOP: u64 = u64::MAX;
const CHANGED: u64 = u64::MAX - 1;

/// Re-raises level-triggered INTx lines that are still pending when the guest acknowledges
/// them (KVM signals the resample eventfd on EOI). One thread for all PCI functions, whose
/// lines come and go with them (hotplug); stopped and joined on drop.
pub struct IntxResampler {
    stop: EventFd,
    changed: EventFd,
    lines: Lines,
    next: AtomicU64,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IntxResampler {
    /// The resampler, serving no line yet.
    pub(crate) fn start() -> Result<Self, VmmError> {
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup(format!("eventfd: {e}")));
        let (stop, changed) = (evt()?, evt()?);
        let epoll_err = |e: std::io::Error| setup(format!("epoll: {e}"));
        let mut events = EventLoop::new().map_err(epoll_err)?;
        events.add(stop.as_raw_fd(), STOP).map_err(epoll_err)?;
        events
            .add(changed.as_raw_fd(), CHANGED)
            .map_err(epoll_err)?;
        let lines: Lines = Arc::default();
        let (theirs, changed2) = (
            lines.clone(),
            changed
                .try_clone()
                .map_err(|e| setup(format!("eventfd: {e}")))?,
        );
        let thread =
            lifecycle::threads::spawn(lifecycle::threads::Role::Vmm, "tern-intx", move || {
                // Lines whose resample eventfd is in the epoll set (a removed line's leaves
                // the set by itself when the eventfd is closed).
                let mut watched = BTreeSet::new();
                let mut ready = Vec::new();
                loop {
                    match events.wait(None) {
                        Ok(r) => {
                            ready.clear();
                            ready.extend(r.iter());
                        }
                        Err(_) => return,
                    }
                    for &token in &ready {
                        match token {
                            STOP => return,
                            CHANGED => {
                                let _ = changed2.read();
                                let lines = lock(&theirs);
                                watched.retain(|t| lines.contains_key(t));
                                for (&t, parts) in lines.iter() {
                                    if !watched.contains(&t) {
                                        match events.add(parts.resample.as_raw_fd(), t) {
                                            Ok(()) => {
                                                watched.insert(t);
                                            }
                                            Err(e) => tracing::error!("INTx: epoll: {e}"),
                                        }
                                    }
                                }
                            }
                            t => {
                                let Some(parts) = lock(&theirs).get(&t).cloned() else {
                                    continue;
                                };
                                let _ = parts.resample.read();
                                if (parts.pending)() {
                                    let _ = parts.line.assert();
                                }
                            }
                        }
                    }
                }
            })
            .map_err(|e| setup(format!("cannot start the INTx thread: {e}")))?;
        Ok(IntxResampler {
            stop,
            changed,
            lines,
            next: AtomicU64::new(0),
            thread: Some(thread),
        })
    }

    /// Serves `parts` from now on; returns the token that [`remove`](Self::remove) takes.
    pub(crate) fn add(&self, parts: IntxParts) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.lines).insert(token, Arc::new(parts));
        let _ = self.changed.write(1);
        token
    }

    /// Stops serving the line `token` (its function is gone).
    pub(crate) fn remove(&self, token: u64) {
        lock(&self.lines).remove(&token);
        let _ = self.changed.write(1);
    }
}

impl Drop for IntxResampler {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
