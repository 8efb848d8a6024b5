//! virtio-balloon (device type 5): the host asks the guest for memory back and the guest
//! hands it pages, which the host then frees.
//!
//! - **Target and actual.** The host sets the balloon's target size (`num_pages` in the
//!   configuration space, in 4 KiB pages) and raises a configuration interrupt; the driver
//!   inflates or deflates towards it and writes how many pages it holds (`actual`).
//! - **Inflate queue** (0): device-readable buffers of little-endian 32-bit page frame
//!   numbers. Each page (runs of adjacent ones together) is given back to the host through
//!   [`Discard`], which frees it whatever backs guest memory, so that it reads as zeroes.
//! - **Deflate queue** (1): the driver takes pages back. `VIRTIO_BALLOON_F_MUST_TELL_HOST` is
//!   not offered, so nothing needs doing: a page faults back in when the guest touches it.
//! - **Statistics queue** (when `VIRTIO_BALLOON_F_STATS_VQ` is negotiated): the driver offers
//!   one buffer of `(le16 tag, le64 value)` entries; the device keeps it and returns it
//!   whenever it wants fresh figures (every polling interval, or on request), and the driver
//!   sends it back refilled.
//! - **Free page reporting queue** (`VIRTIO_BALLOON_F_PAGE_REPORTING`): the driver reports
//!   ranges of free memory (device-writable buffers, 2 MiB and up in Linux), which the host
//!   frees the same way, unless the guest poisons free pages with a non-zero value
//!   (`VIRTIO_BALLOON_F_PAGE_POISON`): freed pages would read back as zeroes, not its poison.
//! - **Deflate on OOM** (`VIRTIO_BALLOON_F_DEFLATE_ON_OOM`) is the driver's business: the
//!   device only offers it.
//!
//! Queues are numbered as the driver enables them: inflate, deflate, then the statistics queue
//! if negotiated, then the reporting queue if negotiated. Page numbers outside guest memory are
//! skipped (counted); a malformed chain breaks the device like any other (see [the devices
//! module](super)). Written in-tree for the same reason as the other devices here.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::common::{read_config_bytes, ConfigIrq, Ctx, Worker};

mod worker;
use crate::{ActivateError, Interrupt, QueueEvent, VirtioDevice, VmMemory};
use worker::{BalloonWorker, Role};

/// virtio device type of the balloon.
pub const DEVICE_TYPE: u32 = 5;
/// The balloon's page size: page frame numbers count 4 KiB pages.
pub const PAGE: u64 = 4096;
/// Size of every queue.
pub const QUEUE_SIZE: u16 = 256;

/// Feature bits (virtio 1.2, 5.5.3).
pub const F_STATS_VQ: u32 = 1;
/// The driver deflates when the guest runs out of memory.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// The guest poisons free pages with `poison_val`.
pub const F_PAGE_POISON: u32 = 4;
/// The driver reports free memory.
pub const F_PAGE_REPORTING: u32 = 5;

/// Statistics tags (virtio 1.2, 5.5.6.3) and the names tern gives them.
pub const STAT_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
    "alloc_stalls",
    "async_scans",
    "direct_scans",
    "async_reclaims",
    "direct_reclaims",
];

/// The most bytes an inflate, deflate or statistics chain may hold (Linux sends 256 page
/// numbers, 1 KiB, at a time).
const MAX_SMALL_CHAIN: u64 = 1 << 16;
/// The most bytes one free page report may describe (Linux: up to 32 ranges of 4 MiB).
const MAX_REPORT: u64 = 1 << 30;

/// Frees guest memory: implemented by whoever owns it, which knows what backs it.
pub trait Discard: Send + Sync {
    /// Gives the host memory behind guest-physical `[addr, addr + len)` back (the range lies
    /// in guest RAM and is page-aligned); it reads as zeroes afterwards.
    fn discard(&self, addr: u64, len: u64) -> io::Result<()>;
}

/// What the balloon offers the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonOptions {
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Offer free page reporting (and page poisoning, so guests that poison may report).
    pub free_page_reporting: bool,
    /// How often to ask for statistics; zero: no statistics queue.
    pub stats_interval: Duration,
}

/// The guest's statistics as the driver last sent them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestStats {
    /// When they arrived.
    pub at: Instant,
    /// Each tag the driver sent (an index into [`STAT_NAMES`], or beyond) and its value.
    pub values: Vec<(u16, u64)>,
}

/// The balloon as its owner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonStatus {
    /// Pages the host asked for.
    pub target_pages: u32,
    /// Pages the driver says it holds.
    pub actual_pages: u32,
    /// Pages freed on the host because the driver put them in the balloon, in total.
    pub inflated_pages: u64,
    /// Pages the driver took back, in total.
    pub deflated_pages: u64,
    /// Bytes freed on the host because the driver reported them free, in total.
    pub reported_bytes: u64,
    /// Page numbers outside guest memory the driver sent (skipped).
    pub invalid_pages: u64,
    /// The features the driver accepted.
    pub features: u64,
    /// The last statistics, if any came.
    pub stats: Option<GuestStats>,
}

