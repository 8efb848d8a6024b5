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
/// The PCI host bridge as the DSDT describes it: `\_SB_.PCI0` (`PNP0A08`, compatible with
/// `PNP0A03`) with its bus range, the configuration ports, the I/O ranges around them and the
/// 32-bit memory window for BARs, and a `_PRT` sending each slot's INTA# straight to a GSI
/// (no link devices; level-triggered, active-low, as PCI interrupts are).
pub struct HostBridgeAcpi {
    /// Last bus number.
    pub last_bus: u8,
    /// The 32-bit MMIO window: start and end (exclusive).
    pub mmio32: (u64, u64),
    /// A window above 4 GiB, if any: start and end (exclusive).
    pub mmio64: Option<(u64, u64)>,
    /// (slot, GSI) of each slot's INTA#.
    pub intx: Vec<(u8, u32)>,
}

impl acpi_tables::Aml for HostBridgeAcpi {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        use acpi_tables::{aml, Aml};
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
        let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
        let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
        let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
        let buses = aml::AddressSpace::new_bus_number(0u16, u16::from(self.last_bus));
        let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
        let io_lo = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
        let io_hi = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
        let mem32 = aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            self.mmio32.0 as u32,
            (self.mmio32.1 - 1) as u32,
            None,
        );
        let mem64 = self.mmio64.map(|(start, end)| {
            aml::AddressSpace::new_memory(
                aml::AddressSpaceCacheable::NotCacheable,
                true,
                start,
                end - 1,
                None,
            )
        });
        let mut resources: Vec<&dyn Aml> = vec![&buses, &cfg_io, &io_lo, &io_hi, &mem32];
        if let Some(m) = &mem64 {
            resources.push(m);
        }
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(resources));
        let rows: Vec<(u32, u32)> = self
            .intx
            .iter()
            .map(|&(slot, gsi)| ((u32::from(slot) << 16) | 0xffff, gsi))
            .collect();
        let zero: u8 = 0;
        let pkgs: Vec<aml::Package> = rows
            .iter()
            .map(|(adr, gsi)| aml::Package::new(vec![adr, &zero, &zero, gsi]))
            .collect();
        let refs: Vec<&dyn Aml> = pkgs.iter().map(|p| p as &dyn Aml).collect();
        let prt = aml::Name::new("_PRT".into(), &aml::Package::new(refs));
        aml::Device::new(
            "_SB_.PCI0".into(),
            vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt],
        )
        .to_aml_bytes(sink);
    }
}
