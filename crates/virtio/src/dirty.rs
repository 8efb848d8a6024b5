//! Guest memory written by devices, for diff snapshots.
//!
//! KVM's dirty log sees what vCPUs write; devices write guest memory from their own threads
//! (disk reads, received frames, console input, used-ring updates), often through raw
//! pointers handed to the kernel (io_uring, `readv`). Every device-writable buffer goes through
//! [`Ctx`](crate::devices) validation, which marks it in the VM's [`DirtyLog`] before the
//! device touches it (a buffer marked and then not written costs a page in the next diff,
//! never a lost write). The used rings are marked by the VMM from the transports' state when
//! it takes a snapshot.
//!
//! One log per VM, part of its [`VmMemory`](crate::VmMemory): devices mark through the handle
//! they were given. The VMM switches it on (with a clean bitmap over the regions of the
//! moment), reads and clears it, and may switch it off; while it is off, marking costs one
//! atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Page granularity of the tracking.
pub const PAGE_SIZE: u64 = 4096;

/// A bitmap of written pages over guest RAM, one bit per page, per region.
pub struct DirtyPages {
    /// (guest address, length, first bit) of each region.
    regions: Vec<(u64, u64, usize)>,
    bits: Vec<AtomicU64>,
}

impl DirtyPages {
    /// A clean bitmap over the RAM regions `(guest address, length)`, in order; bit `i` is
    /// page `i` of the regions laid end to end (as in a snapshot's memory file).
    pub fn new(regions: &[(u64, u64)]) -> Self {
        let mut first = 0usize;
        let regions: Vec<(u64, u64, usize)> = regions
            .iter()
            .map(|&(a, l)| {
                let r = (a, l, first);
                first += l.div_ceil(PAGE_SIZE) as usize;
                r
            })
            .collect();
        DirtyPages {
            regions,
            bits: (0..first.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Marks `[addr, addr + len)` (guest physical) written; parts outside RAM are ignored.
    pub fn mark(&self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = addr.saturating_add(len);
        for &(start, size, first) in &self.regions {
            let (lo, hi) = (addr.max(start), end.min(start + size));
            if lo >= hi {
                continue;
            }
            let p0 = first + ((lo - start) / PAGE_SIZE) as usize;
            let p1 = first + ((hi - 1 - start) / PAGE_SIZE) as usize;
            for p in p0..=p1 {
                self.bits[p / 64].fetch_or(1 << (p % 64), Ordering::Relaxed);
            }
        }
    }

    /// The bitmap as words (bit `i` of word `w` is page `64 w + i`), cleared.
    pub fn take(&self) -> Vec<u64> {
        self.bits
            .iter()
            .map(|w| w.swap(0, Ordering::Relaxed))
            .collect()
    }
}

/// A VM's log of the guest memory its devices write: on or off, cheap to clone (clones share
/// it).
#[derive(Clone, Debug, Default)]
pub struct DirtyLog(Arc<Log>);

#[derive(Debug, Default)]
struct Log {
    /// Whether `pages` is there: the one thing marking looks at while the log is off.
    on: AtomicBool,
    pages: RwLock<Option<DirtyPages>>,
}

impl DirtyLog {
    /// A log that is off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Switches the log on with a clean bitmap over the RAM regions `(guest address,
    /// length)`, in order (see [`DirtyPages::new`]); a bitmap it had is dropped.
    pub fn start(&self, regions: &[(u64, u64)]) {
        let mut pages = self.0.pages.write().unwrap_or_else(|p| p.into_inner());
        *pages = Some(DirtyPages::new(regions));
        self.0.on.store(true, Ordering::Release);
    }

    /// Switches the log off and drops its bitmap.
    pub fn stop(&self) {
        let mut pages = self.0.pages.write().unwrap_or_else(|p| p.into_inner());
        self.0.on.store(false, Ordering::Release);
        *pages = None;
    }

    /// Whether the log is on.
    pub fn is_on(&self) -> bool {
        self.0.on.load(Ordering::Acquire)
    }

    /// Marks `[addr, addr + len)` (guest physical) written, when the log is on.
    pub fn mark(&self, addr: u64, len: u64) {
        if !self.0.on.load(Ordering::Acquire) {
            return;
        }
        if let Some(p) = &*self.0.pages.read().unwrap_or_else(|p| p.into_inner()) {
            p.mark(addr, len);
        }
    }

    /// The bitmap (see [`DirtyPages::take`]), cleared; None while the log is off.
    pub fn take(&self) -> Option<Vec<u64>> {
        let pages = self.0.pages.read().unwrap_or_else(|p| p.into_inner());
        pages.as_ref().map(DirtyPages::take)
    }
}

impl std::fmt::Debug for DirtyPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyPages")
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_pages_across_regions() {
        let d = DirtyPages::new(&[(0, 3 * PAGE_SIZE), (1 << 32, 2 * PAGE_SIZE)]);
        d.mark(PAGE_SIZE - 1, 2); // pages 0 and 1
        d.mark(1 << 32, 1); // region 1, page 0 = bit 3
        d.mark(5 * PAGE_SIZE, 100); // a hole: ignored
        d.mark((1 << 32) + PAGE_SIZE, 0); // empty: nothing
        assert_eq!(d.take(), vec![0b1011]);
        assert_eq!(d.take(), vec![0]);
    }

    #[test]
    fn log_on_off() {
        let log = DirtyLog::new();
        let other = log.clone();
        other.mark(0, 1);
        assert!(!log.is_on());
        assert_eq!(log.take(), None);
        log.start(&[(0, 2 * PAGE_SIZE)]);
        assert!(other.is_on());
        other.mark(PAGE_SIZE, 1);
        assert_eq!(log.take(), Some(vec![0b10]));
        assert_eq!(log.take(), Some(vec![0]));
        other.mark(0, 1);
        // Starting again begins with a clean bitmap.
        log.start(&[(0, 2 * PAGE_SIZE)]);
        assert_eq!(log.take(), Some(vec![0]));
        log.stop();
        other.mark(0, 1);
        assert_eq!(log.take(), None);
    }
}