/// What the device, its worker and its owner share.
struct Shared {
    target: AtomicU32,
    actual: AtomicU32,
    poison: AtomicU32,
    features: AtomicU64,
    inflated: AtomicU64,
    deflated: AtomicU64,
    reported: AtomicU64,
    invalid: AtomicU64,
    stats: Mutex<Option<GuestStats>>,
    /// The transport's interrupt while the device is active.
    interrupt: ConfigIrq,
    /// Asks the worker to fetch statistics now.
    refresh: EventFd,
}

/// The owner's handle on a balloon: set its target, read its state.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
    max_pages: u32,
}

impl BalloonHandle {
    /// Asks the guest for a balloon of `pages` pages (at most the guest's memory).
    pub fn set_target(&self, pages: u32) -> Result<(), String> {
        if pages > self.max_pages {
            return Err(format!(
                "a balloon of {} MiB is larger than the guest's memory ({} MiB)",
                (u64::from(pages) * PAGE) >> 20,
                (u64::from(self.max_pages) * PAGE) >> 20
            ));
        }
        self.shared.target.store(pages, Ordering::SeqCst);
        self.shared.interrupt.raise()
    }

    /// Asks the driver for fresh statistics (they arrive in [`status`](Self::status) later).
    pub fn refresh_stats(&self) {
        let _ = self.shared.refresh.write(1);
    }

