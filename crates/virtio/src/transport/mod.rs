//! Transports.

mod common;
pub mod mmio;
pub mod pci;

/// What the VMM does to the device behind a transport while the VM is paused.
pub trait PauseDevice: Send {
    /// Pauses the device (see [`VirtioDevice::pause`](crate::VirtioDevice::pause)).
    fn pause_device(&mut self);
    /// Resumes the device.
    fn resume_device(&mut self);
}
