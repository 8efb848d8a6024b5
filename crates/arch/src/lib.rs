//! x86_64 machine description for tern: guest memory layout, e820, kernel loading (Linux
//! 64-bit boot protocol and PVH), boot vCPU state, CPUID, the MP table and the ACPI tables
//! (the DSDT's device descriptions come from the devices themselves).

pub mod acpi;
pub mod acpi_loader;
pub mod boot;
pub mod bzimage;
pub mod cpuid;
pub mod firmware;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod regs;

/// The guest memory type tern uses everywhere.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
