//! What the virtio-mmio and virtio-pci transports share: the driver's per-queue registers,
//! feature acceptance, and handing the device its queues at DRIVER_OK.

use std::sync::Arc;

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::{GuestMemoryMmap, Interrupt, QueueEvent, VirtioDevice};

/// The driver's configuration of one queue.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct QueueRegs {
    /// Queue size the driver chose (the register is 32 bits wide on virtio-mmio).
    pub size: u32,
    /// QueueReady (mmio) / queue_enable (pci).
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (available) ring address.
    pub driver: u64,
    /// Device (used) ring address.
    pub device: u64,
}

impl QueueRegs {
    /// Registers at reset: size = the device's maximum, nothing else set.
    pub fn new(max: u16) -> Self {
        QueueRegs {
            size: max.into(),
            ..Default::default()
        }
    }

    /// The queue these registers describe, validated against `mem`.
    pub fn build(&self, max: u16, event_idx: bool, mem: &GuestMemoryMmap) -> Result<Queue, String> {
        if !self.ready {
            return Err("not ready".into());
        }
        let e = |e: virtio_queue::Error| e.to_string();
        let mut q = Queue::new(max).map_err(e)?;
        let size = u16::try_from(self.size).map_err(|_| format!("size {}", self.size))?;
        q.try_set_size(size).map_err(e)?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(e)?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(e)?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(e)?;
        q.set_ready(true);
        q.set_event_idx(event_idx);
        if !q.is_valid(mem) {
            return Err("rings outside guest memory".into());
        }
        Ok(q)
    }
}

/// Whether the driver's feature choice can be accepted: VERSION_1 set, nothing the device did
/// not offer, no bit above 63 (`unknown`).
pub(crate) fn features_acceptable(
    transport: &str,
    driver: u64,
    unknown: bool,
    offered: u64,
) -> bool {
    if unknown || driver & !offered != 0 || driver & (1 << VIRTIO_F_VERSION_1) == 0 {
        tracing::warn!("{transport}: driver features {driver:#x} refused (offered {offered:#x})");
        return false;
    }
    true
}

/// Builds every queue from the driver's registers and activates the device with them.
pub(crate) fn activate(
    device: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    regs: &[QueueRegs],
    notify: &[EventFd],
    driver_features: u64,
) -> Result<(), String> {
    let event_idx = driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
    let maxes = device.queue_max_sizes().to_vec();
    let mut queues = Vec::with_capacity(maxes.len());
    for (i, ((r, max), n)) in regs.iter().zip(maxes).zip(notify).enumerate() {
        let queue = r
            .build(max, event_idx, mem)
            .map_err(|e| format!("queue {i}: {e}"))?;
        let event = n.try_clone().map_err(|e| e.to_string())?;
        queues.push(QueueEvent { queue, event });
    }
    device
        .activate(mem.clone(), interrupt, queues)
        .map_err(|e| e.to_string())
}
