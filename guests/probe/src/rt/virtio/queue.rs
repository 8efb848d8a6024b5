//! Split virtqueue (virtio 1.x §2.7) in probe-owned, identity-mapped RAM.
//!
//! The probe polls: the driver area's flags ask the device not to interrupt,
//! and completions are found by watching the used ring's index.

use core::sync::atomic::{fence, Ordering};

use crate::rt::clock;
use crate::rt::io::pause;
use crate::rt::phys::PhysAlloc;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const DESC_SIZE: u64 = 16;

/// One buffer of a request.
#[derive(Clone, Copy)]
pub struct Buf {
    /// Guest-physical (= virtual) address.
    pub addr: u64,
    pub len: u32,
    /// The device writes it (otherwise the device reads it).
    pub device_writes: bool,
}

/// Driver-side state of one split virtqueue.
#[derive(Clone, Copy)]
pub struct Virtqueue {
    pub index: u16,
    pub size: u16,
    /// Descriptor table, driver area (available ring), device area (used ring).
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Where the transport writes this queue's notification.
    pub notify_addr: u64,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
}

/// Fetch a little-endian field from ring memory.
///
/// # Safety
/// `addr` lies in a queue's ring memory.
unsafe fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: forwarded; the device may write it concurrently, hence volatile.
    unsafe { (addr as *const T).read_volatile() }
}

/// # Safety
/// `addr` lies in a queue's ring memory, in a part the driver owns.
unsafe fn wr<T: Copy>(addr: u64, v: T) {
    // SAFETY: forwarded.
    unsafe { (addr as *mut T).write_volatile(v) }
}

impl Virtqueue {
    pub const EMPTY: Virtqueue = Virtqueue {
        index: 0,
        size: 0,
        desc: 0,
        avail: 0,
        used: 0,
        notify_addr: 0,
        free_head: 0,
        num_free: 0,
        avail_idx: 0,
        last_used: 0,
    };

