//! Transports.

mod common;
pub use common::TransportState;
pub mod mmio;
pub mod pci;

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