    /// The balloon's state now.
    pub fn status(&self) -> BalloonStatus {
        let s = &self.shared;
        BalloonStatus {
            target_pages: s.target.load(Ordering::SeqCst),
            actual_pages: s.actual.load(Ordering::SeqCst),
            inflated_pages: s.inflated.load(Ordering::Relaxed),
            deflated_pages: s.deflated.load(Ordering::Relaxed),
            reported_bytes: s.reported.load(Ordering::Relaxed),
            invalid_pages: s.invalid.load(Ordering::Relaxed),
            features: s.features.load(Ordering::SeqCst),
            stats: s.stats.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// The virtio-balloon device.
pub struct Balloon {
    opts: BalloonOptions,
    shared: Arc<Shared>,
    discard: Arc<dyn Discard>,
    max_pages: u32,
    queue_sizes: Vec<u16>,
    broken: Arc<AtomicBool>,
    worker: Option<Worker<BalloonWorker>>,
    /// `restore_backend` ran; the transport's reset that follows keeps `actual`.
    restoring: bool,
}

impl Balloon {
    /// A new, inactive balloon for a guest of `memory` bytes, freeing pages through `discard`.
    pub fn new(opts: BalloonOptions, memory: u64, discard: Arc<dyn Discard>) -> io::Result<Self> {
        let queues =
            2 + usize::from(!opts.stats_interval.is_zero()) + usize::from(opts.free_page_reporting);
        Ok(Balloon {
            opts,
            shared: Arc::new(Shared {
                target: AtomicU32::new(0),
                actual: AtomicU32::new(0),
                poison: AtomicU32::new(0),
                features: AtomicU64::new(0),
                inflated: AtomicU64::new(0),
                deflated: AtomicU64::new(0),
                reported: AtomicU64::new(0),
                invalid: AtomicU64::new(0),
                stats: Mutex::new(None),
                interrupt: ConfigIrq::default(),
                refresh: EventFd::new(EFD_NONBLOCK)?,
            }),
            discard,
            max_pages: u32::try_from(memory / PAGE).unwrap_or(u32::MAX),
            queue_sizes: vec![QUEUE_SIZE; queues],
            broken: Arc::new(AtomicBool::new(false)),
            worker: None,
            restoring: false,
        })
    }

    /// The owner's handle.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
            max_pages: self.max_pages,
        }
    }

    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0..4].copy_from_slice(&self.shared.target.load(Ordering::SeqCst).to_le_bytes());
        c[4..8].copy_from_slice(&self.shared.actual.load(Ordering::SeqCst).to_le_bytes());
        // free_page_hint_cmd_id (8..12) stays 0: free page hinting is not offered.
        c[12..16].copy_from_slice(&self.shared.poison.load(Ordering::SeqCst).to_le_bytes());
        c
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.shared.interrupt.set(None);
    }

    fn acked(&self, bit: u32) -> bool {
        self.shared.features.load(Ordering::SeqCst) & (1 << bit) != 0
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn min_queues(&self) -> usize {
        2
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1;
        if !self.opts.stats_interval.is_zero() {
            f |= 1 << F_STATS_VQ;
        }
        if self.opts.deflate_on_oom {
            f |= 1 << F_DEFLATE_ON_OOM;
        }
        if self.opts.free_page_reporting {
            f |= 1 << F_PAGE_REPORTING | 1 << F_PAGE_POISON;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.shared
            .features
            .store(features & self.features(), Ordering::SeqCst);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut c = self.config();
        let Some(end) = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data.len()))
            .filter(|&e| e <= c.len())
        else {
            return;
        };
        c[end - data.len()..end].copy_from_slice(data);
        let word = |i: usize| u32::from_le_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
        // The driver writes `actual` and, when poisoning is negotiated, `poison_val`.
        let old = self.shared.actual.swap(word(4), Ordering::SeqCst);
        if old != word(4) {
            tracing::debug!(
                "virtio-balloon: the guest's balloon holds {} pages",
                word(4)
            );
        }
        if self.acked(F_PAGE_POISON) {
            self.shared.poison.store(word(12), Ordering::SeqCst);
        }
    }

    fn activate(
        &mut self,
        mem: VmMemory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<QueueEvent>,
    ) -> Result<(), ActivateError> {
        // Not a reset: `actual` is the driver's (or a restore's) to keep.
        self.stop_worker();
        let stats = self.acked(F_STATS_VQ);
        let reporting = self.acked(F_PAGE_REPORTING);
        let want = 2 + usize::from(stats) + usize::from(reporting);
        if queues.len() != want {
            return Err(ActivateError::BadQueue(format!(
                "{want} queues expected for the features accepted, got {}",
                queues.len()
            )));
        }
        let mut it = queues.into_iter();
        let mut next = || it.next().map(|q| (q.queue, q.event));
        let (Some(inflate), Some(deflate)) = (next(), next()) else {
            return Err(ActivateError::BadQueue("the balloon needs 2 queues".into()));
        };
        let stats_q = if stats { next() } else { None };
        let report_q = if reporting { next() } else { None };
        let mut timer = TimerFd::new().map_err(|e| ActivateError::Worker(e.into()))?;
        if stats_q.is_some() {
            let every = self.opts.stats_interval;
            timer
                .reset(every, Some(every))
                .map_err(|e| ActivateError::Worker(e.into()))?;
        }
        let refresh = self
            .shared
            .refresh
            .try_clone()
            .map_err(ActivateError::Worker)?;
        let mut queues = vec![(Role::Inflate, inflate), (Role::Deflate, deflate)];
        queues.extend(stats_q.map(|q| (Role::Stats, q)));
        queues.extend(report_q.map(|q| (Role::Report, q)));
        let handler = BalloonWorker {
            ctx: Ctx::new(
                mem,
                interrupt.clone(),
                self.broken.clone(),
                "balloon",
                MAX_REPORT,
            ),
            queues,
            timer,
            refresh,
            held: None,
            shared: self.shared.clone(),
            discard: self.discard.clone(),
        };
        self.shared.interrupt.set(Some(interrupt));
        self.worker = Some(
            Worker::spawn(
                lifecycle::threads::Device::Balloon,
                "virtio-balloon",
                handler,
            )
            .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        // A driver starting afresh holds no pages (the guest rebooted, or took them all back
        // on its way down); the target stays. A restore's own reset keeps what it restored.
        if !std::mem::take(&mut self.restoring) {
            self.shared.actual.store(0, Ordering::SeqCst);
        }
        self.broken.store(false, Ordering::SeqCst);
    }

    fn pause(&mut self, deadline: Instant) -> bool {
        super::common::pause_all(&self.worker, deadline)
    }

    fn resume(&mut self) {
        self.worker.iter().for_each(|w| w.resume());
    }

    fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    fn save_backend(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "target_pages": self.shared.target.load(Ordering::SeqCst),
            "actual_pages": self.shared.actual.load(Ordering::SeqCst),
            "poison": self.shared.poison.load(Ordering::SeqCst),
        }))
    }

    fn restore_backend(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let field = |name: &str| -> Result<u32, String> {
            state
                .get(name)
                .and_then(serde_json::Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| format!("virtio-balloon state: {name} is missing or not a u32"))
        };
        let (target, actual, poison) = (
            field("target_pages")?,
            field("actual_pages")?,
            field("poison")?,
        );
        for (name, v) in [("target_pages", target), ("actual_pages", actual)] {
            if v > self.max_pages {
                return Err(format!(
                    "virtio-balloon state: {name} {v} exceeds the guest's {} pages",
                    self.max_pages
                ));
            }
        }
        self.shared.target.store(target, Ordering::SeqCst);
        self.shared.poison.store(poison, Ordering::SeqCst);
        self.shared.actual.store(actual, Ordering::SeqCst);
        // The transport resets the device on its way to restoring it: that reset keeps it.
        self.restoring = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
