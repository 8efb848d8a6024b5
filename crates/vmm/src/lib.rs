//! One VM's life in tern: building the VM from its configuration, vCPU threads and the event
//! loop. The configuration itself lives in the `api` crate (re-exported here as [`config`]).

pub mod api;
pub mod host;
pub mod interrupts;
pub mod snapshot;
pub mod terminal;
pub mod vcpu;
pub mod virtio_devices;
pub mod vm;
pub mod vmgenid;

pub use ::api::config;
pub use config::VmConfig;
pub use vm::{run, Restore, VmExit, VmmError};

// The configuration checks its limits without the memory layout; they must agree.
const _: () = assert!(config::MIN_MEMORY == arch::layout::MIN_MEMORY);
const _: () = assert!(config::MAX_MEMORY == arch::layout::MAX_MEMORY);
const _: () = assert!(config::CMDLINE_MAX_SIZE == arch::layout::CMDLINE_MAX_SIZE);
