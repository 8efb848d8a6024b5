//! One VM's life in tern: configuration, building the VM, its components, vCPU threads and the
//! event loop. `docs/architecture.md` walks through the crates and this one's modules.

pub mod api;
pub mod builder;
#[cfg(test)]
mod component_tests;
pub mod components;
pub mod config;
pub mod console;
pub mod control;
pub mod error;
pub mod host;
pub mod interrupts;
pub mod memory;
pub mod platform;
pub mod runner;
pub mod signals;
pub mod snapshot;
pub mod terminal;
pub mod vcpu;
pub mod vcpus;
pub mod virtio_devices;
pub mod vm;
pub mod vmgenid;

pub use config::VmConfig;
pub use control::VmExit;
pub use error::VmmError;
pub use runner::run;
pub use snapshot::Restore;
