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

pub use state::TransportState;

/// What the VMM does to the device behind a transport while the VM is paused. Each transport
/// is also a [`lifecycle::Component`] built on it (see [`component`]).
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
    /// The device behind the transport.
    fn device(&self) -> &dyn crate::VirtioDevice;
    /// The device behind the transport, to change.
    fn device_mut(&mut self) -> &mut dyn crate::VirtioDevice;
}

/// A virtio device as a component of its VM: the transport and the device back-end together.
pub mod component {
    use std::time::Instant;

    use lifecycle::Section;
    use serde::{Deserialize, Serialize};

    use super::{PauseDevice, TransportState};

    /// Layout 2 of a virtio component's state: the transport's, and the back-end's own.
    /// Layout 1 (snapshot format 2) was the transport's state alone.
    #[derive(Serialize, Deserialize)]
    struct State {
        transport: TransportState,
        #[serde(default)]
        device: Option<serde_json::Value>,
    }

    /// [`lifecycle::Component::pause`] for a transport.
    pub fn pause(t: &mut dyn PauseDevice, deadline: Instant) -> Result<(), String> {
        if t.pause_device(deadline) {
            Ok(())
        } else {
            Err("did not finish its in-flight I/O and stop".into())
        }
    }

    /// [`lifecycle::Component::save`] for a transport.
    pub fn save(t: &dyn PauseDevice, id: &str) -> Result<Option<Section>, String> {
        let state = State {
            transport: t.save_state(),
            device: t.device().save_backend(),
        };
        Section::new(id, 2, &state).map(Some)
    }

    /// [`lifecycle::Component::restore`] for a transport: the back-end first, then the
    /// transport, which restarts the device where the driver had it.
    pub fn restore(t: &mut dyn PauseDevice, section: &Section) -> Result<(), String> {
        let state = if section.version == 1 {
            State {
                transport: section.parse(&[1])?,
                device: None,
            }
        } else {
            section.parse(&[2])?
        };
        if let Some(d) = &state.device {
            t.device_mut().restore_backend(d)?;
        }
        t.restore_state(&state.transport)
    }

    /// [`lifecycle::Component::written_memory`] for a transport: the used rings of the
    /// queues it serves (the device writes them through the memory API, not through buffers
    /// the driver gave).
    pub fn written_memory(t: &dyn PauseDevice) -> Vec<(u64, u64)> {
        t.save_state().used_rings()
    }
}

/// Makes a transport type a [`lifecycle::Component`] through [`component`].
macro_rules! transport_component {
    ($t:ty) => {
        impl lifecycle::Component for $t {
            fn pause(&mut self, deadline: std::time::Instant) -> Result<(), String> {
                $crate::transport::component::pause(self, deadline)
            }
            fn resume(&mut self) {
                $crate::transport::PauseDevice::resume_device(self);
            }
            fn save(&mut self, id: &str) -> Result<Option<lifecycle::Section>, String> {
                $crate::transport::component::save(self, id)
            }
            fn restore(&mut self, section: &lifecycle::Section) -> Result<(), String> {
                $crate::transport::component::restore(self, section)
            }
            fn written_memory(&mut self) -> Vec<(u64, u64)> {
                $crate::transport::component::written_memory(self)
            }
        }
    };
}
pub(crate) use transport_component;

mod core;
pub mod mmio;
pub mod pci;
mod state;
