//! Physical memory allocator: a bump allocator over usable RAM above the image
//! and below the end of the identity map. Nothing is ever freed; memory it hands
//! out is identity mapped and user accessible (ring 3 can use it directly,
//! which is also what future DMA buffers for virtio drivers need).

use super::bootinfo::{BootInfo, MEM_RAM};
use crate::layout::IDENTITY_MAP_END;

const MAX_RANGES: usize = 32;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

pub fn image_range() -> (u64, u64) {
    // Linker-script symbols: only their addresses are used.
    (
        &raw const __image_start as u64,
        &raw const __image_end as u64,
    )
}

#[derive(Clone)]
pub struct PhysAlloc {
    /// Free [start, end) ranges, in memmap order.
    ranges: [(u64, u64); MAX_RANGES],
    n: usize,
}

const fn align_up(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

impl PhysAlloc {
    pub fn new(bi: &BootInfo) -> Self {
        let (img_start, img_end) = image_range();
        let mut pa = PhysAlloc {
            ranges: [(0, 0); MAX_RANGES],
            n: 0,
        };
        for r in bi.regions().iter().filter(|r| r.kind == MEM_RAM) {
            let mut start = r.base.max(1 << 20);
            let end = r.end().min(IDENTITY_MAP_END);
            if start < img_end && end > img_start {
                start = img_end;
            }
            let start = align_up(start, 4096);
            let end = end & !4095;
            if start < end && pa.n < MAX_RANGES {
                pa.ranges[pa.n] = (start, end);
                pa.n += 1;
            }
        }
        pa
    }

    /// Allocate `size` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        for r in self.ranges[..self.n].iter_mut() {
            let start = align_up(r.0, align);
            if start < r.1 && r.1 - start >= size {
                r.0 = start + size;
                return Some(start);
            }
        }
        None
    }

    /// Total bytes still free.
    pub fn free_bytes(&self) -> u64 {
        self.ranges[..self.n].iter().map(|r| r.1 - r.0).sum()
    }
}

/// A usable 4 KiB page below 640 KiB for the AP real-mode trampoline
/// (prefers 0x8000; must not hold anything still needed, boot info is copied
/// before this is used).
pub fn low_page(bi: &BootInfo) -> Option<u64> {
    let usable = |p: u64| {
        bi.regions()
            .iter()
            .any(|r| r.kind == MEM_RAM && r.base <= p && r.end() >= p + 4096)
    };
    (0x8000u64..0x9f000)
        .step_by(4096)
        .chain((0x1000u64..0x8000).step_by(4096))
        .find(|&p| usable(p))
}
