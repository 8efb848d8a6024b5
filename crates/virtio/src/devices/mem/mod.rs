//! virtio-mem (device type 24): memory the guest adds and removes in blocks while it runs.
//!
//! - **The region.** The device owns a range of guest-physical memory (`addr`, `region_size`)
//!   that is not in the guest's memory map; tern maps it (and registers it with KVM) when it
//!   builds the VM, so it costs the host only the pages the guest touches.
//! - **Requested and plugged.** The host sets `requested_size` (a multiple of the block size)
//!   and raises a configuration interrupt; the driver plugs or unplugs blocks until
//!   `plugged_size` matches, and uses plugged memory as ordinary RAM.
//! - **Requests** (one queue; a device-readable `virtio_mem_req` of 24 bytes, then a
//!   device-writable `virtio_mem_resp` of 10): PLUG and UNPLUG a run of blocks, UNPLUG_ALL,
//!   and STATE of a run. A run outside the usable region, misaligned, empty or not wholly in
//!   the opposite state is an ERROR; plugging beyond `requested_size` is a NACK (spec 5.15.6).
//! - **Unplugged memory goes back to the host** through [`Discard`] (the same freeing the
//!   balloon uses, whatever backs guest memory), and reads as zeroes when plugged again.
//!   `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE` is offered: the guest must not touch unplugged
//!   memory. It stays mapped, though, so a guest that does only costs the host memory up to
//!   the region's size, the maximum its operator granted.
//! - A device reset keeps the blocks as they are (the spec's rule): Linux's driver unplugs
//!   everything it finds plugged when it starts.
//!
//! Queue handling follows [the devices module](super)'s policy; a chain too short for a
//! request or its response breaks the device. Written in-tree for the same reason as the other
//! devices here.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;

use super::balloon::Discard;
use super::common::{read_config_bytes, ConfigIrq, Ctx, Worker};
use crate::{ActivateError, Interrupt, QueueEvent, VirtioDevice, VmMemory};

mod worker;
use worker::MemWorker;

/// virtio device type of virtio-mem.
pub const DEVICE_TYPE: u32 = 24;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 128;
/// Feature bit: the guest must not access unplugged memory.
pub const F_UNPLUGGED_INACCESSIBLE: u32 = 1;
/// Bytes of the configuration space.
pub const CONFIG_SIZE: usize = 56;

/// Where the device's memory lies and how it is divided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemOptions {
    /// Guest-physical start of the region (a multiple of `block_size`).
    pub addr: u64,
    /// Bytes in the region (a multiple of `block_size`).
    pub size: u64,
    /// Bytes per block (a power of two, at least 4 KiB).
    pub block_size: u64,
}

impl MemOptions {
    fn blocks(&self) -> u64 {
        self.size / self.block_size
    }
}

/// The device as its owner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemStatus {
    /// Bytes the host asked the guest to have plugged.
    pub requested: u64,
    /// Bytes the guest has plugged.
    pub plugged: u64,
    /// Bytes in the region (most that can be plugged).
    pub region: u64,
    /// The block size.
    pub block_size: u64,
}

/// Which blocks are plugged, and what the host asked for.
pub(super) struct Blocks {
    /// One bit per block, set when plugged.
    bits: Vec<u64>,
    plugged: u64,
    requested: u64,
}

impl Blocks {
    fn new(blocks: u64) -> Self {
        Blocks {
            bits: vec![0; blocks.div_ceil(64) as usize],
            plugged: 0,
            requested: 0,
        }
    }

    pub(super) fn get(&self, b: u64) -> bool {
        self.bits
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    pub(super) fn set(&mut self, b: u64, on: bool) {
        if self.get(b) == on {
            return;
        }
        if let Some(w) = self.bits.get_mut((b / 64) as usize) {
            *w ^= 1 << (b % 64);
            if on {
                self.plugged += 1;
            } else {
                self.plugged -= 1;
            }
        }
    }

    /// The plugged blocks as runs of (first block, count).
    pub(super) fn runs(&self, blocks: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in (0..blocks).filter(|&b| self.get(b)) {
            match out.last_mut() {
                Some((first, n)) if *first + *n == b => *n += 1,
                _ => out.push((b, 1)),
            }
        }
        out
    }
}

/// What the device, its worker and its owner share.
pub(super) struct Shared {
    pub(super) opts: MemOptions,
    pub(super) blocks: Mutex<Blocks>,
    features: AtomicU64,
    /// The transport's interrupt while the device is active.
    interrupt: ConfigIrq,
    /// Bytes unplugged (and freed on the host) in all.
    pub(super) freed: AtomicU64,
}

impl Shared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Blocks> {
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The owner's handle on a virtio-mem device: set the requested size, read the state.
#[derive(Clone)]
pub struct MemHandle {
    shared: Arc<Shared>,
}

impl MemHandle {
    /// Asks the guest to have `bytes` of the region plugged: a multiple of the block size, at
    /// most the region's size. The error starts with "invalid" for a size that is not allowed.
    pub fn set_requested(&self, bytes: u64) -> Result<(), String> {
        let o = self.shared.opts;
        if bytes > o.size {
            return Err(format!(
                "invalid size: {} MiB more than the boot memory is above the {} MiB that can be hotplugged",
                bytes >> 20,
                o.size >> 20
            ));
        }
        if !bytes.is_multiple_of(o.block_size) {
            return Err(format!(
                "invalid size: the hotplugged part ({bytes} bytes) must be a multiple of the block size, {} KiB",
                o.block_size >> 10
            ));
        }
        self.shared.lock().requested = bytes;
        self.shared.interrupt.raise()
    }

