//! The transports' snapshot record: what a snapshot keeps of a device's transport.
//!
//! Pure data, a leaf module: it imports no other transport module. [`TransportState`] is what
//! [`VirtioCore`](super::core::VirtioCore) saves and restores for both transports; its `pci`
//! field is virtio-pci's extension ([`PciState`]), which only `pci.rs` fills in and reads.
//!
//! The serde shape is part of the snapshot format: it is the whole of a virtio component's
//! section in layout 1 (snapshot format 2) and its `transport` field in layout 2 (format 3).
//! Field names and nesting must not change, or snapshots written by an earlier tern no longer
//! restore.

use serde::{Deserialize, Serialize};
use virtio_bindings::bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK;

/// The driver's configuration of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Ring position the device starts from at activation (both the next available entry
    /// and the next used one): 0 for a driver's activation, where the device stopped for a
    /// restored snapshot (a paused device has answered every chain it took, so the two are
    /// equal).
    #[serde(default)]
    pub next: u16,
}

impl QueueRegs {
    /// Registers at reset: size = the device's maximum, nothing else set.
    pub fn new(max: u16) -> Self {
        QueueRegs {
            size: max.into(),
            ..Default::default()
        }
    }
}

/// A device's transport state as a snapshot keeps it: what the driver configured, and where
/// each queue stopped. Taken while the device is paused (every chain it took is answered).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransportState {
    pub(crate) device_type: u32,
    pub(crate) status: u32,
    pub(crate) needs_reset: bool,
    pub(crate) driver_features: u64,
    pub(crate) driver_features_unknown: bool,
    pub(crate) queue_select: u32,
    pub(crate) device_features_select: u32,
    pub(crate) driver_features_select: u32,
    pub(crate) queues: Vec<QueueRegs>,
    /// virtio-mmio InterruptStatus, or the virtio-pci ISR.
    pub(crate) interrupt_status: u32,
    pub(crate) config_generation: u32,
    /// virtio-pci only: configuration space and MSI-X.
    pub(crate) pci: Option<PciState>,
}

impl TransportState {
    /// (guest address, length) of the used ring of every queue the device serves: the
    /// device writes them through the memory API, not through a buffer the driver gave.
    pub fn used_rings(&self) -> Vec<(u64, u64)> {
        let live = self.status & DRIVER_OK != 0 && !self.needs_reset;
        self.queues
            .iter()
            .filter(|q| live && q.ready)
            .map(|q| (q.device, 6 + 8 * u64::from(q.size)))
            .collect()
    }
}

/// The virtio-pci part of a [`TransportState`]: configuration space and MSI-X. Written and
/// read by the virtio-pci transport only.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PciState {
    /// The start of configuration space (header and capabilities), as the guest would read it.
    pub config: Vec<u8>,
    pub msix_table: Vec<u8>,
    /// Vectors raised while masked, not yet delivered.
    #[serde(default)]
    pub msix_pending: Vec<u64>,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
}
