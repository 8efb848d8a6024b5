//! Transports.

pub mod mmio;
