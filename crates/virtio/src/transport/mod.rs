//! Transports: how a driver reaches a device.
//!
//! Split by what varies:
//!
//! - `core` (`VirtioCore`) owns the device and the virtio 1.x state machine, whatever the
//!   register layout: device status, feature selects and the driver's features, queue select
//!   and the per-queue registers, the queue notification eventfds, the interrupt status and
//!   configuration generation, activation at DRIVER_OK, reset, failure (DEVICE_NEEDS_RESET
//!   with the configuration change notification the spec asks for), and saving and restoring
//!   the shared part of a [`TransportState`].
//! - [`mmio`] owns the virtio-mmio register window (decoding it into calls on the core) and
//!   its interrupt delivery: InterruptStatus/InterruptACK and the irqfd.
//! - [`pci`] owns PCI configuration space and its capabilities, BAR 0's layout (common
//!   configuration, ISR, notifications, MSI-X table and PBA), and its interrupt delivery:
//!   read-to-clear ISR, MSI-X vectors and INTx; its part of a snapshot is the `pci` field of
//!   [`TransportState`].
//! - `state` holds the snapshot record both save into: data only, no module imports it back.

mod core;
pub mod mmio;
pub mod pci;
mod state;

pub use state::TransportState;

/// What the VMM does to the device behind a transport while the VM is paused.
pub trait PauseDevice: Send {
    /// Pauses the device (see [`VirtioDevice::pause`](crate::VirtioDevice::pause)); false if
    /// it did not stop by `deadline`.
    fn pause_device(&mut self, deadline: std::time::Instant) -> bool;
    /// Resumes the device.
    fn resume_device(&mut self);
    /// The transport's state, for a snapshot; the device must be paused.
    fn save_state(&self) -> TransportState;
    /// Puts a saved state into a freshly created transport of the same device (before any
    /// vCPU runs), activating the device where the driver had: its queues go on from where
    /// they stopped. Guest memory must hold the snapshot's contents already.
    fn restore_state(&mut self, state: &TransportState) -> Result<(), String>;
}
