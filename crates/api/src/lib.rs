//! tern's control API as data, for the VMM that serves it and for every client: the VM
//! configuration ([`config::VmConfig`]) and the restore request ([`restore::RestoreOptions`]).
//! Nothing here knows KVM or the server.

pub mod config;
pub mod restore;

pub use config::VmConfig;
