//! virtio for tern: the device-side core shared by all devices (feature negotiation, status,
//! queues from the `virtio-queue` crate), the virtio-mmio and virtio-pci transports, and the
//! devices (rng, console, blk, net).
//!
//! Shape: a transport owns a `Box<dyn VirtioDevice>` and implements the register interface the
//! guest sees (a [`::devices::BusDevice`]). When the driver sets DRIVER_OK, the transport hands
//! the device its queues, each with the eventfd the VMM registered as an ioeventfd for that
//! queue's notification address, plus an [`Interrupt`] to signal the guest (an irqfd). The
//! device runs its own worker thread from then on: the vCPU thread never runs device code.
//!
//! Guest memory is one [`VmMemory`] per VM, shared by its transports and devices: each device
//! takes the current view per request, so a region added later is seen everywhere, and marks
//! what it writes in the VM's dirty log (for diff snapshots).
//!
//! Guest memory and every descriptor are hostile input: a device that finds a malformed chain
//! marks itself broken (DEVICE_NEEDS_RESET) rather than panicking or looping.

pub mod device;
pub mod devices;
pub mod dirty;
pub mod memory;
pub mod transport;

#[cfg(test)]
mod testing;

pub use device::{ActivateError, Interrupt, InterruptKind, QueueEvent, VirtioDevice};
pub use memory::VmMemory;

/// The guest memory type devices access.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
