//! Transports.

mod common;
pub mod mmio;
pub mod pci;
