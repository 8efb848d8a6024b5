//! PCI for tern: a bus-0 root complex (host bridge at 00.0 plus up to 31 single-function
//! endpoints), type-0 configuration space with BAR sizing and capability lists, configuration
//! access through the legacy 0xCF8/0xCFC ports and through ECAM, and MSI-X.
//!
//! Why in-tree: rust-vmm has no PCI crate; Cloud Hypervisor's and crosvm's `pci` crates are
//! tied to their own device managers, buses and hypervisor layers. What a VMM needs from PCI
//! is small enough to own here, shaped for tern's [`Bus`](crate::Bus).
//!
//! Shape:
//! - A device implements [`PciDevice`]: it owns its [`PciConfiguration`] (and, if it has
//!   MSI-X, an [`MsixState`]) and serves accesses to its BARs.
//! - [`PciRoot`] holds the devices by slot, places their BARs in the windows the VMM gives it
//!   and routes configuration accesses; [`PciConfigIo`] (PIO 0xCF8..0xD00) and
//!   [`PciConfigMmio`] (ECAM) are the two [`BusDevice`](crate::BusDevice)s that reach it.
//! - [`PciBarBusDevice`] is what the VMM puts on its MMIO (or PIO) bus at each BAR's address.
//! - A guest that re-programs a BAR produces a [`BarRelocation`] (one per BAR until drained)
//!   the VMM drains from [`PciRoot::take_bar_relocations`] to move the bus range and any
//!   ioeventfds.
//! - MSI-X state changes reach the VMM through the [`MsiRouting`] trait it implements (KVM
//!   GSI routes + irqfds).
//!
//! Lock order: `PciRoot` before a device; a device's lock before its MSI-X state; nothing in
//! here ever locks the root from a device. [`MsiRouting`] implementations must not lock the
//! root or a device.

pub mod config;
pub mod msix;
pub mod root;

pub use config::{BarKind, PciConfigError, PciConfiguration, PciHeader};
pub use msix::{MsiMessage, MsiRouting, MsixState};
pub use root::{
    PciBarBusDevice, PciConfigIo, PciConfigMmio, PciRoot, PciRootError, PciWindows,
    RelocationNotifier, ECAM_BUS_SIZE, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN,
};

/// A PCI address: bus, device (slot) and function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciBdf {
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0..32.
    pub device: u8,
    /// Function number, 0..8.
    pub function: u8,
}

impl PciBdf {
    /// `bus:device.function`.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        PciBdf {
            bus,
            device,
            function,
        }
    }
}

impl std::fmt::Display for PciBdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{}",
            self.bus, self.device, self.function
        )
    }
}

/// One base address register of a device, as currently programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR index, 0..6 (a 64-bit BAR also uses `index + 1`).
    pub index: u8,
    /// Address space and width.
    pub kind: BarKind,
    /// Whether the BAR is marked prefetchable (memory BARs only).
    pub prefetchable: bool,
    /// Guest-physical (memory) or port (I/O) address; 0 until assigned.
    pub addr: u64,
    /// Size in bytes, a power of two.
    pub size: u64,
}

impl BarInfo {
    /// Whether the BAR lives in port I/O space.
    pub fn is_io(&self) -> bool {
        self.kind == BarKind::Io
    }
}

/// A guest write moved a BAR: the VMM should move the bus range `[old_addr, +size)` to
/// `[new_addr, +size)` (and any ioeventfds inside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRelocation {
    /// The device. [`PciConfiguration::write`] leaves it at 00:00.0; [`PciRoot`] fills it in.
    pub bdf: PciBdf,
    /// The BAR index.
    pub bar: u8,
    /// Address space and width.
    pub kind: BarKind,
    /// Where the BAR was.
    pub old_addr: u64,
    /// Where the guest put it.
    pub new_addr: u64,
    /// BAR size.
    pub size: u64,
}

/// A PCI function that [`PciRoot`] can host.
///
/// Register offsets are within the function's 4 KiB configuration space; accesses are 1, 2
/// or 4 bytes and never cross a dword boundary ([`PciRoot`] guarantees this). BAR offsets are
/// relative to the BAR's base; the sizes are whatever the guest used (1 to 8 bytes).
/// All values come from the guest: never panic on them.
pub trait PciDevice: Send {
    /// Reads configuration space.
    fn config_read(&mut self, reg: u16, data: &mut [u8]);
    /// Writes configuration space; returns the BAR move the write caused, if any.
    fn config_write(&mut self, reg: u16, data: &[u8]) -> Option<BarRelocation>;
    /// The device's BARs, as currently programmed.
    fn bars(&self) -> Vec<BarInfo>;
    /// Places BAR `bar` at `addr` (the VMM's initial placement, done by [`PciRoot::attach`]).
    fn set_bar_address(&mut self, bar: u8, addr: u64);
    /// A guest read inside BAR `bar`.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// A guest write inside BAR `bar`.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
}
