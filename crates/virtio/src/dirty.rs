//! Guest memory written by devices, for diff snapshots.
//!
//! KVM's dirty log sees what vCPUs write; devices write guest memory from their own threads
//! (disk reads, received frames, console input, used-ring updates), often through raw
//! pointers handed to the kernel (io_uring, `readv`). Every device-writable buffer goes through
//! [`Ctx`](crate::devices) validation, which marks it here before the device touches it (a
//! buffer marked and then not written costs a page in the next diff, never a lost write). The
//! used rings are marked by the VMM from the transports' state when it takes a snapshot.
//!
//! One tracker per process: tern runs one VM per process, and the VMM installs the tracker
//! when the VM tracks dirty pages; without one, marking costs one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

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

static TRACKER: OnceLock<Arc<DirtyPages>> = OnceLock::new();

/// Installs the process's tracker (once; later calls are ignored and return false).
pub fn install(t: Arc<DirtyPages>) -> bool {
    TRACKER.set(t).is_ok()
}

/// The installed tracker.
pub fn tracker() -> Option<&'static Arc<DirtyPages>> {
    TRACKER.get()
}

/// Marks `[addr, addr + len)` written, when a tracker is installed.
pub fn mark(addr: u64, len: u64) {
    if let Some(t) = TRACKER.get() {
        t.mark(addr, len);
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
}