    /// Allocate and initialise the rings of a queue of `size` entries (a power
    /// of two) in one zeroed, page-aligned block.
    pub fn new(index: u16, size: u16, pa: &mut PhysAlloc) -> Result<Self, &'static str> {
        let n = u64::from(size);
        let avail_off = DESC_SIZE * n;
        // The used ring must be 4-byte aligned.
        let used_off = (avail_off + 6 + 2 * n + 3) & !3;
        let total = used_off + 6 + 8 * n;
        let mem = pa
            .alloc((total + 4095) & !4095, 4096)
            .ok_or("no memory for a virtqueue")?;
        let q = Virtqueue {
            index,
            size,
            desc: mem,
            avail: mem + avail_off,
            used: mem + used_off,
            notify_addr: 0,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
        };
        // SAFETY: `mem` is a fresh allocation of at least `total` bytes that
        // no device knows about yet.
        unsafe {
            core::ptr::write_bytes(mem as *mut u8, 0, total as usize);
            // Free list chained through the `next` fields.
            for i in 0..size {
                wr::<u16>(q.desc_addr(i) + 14, i.wrapping_add(1));
            }
            wr::<u16>(q.avail, AVAIL_F_NO_INTERRUPT);
        }
        Ok(q)
    }

    /// Address of descriptor `i` in the descriptor table.
    pub fn desc_addr(&self, i: u16) -> u64 {
        self.desc + DESC_SIZE * u64::from(i)
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Whether the device has published a completion [`pop_used`](Self::pop_used)
    /// has not taken yet.
    pub fn has_used(&self) -> bool {
        // SAFETY: reading the device area of our own queue.
        let idx = unsafe { rd::<u16>(self.used + 2) };
        idx != self.last_used
    }

    /// Whether the device wants a notification: not when it set VRING_USED_F_NO_NOTIFY
    /// (it is already processing the ring). Called after [`push`](Self::push), whose fence
    /// orders the available index before this read.
    pub fn kick_needed(&self) -> bool {
        // SAFETY: the used ring lies in this queue's own memory.
        let flags = unsafe { rd::<u16>(self.used) };
        flags & 1 == 0
    }

    /// Chain `bufs` into free descriptors and make the chain available.
    /// Returns the head descriptor (the request's id). The caller notifies.
    pub fn push(&mut self, bufs: &[Buf]) -> Result<u16, &'static str> {
        self.push_edited(bufs, |_, _| {})
    }

    /// [`push`](Self::push) for malformed chains: `edit(queue, head)` may
    /// rewrite the chain's descriptors after they are written and before the
    /// chain is published. Whatever it changes must be undone before the
    /// chain comes back through [`pop_used`](Self::pop_used), which follows
    /// the NEXT flags to free it.
    pub fn push_edited(
        &mut self,
        bufs: &[Buf],
        edit: impl FnOnce(&Virtqueue, u16),
    ) -> Result<u16, &'static str> {
        if bufs.is_empty() || bufs.len() > usize::from(self.num_free) {
            return Err("virtqueue full");
        }
        let head = self.free_head;
        let mut i = head;
        for (k, b) in bufs.iter().enumerate() {
            let d = self.desc_addr(i);
            let last = k + 1 == bufs.len();
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            // SAFETY: descriptor `i` is free (on the driver's free list), so
            // the device does not read it.
            let next = unsafe {
                let next = rd::<u16>(d + 14);
                wr::<u64>(d, b.addr);
                wr::<u32>(d + 8, b.len);
                wr::<u16>(d + 12, flags);
                next
            };
            if last {
                self.free_head = next;
            } else {
                i = next;
            }
        }
        self.num_free -= bufs.len() as u16;
        edit(self, head);
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx & (self.size - 1));
        // SAFETY: the ring slot and the index belong to the driver.
        unsafe {
            wr::<u16>(slot, head);
            // The device must see the descriptors and the slot before the index.
            fence(Ordering::Release);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            wr::<u16>(self.avail + 2, self.avail_idx);
        }
        // The index must be visible before the notification that follows.
        fence(Ordering::SeqCst);
        Ok(head)
    }

    /// Makes chain `head` available once more without touching its
    /// descriptors: a broken driver, for hostile tests only (the device may
    /// then use the chain twice, which [`pop_used`](Self::pop_used) cannot
    /// account for; reset the device afterwards).
    pub fn republish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx & (self.size - 1));
        // SAFETY: the ring slot and the index belong to the driver.
        unsafe {
            wr::<u16>(slot, head);
            fence(Ordering::Release);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            wr::<u16>(self.avail + 2, self.avail_idx);
        }
        fence(Ordering::SeqCst);
    }

    /// The next completion `(id, bytes written by the device)`, if any; its
    /// descriptors go back on the free list.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, &'static str> {
        // SAFETY: reading the device area of our own queue.
        let idx = unsafe { rd::<u16>(self.used + 2) };
        if idx == self.last_used {
            return Ok(None);
        }
        fence(Ordering::Acquire);
        let e = self.used + 4 + 8 * u64::from(self.last_used & (self.size - 1));
        // SAFETY: the element at `last_used` was published by the index above.
        let (id, len) = unsafe { (rd::<u32>(e), rd::<u32>(e + 4)) };
        self.last_used = self.last_used.wrapping_add(1);
        if id >= u32::from(self.size) {
            return Err("device returned an invalid descriptor id");
        }
        // Put the chain back on the free list.
        let id = id as u16;
        let mut i = id;
        let mut n = 1;
        loop {
            let d = self.desc_addr(i);
            // SAFETY: the chain is ours again now that the device used it.
            let (flags, next) = unsafe { (rd::<u16>(d + 12), rd::<u16>(d + 14)) };
            if flags & DESC_F_NEXT == 0 || n >= self.size {
                // SAFETY: as above.
                unsafe { wr::<u16>(d + 14, self.free_head) };
                break;
            }
            i = next & (self.size - 1);
            n += 1;
        }
        self.free_head = id;
        self.num_free += n;
        Ok(Some((id, len)))
    }

    /// Poll for the next completion for at most `timeout_ns` of the reference
    /// clock.
    pub fn wait_used(&mut self, timeout_ns: u64) -> Result<(u16, u32), &'static str> {
        let start = clock::now_ns();
        loop {
            if let Some(done) = self.pop_used()? {
                return Ok(done);
            }
            if clock::now_ns().wrapping_sub(start) > timeout_ns {
                return Err("request timed out");
            }
            pause();
        }
    }
}
