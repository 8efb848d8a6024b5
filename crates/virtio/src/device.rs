//! The trait every virtio device implements, and how it signals the guest.

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::VmMemory;

/// What an interrupt is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device used buffers of this queue.
    Queue(u16),
    /// The device configuration changed.
    Config,
}

/// Signals the guest. The transport provides it: virtio-mmio sets its interrupt status
/// register and fires its irqfd; virtio-pci fires the MSI-X vector's irqfd (or INTx).
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt for `kind`.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
}

/// A queue handed to an activated device.
pub struct QueueEvent {
    /// The queue as the driver configured it.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue (an ioeventfd).
    pub event: EventFd,
}

/// Why activation failed.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured something the device cannot use.
    #[error("bad queue configuration: {0}")]
    BadQueue(String),
    /// The device could not start its worker.
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// virtio device type (1 net, 2 blk, 3 console, 4 rng, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// How many of the queues a driver must enable; a multiqueue device lets the driver use
    /// only the first ones (Linux uses one per vCPU) and is activated with those.
    fn min_queues(&self) -> usize {
        self.queue_max_sizes().len()
    }
    /// Features the device offers (must include `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of [`features`](Self::features)).
    fn ack_features(&mut self, features: u64);
    /// Reads device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device: from now on it serves `queues` on its own thread and signals the
    /// guest through `interrupt`. `mem` is the VM's memory: the device takes its current view
    /// per request and marks what it writes in its dirty log.
    fn activate(
        &mut self,
        mem: VmMemory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<QueueEvent>,
    ) -> Result<(), ActivateError>;
    /// Stops the device (worker thread joined, queues dropped) for a driver reset.
    fn reset(&mut self);
    /// Stops the device's workers between requests, once in-flight I/O has completed: while
    /// paused the device does not touch guest memory or raise interrupts. Returns false if
    /// they were not all stopped by `deadline` (I/O that hangs): the caller then resumes the
    /// device, which goes on as if never paused.
    fn pause(&mut self, _deadline: std::time::Instant) -> bool {
        true
    }
    /// Lets the device's workers go on after [`pause`](Self::pause).
    fn resume(&mut self) {}
    /// Whether the device found the driver's input malformed and needs a reset.
    fn broken(&self) -> bool {
        false
    }
    /// The back-end's own state worth keeping in a snapshot (beyond what the transport keeps
    /// and the configuration reopens), if any; the device is paused.
    fn save_backend(&self) -> Option<serde_json::Value> {
        None
    }
    /// Puts back what [`save_backend`](Self::save_backend) returned, before the transport
    /// restores its registers and restarts the device (possibly hostile: check it). The
    /// transport resets the device on the way: [`reset`](Self::reset) must keep back-end state.
    fn restore_backend(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let _ = state;
        Ok(())
    }
}
