//! tern's control API as data, for the VMM that serves it and for every client: the VM
//! configuration ([`config::VmConfig`]), the restore request ([`restore::RestoreOptions`]) and
//! the answers ([`VmInfo`], [`Counters`], [`ErrorBody`]) and their Prometheus form
//! ([`metrics`]); and the one client of the API's
//! Unix socket ([`client`]). Nothing here knows KVM or the server.

pub mod balloon;
pub mod client;
pub mod config;
pub mod devices;
pub mod firecracker;
pub mod firmware;
pub mod metrics;
pub mod migrate;
pub mod resize;
pub mod responses;
pub mod restore;

pub use config::VmConfig;
pub use responses::{
    Counters, DeviceCounters, ErrorBody, ProcessCounters, VcpuCounters, VmInfo, VmState,
};