    /// The device's state now.
    pub fn status(&self) -> MemStatus {
        let o = self.shared.opts;
        let b = self.shared.lock();
        MemStatus {
            requested: b.requested,
            plugged: b.plugged * o.block_size,
            region: o.size,
            block_size: o.block_size,
        }
    }

    /// Bytes the guest unplugged (and the host freed) since the VM started.
    pub fn freed_bytes(&self) -> u64 {
        self.shared.freed.load(Ordering::Relaxed)
    }
}

/// The virtio-mem device.
pub struct VirtioMem {
    shared: Arc<Shared>,
    discard: Arc<dyn Discard>,
    queue_sizes: [u16; 1],
    broken: Arc<AtomicBool>,
    worker: Option<Worker<MemWorker>>,
}

impl VirtioMem {
    /// A new, inactive device over the region `opts` describes, nothing plugged, freeing
    /// unplugged memory through `discard`.
    pub fn new(opts: MemOptions, discard: Arc<dyn Discard>) -> io::Result<Self> {
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
        if !opts.block_size.is_power_of_two() || opts.block_size < 4096 {
            return Err(bad(
                "the block size must be a power of two of at least 4 KiB",
            ));
        }
        if opts.size == 0
            || !opts.size.is_multiple_of(opts.block_size)
            || !opts.addr.is_multiple_of(opts.block_size)
            || opts.addr.checked_add(opts.size).is_none()
        {
            return Err(bad(
                "the region must be a non-empty, block-aligned range of whole blocks",
            ));
        }
        Ok(VirtioMem {
            shared: Arc::new(Shared {
                opts,
                blocks: Mutex::new(Blocks::new(opts.blocks())),
                features: AtomicU64::new(0),
                interrupt: ConfigIrq::default(),
                freed: AtomicU64::new(0),
            }),
            discard,
            queue_sizes: [QUEUE_SIZE],
            broken: Arc::new(AtomicBool::new(false)),
            worker: None,
        })
    }

    /// The owner's handle.
    pub fn handle(&self) -> MemHandle {
        MemHandle {
            shared: self.shared.clone(),
        }
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let o = self.shared.opts;
        let (plugged, requested) = {
            let b = self.shared.lock();
            (b.plugged * o.block_size, b.requested)
        };
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&o.block_size.to_le_bytes());
        // node_id (8..10) stays 0 and padding (10..16) is zero: VIRTIO_MEM_F_ACPI_PXM is not
        // offered.
        c[16..24].copy_from_slice(&o.addr.to_le_bytes());
        c[24..32].copy_from_slice(&o.size.to_le_bytes());
        // usable_region_size: all of it.
        c[32..40].copy_from_slice(&o.size.to_le_bytes());
        c[40..48].copy_from_slice(&plugged.to_le_bytes());
        c[48..56].copy_from_slice(&requested.to_le_bytes());
        c
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.shared.interrupt.set(None);
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << F_UNPLUGGED_INACCESSIBLE
    }

    fn ack_features(&mut self, features: u64) {
        self.shared
            .features
            .store(features & self.features(), Ordering::SeqCst);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is the device's: the driver writes nothing.
    }

    fn activate(
        &mut self,
        mem: VmMemory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<QueueEvent>,
    ) -> Result<(), ActivateError> {
        self.stop_worker();
        let Some(q) = queues.into_iter().next() else {
            return Err(ActivateError::BadQueue("virtio-mem needs its queue".into()));
        };
        let handler = MemWorker {
            // No chain of this device needs more than a request and a response; a little more
            // is allowed for drivers that split them oddly.
            ctx: Ctx::new(mem, interrupt.clone(), self.broken.clone(), "mem", 4096),
            queue: q.queue,
            event: q.event,
            shared: self.shared.clone(),
            discard: self.discard.clone(),
        };
        self.shared.interrupt.set(Some(interrupt));
        self.worker = Some(
            Worker::spawn(lifecycle::threads::Device::Mem, "virtio-mem", handler)
                .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
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
        let o = self.shared.opts;
        let b = self.shared.lock();
        Some(serde_json::json!({
            "addr": o.addr,
            "region_size": o.size,
            "block_size": o.block_size,
            "requested_size": b.requested,
            "plugged": b.runs(o.blocks()),
        }))
    }

    fn restore_backend(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let o = self.shared.opts;
        let num = |name: &str| -> Result<u64, String> {
            state
                .get(name)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| format!("virtio-mem state: {name} is missing or not a number"))
        };
        for (name, want) in [
            ("addr", o.addr),
            ("region_size", o.size),
            ("block_size", o.block_size),
        ] {
            let got = num(name)?;
            if got != want {
                return Err(format!(
                    "virtio-mem state: {name} {got:#x} differs from this VM's {want:#x}"
                ));
            }
        }
        let requested = num("requested_size")?;
        if requested > o.size || !requested.is_multiple_of(o.block_size) {
            return Err(format!(
                "virtio-mem state: requested_size {requested:#x} is not whole blocks of the region"
            ));
        }
        let runs: Vec<(u64, u64)> = state
            .get("plugged")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| format!("virtio-mem state: plugged: {e}"))?
            .ok_or("virtio-mem state: plugged is missing")?;
        let mut blocks = Blocks::new(o.blocks());
        blocks.requested = requested;
        // Runs in order, apart and within the region (as `save_backend` writes them): setting
        // them costs at most one step per block, whatever the state holds.
        let mut next = 0u64;
        for (first, n) in runs {
            if n == 0 || first < next || first.checked_add(n).is_none_or(|end| end > o.blocks()) {
                return Err(format!(
                    "virtio-mem state: plugged blocks {first}+{n} are empty, out of order or leave the region's {} blocks",
                    o.blocks()
                ));
            }
            (first..first + n).for_each(|b| blocks.set(b, true));
            next = first + n + 1;
        }
        *self.shared.lock() = blocks;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
