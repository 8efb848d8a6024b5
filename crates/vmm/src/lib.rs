//! One VM's life in tern: configuration, building the VM, vCPU threads and the event loop.

pub mod api;
pub mod config;
pub mod host;
pub mod interrupts;
pub mod snapshot;
pub mod terminal;
pub mod vcpu;
pub mod virtio_devices;
pub mod vm;
pub mod vmgenid;

pub use config::VmConfig;
pub use vm::{run, Restore, VmExit, VmmError};
