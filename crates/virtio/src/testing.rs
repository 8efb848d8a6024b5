//! Test helpers: a virtio driver's view of a device behind [`MmioTransport`], over real guest
//! memory, with split virtqueues laid out by hand.

use std::time::{Duration, Instant};

use devices::BusDevice;
use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_F_VERSION_1,
};
pub use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::transport::mmio::MmioTransport;
use crate::{GuestMemoryMmap, VirtioDevice, VmMemory};

/// Guest memory size for tests.
pub const MEM_SIZE: u64 = 0x40_0000;
/// Where tests put their data buffers.
pub const BUFS: u64 = 0x10_0000;
/// Queue size tests use.
pub const QSIZE: u16 = 16;
/// How long a test waits for a worker before failing.
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub const REG_STATUS: u64 = 0x70;
pub const REG_ISR: u64 = 0x60;
pub const REG_ACK: u64 = 0x64;
pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;

pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Polls `cond` until it holds or [`TIMEOUT`] passes.
pub fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < TIMEOUT {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// A split virtqueue as the driver lays it out in guest memory.
pub struct VirtQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl VirtQueue {
    /// A queue of [`QSIZE`] at `base` (16-byte aligned).
    pub fn new(base: u64) -> Self {
        Self::with_size(base, QSIZE)
    }

    /// A queue of `size` (a power of two) at `base` (16-byte aligned).
    pub fn with_size(base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        VirtQueue {
            size,
            desc: base,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Writes descriptor `i` of the table.
    pub fn set_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(i));
        mem.write_obj(addr.to_le(), at).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at.0 + 12))
            .unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at.0 + 14))
            .unwrap();
    }

    /// Puts `head` in the available ring and publishes it.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Writes the available index directly.
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Adds a well-formed chain of `(addr, len, device-writable)` buffers; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, writable)) in bufs.iter().enumerate() {
            let i = self.next_desc;
            let last = k + 1 == bufs.len();
            let flags = if writable { WRITE } else { 0 } | if last { 0 } else { NEXT };
            self.set_desc(mem, i, addr, len, flags, (i + 1) % self.size);
            self.next_desc = (i + 1) % self.size;
        }
        self.publish(mem, head);
        head
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used element `i`: (descriptor id, length written).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id = mem.read_obj::<u32>(GuestAddress(at)).unwrap();
        let len = mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap();
        (id, len)
    }
}

/// The driver side of a virtio-mmio device.
pub struct Driver {
    pub t: MmioTransport,
    /// Guest memory as it was at creation (the same mappings as `vm_mem`).
    pub mem: GuestMemoryMmap,
    /// The VM's memory the transport and device share.
    pub vm_mem: VmMemory,
    pub irq: EventFd,
}

impl Driver {
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = mem();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let vm_mem = VmMemory::new(mem.clone());
        let t = MmioTransport::new(vm_mem.clone(), device, irq.try_clone().unwrap()).unwrap();
        Driver {
            t,
            mem,
            vm_mem,
            irq,
        }
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&mut self, offset: u64, val: u32) {
        self.t.write(offset, &val.to_le_bytes());
    }

    /// Adds `bits` to Status the way Linux does (read, or, write).
    pub fn add_status(&mut self, bits: u32) {
        let s = self.read(REG_STATUS) & !NEEDS_RESET;
        self.write(REG_STATUS, s | bits);
    }

    /// Resets, then ACKNOWLEDGE, DRIVER, the driver's `features`, FEATURES_OK; returns whether
    /// the device kept FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.write(REG_STATUS, 0);
        self.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.add_status(VIRTIO_CONFIG_S_DRIVER);
        self.write(0x24, 0);
        self.write(0x20, features as u32);
        self.write(0x24, 1);
        self.write(0x20, (features >> 32) as u32);
        self.add_status(FEATURES_OK);
        self.read(REG_STATUS) & FEATURES_OK != 0
    }

    /// Programs queue `idx` from `q` and marks it ready.
    pub fn setup_queue(&mut self, idx: u32, q: &VirtQueue) {
        self.write(0x30, idx);
        assert!(self.read(0x34) >= u32::from(q.size));
        assert_eq!(self.read(0x44), 0);
        self.write(0x38, q.size.into());
        for (reg, addr) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(0x44, 1);
    }

    /// Negotiates VERSION_1, sets up `queues` and sets DRIVER_OK; returns the status read back.
    pub fn start(&mut self, queues: &[&VirtQueue]) -> u32 {
        assert!(self.negotiate(VERSION_1));
        for (i, q) in queues.iter().enumerate() {
            self.setup_queue(i as u32, q);
        }
        self.add_status(DRIVER_OK);
        self.read(REG_STATUS)
    }

    pub fn notify(&mut self, queue: u32) {
        self.write(0x50, queue);
    }

    /// Waits until the device reports DEVICE_NEEDS_RESET.
    pub fn wait_needs_reset(&mut self) -> bool {
        let start = Instant::now();
        while start.elapsed() < TIMEOUT {
            if self.read(REG_STATUS) & NEEDS_RESET != 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

/// Frees for real (`MADV_DONTNEED` on the driver's guest memory, a private anonymous
/// mapping) and records what it freed: the owner's side of the balloon and virtio-mem.
#[derive(Default)]
pub struct Freer {
    pub mem: std::sync::OnceLock<GuestMemoryMmap>,
    pub freed: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl crate::devices::Discard for Freer {
    fn discard(&self, addr: u64, len: u64) -> std::io::Result<()> {
        use vm_memory::GuestMemoryBackend;
        let mem = self
            .mem
            .get()
            .ok_or_else(|| std::io::Error::other("no memory"))?;
        let host = mem
            .get_host_address(GuestAddress(addr))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // SAFETY: [host, host + len) is the test's guest memory (the device checked the range
        // lies in it); dropping its pages is what the device asks for.
        if unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.freed.lock().unwrap().push((addr, len));
        Ok(())
    }
}
