//! One VM's life in tern: building the VM from its configuration, its components, vCPU threads
//! and the event loop. The configuration itself lives in the `api` crate (re-exported here as
//! [`config`]). `docs/architecture.md` walks through the crates and this one's modules.

pub mod api;
pub mod balloon;
pub mod builder;
#[cfg(test)]
mod component_tests;
pub mod components;
pub mod confinement;
pub mod console;
pub mod control;
pub mod cpu_hotplug;
pub mod device_manager;
pub mod device_set;
pub mod device_updates;
pub mod error;
pub mod firmware;
pub mod host;
pub mod hotplug;
pub mod interrupts;
pub mod intx;
#[cfg(test)]
mod layout_tests;
pub mod machined;
pub mod memory;
pub mod migration;
pub mod pci_hotplug;
pub mod personality;
pub mod platform;
pub mod resize;
pub mod runner;
pub mod signals;
pub mod snapshot;
pub mod states;
pub mod sync;
pub mod systemd;
pub mod terminal;
pub mod unix_socket;
pub mod vcpu;
pub mod vcpu_cgroups;
pub mod vcpus;
pub mod virtio_devices;
pub mod virtio_pci;
pub mod vm;
pub mod vmgenid;

pub use ::api::config;
pub use config::VmConfig;
pub use control::VmExit;
pub use error::VmmError;
pub use runner::run;
pub use snapshot::Restore;

// The configuration checks its limits without the memory layout; they must agree.
const _: () = assert!(config::MIN_MEMORY == arch::layout::MIN_MEMORY);
const _: () = assert!(config::MAX_MEMORY == arch::layout::MAX_MEMORY);
const _: () = assert!(config::CMDLINE_MAX_SIZE == arch::layout::CMDLINE_MAX_SIZE);
