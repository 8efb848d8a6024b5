//! The PCI root complex: bus 0 with a host bridge at 00.0 and up to 31 single-function
//! endpoints, BAR placement in the windows the VMM provides, and the two ways a guest reaches
//! configuration space: the legacy 0xCF8/0xCFC port pair ([`PciConfigIo`]) and ECAM
//! ([`PciConfigMmio`]).
//!
//! Configuration accesses are split into pieces that do not cross a dword boundary before they
//! reach a device. Accesses to an absent bus, device or function read all-ones and drop
//! writes, which is how a guest enumerates.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use vm_allocator::{AddressAllocator, AllocPolicy};

use super::config::{PciConfiguration, PciHeader, EXTENDED_CONFIG_SPACE_SIZE};
use super::{BarInfo, BarKind, BarRelocation, PciBdf, PciDevice};
use crate::BusDevice;

/// PIO base of the legacy configuration mechanism (address at 0xCF8, data at 0xCFC..0xD00).
pub const PCI_CONFIG_IO_BASE: u64 = 0xcf8;
/// Length of the legacy configuration port range.
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// ECAM bytes per bus (32 devices x 8 functions x 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Number of device slots on a bus.
pub const PCI_SLOTS: usize = 32;

/// Host bridge identity (an Intel device ID commonly used for virtual host bridges).
const HOST_BRIDGE_VENDOR: u16 = 0x8086;
const HOST_BRIDGE_DEVICE: u16 = 0x0d57;
const HOST_BRIDGE_CLASS: u32 = 0x06_00_00;
/// The i440FX host bridge's device ID, which a PC firmware (OVMF) recognises.
const I440FX_DEVICE: u16 = 0x1237;
/// Where the PIIX4 power-management function sits (00:01.3) and its identity.
const PIIX4_PM_BDF: PciBdf = PciBdf {
    bus: 0,
    device: 1,
    function: 3,
};
const PIIX4_PM_DEVICE: u16 = 0x7113;
/// The PIIX3 PCI-to-ISA bridge at 00:01.0 of a PC-identity root: OVMF finds the serial ports
/// (and its console on COM1) below an ISA bridge.
const ISA_BRIDGE_SLOT: usize = 1;
const PIIX3_ISA_DEVICE: u16 = 0x7000;
const ISA_BRIDGE_CLASS: u32 = 0x06_01_00;
const PIIX4_PM_CLASS: u32 = 0x06_80_00;
/// PIIX4 PM: the PM I/O base register (bit 0 reads as one: an I/O address).
const PIIX4_PMBA: usize = 0x40;
/// PIIX4 PM: miscellaneous power management, bit 0 = PM I/O space enabled.
const PIIX4_PMREGMISC: usize = 0x80;

/// Config address register: enable bit.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Config address register: the bits that are kept (enable, bus, device, function, dword).
const CONFIG_ADDRESS_MASK: u32 = CONFIG_ADDRESS_ENABLE | 0x00ff_fffc;

/// Address windows the root places BARs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciWindows {
    /// 32-bit memory window (e.g. 0xc000_0000..0xe000_0000): 32-bit BARs, and 64-bit BARs
    /// when there is no `mmio64` window.
    pub mmio32: Range<u64>,
    /// Optional window above 4 GiB for 64-bit BARs.
    pub mmio64: Option<Range<u64>>,
    /// Optional port I/O window for I/O BARs.
    pub io: Option<Range<u64>>,
}

/// Errors of attaching devices (VMM configuration mistakes, not guest input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciRootError {
    /// Every slot 1..32 is taken.
    #[error("no free PCI slot")]
    NoFreeSlot,
    /// Slot 0 (the host bridge) or a slot number of 32 or more.
    #[error("PCI slot {0} cannot hold a device")]
    BadSlot(u8),
    /// The slot already holds a device.
    #[error("PCI slot {0} is already in use")]
    SlotInUse(u8),
    /// A window is empty or invalid.
    #[error("invalid PCI window {start:#x}..{end:#x}")]
    BadWindow {
        /// Window start.
        start: u64,
        /// Window end (exclusive).
        end: u64,
    },
    /// A BAR does not fit in its window.
    #[error("no room for BAR {bar} ({kind:?}, {size:#x} bytes) of {bdf}")]
    NoBarSpace {
        /// The device.
        bdf: PciBdf,
        /// The BAR.
        bar: u8,
        /// Its kind.
        kind: BarKind,
        /// Its size.
        size: u64,
    },
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a device panicked earlier; keep serving the guest.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn allocator(w: &Range<u64>) -> Result<AddressAllocator, PciRootError> {
    let bad = PciRootError::BadWindow {
        start: w.start,
        end: w.end,
    };
    if w.end <= w.start {
        return Err(bad);
    }
    AddressAllocator::new(w.start, w.end - w.start).map_err(|_| bad)
}

/// Called for each guest BAR move (see [`PciRoot::set_relocation_notifier`]).
pub type RelocationNotifier = Box<dyn Fn(&BarRelocation) + Send>;

/// Bus 0 of a PCI root complex.
pub struct PciRoot {
    host_bridge: PciConfiguration,
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
    mmio32: AddressAllocator,
    mmio64: Option<AddressAllocator>,
    io: Option<AddressAllocator>,
    /// Undrained BAR moves, one per BAR at most (see [`Self::record`]).
    relocations: Vec<BarRelocation>,
    on_relocation: Option<RelocationNotifier>,
    /// Where [`attach_at`](Self::attach_at) placed each slot's BARs, to give back on detach.
    placed: Vec<Vec<(BarInfo, u64)>>,
    /// The PIIX4 PM function's configuration space, on a PC-identity root.
    piix4_pm: Option<Box<[u8; 256]>>,
    /// The ISA bridge at 00:01.0, on a PC-identity root.
    isa_bridge: Option<PciConfiguration>,
}

impl PciRoot {
    /// A root with only its host bridge, placing BARs in `windows`.
    pub fn new(windows: &PciWindows) -> Result<Self, PciRootError> {
        let host_bridge = PciConfiguration::new(&PciHeader {
            vendor_id: HOST_BRIDGE_VENDOR,
            device_id: HOST_BRIDGE_DEVICE,
            class_code: HOST_BRIDGE_CLASS,
            ..Default::default()
        });
        Ok(PciRoot {
            host_bridge,
            slots: (0..PCI_SLOTS).map(|_| None).collect(),
            mmio32: allocator(&windows.mmio32)?,
            mmio64: windows.mmio64.as_ref().map(allocator).transpose()?,
            io: windows.io.as_ref().map(allocator).transpose()?,
            relocations: Vec::new(),
            on_relocation: None,
            placed: (0..PCI_SLOTS).map(|_| Vec::new()).collect(),
            piix4_pm: None,
            isa_bridge: None,
        })
    }

    /// Makes the root look like the PC chipset OVMF (the UEFI firmware of a PC) supports: the
    /// host bridge reads as an i440FX, 00:01.0 as the PIIX3 ISA bridge (OVMF puts its console
    /// on the COM1 it finds below it), and 00:01.3 as the PIIX4 power-management function with
    /// its PM I/O block already enabled at `pm_base` (read-only: firmware and OS take it as
    /// found). The ISA bridge is single-function, so only OVMF, which reads 00:01.3 by its
    /// address, sees the PM function; operating systems never enumerate it. Call it before
    /// attaching devices: slot 1 is the bridge's.
    pub fn set_pc_identity(&mut self, pm_base: u16) {
        self.host_bridge = PciConfiguration::new(&PciHeader {
            vendor_id: HOST_BRIDGE_VENDOR,
            device_id: I440FX_DEVICE,
            class_code: HOST_BRIDGE_CLASS,
            ..Default::default()
        });
        let mut c = Box::new([0u8; 256]);
        c[0..2].copy_from_slice(&HOST_BRIDGE_VENDOR.to_le_bytes());
        c[2..4].copy_from_slice(&PIIX4_PM_DEVICE.to_le_bytes());
        c[8..12].copy_from_slice(&(PIIX4_PM_CLASS << 8).to_le_bytes());
        c[PIIX4_PMBA..PIIX4_PMBA + 4].copy_from_slice(&(u32::from(pm_base) | 1).to_le_bytes());
        c[PIIX4_PMREGMISC] = 1;
        self.piix4_pm = Some(c);
        self.isa_bridge = Some(PciConfiguration::new(&PciHeader {
            vendor_id: HOST_BRIDGE_VENDOR,
            device_id: PIIX3_ISA_DEVICE,
            class_code: ISA_BRIDGE_CLASS,
            ..Default::default()
        }));
    }

    /// Whether `slot` holds a device or the ISA bridge.
    fn slot_taken(&self, slot: usize) -> bool {
        self.slots[slot].is_some() || (slot == ISA_BRIDGE_SLOT && self.isa_bridge.is_some())
    }

    /// Attaches `dev` at the first free slot and places its BARs; returns its address.
    pub fn attach(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<PciBdf, PciRootError> {
        let slot = (1..PCI_SLOTS)
            .find(|&s| !self.slot_taken(s))
            .ok_or(PciRootError::NoFreeSlot)?;
        self.attach_at(slot as u8, dev)
    }

    /// Attaches `dev` at `slot` (1..32) and places its BARs (naturally aligned, largest
    /// first) in the windows; returns its address.
    pub fn attach_at(
        &mut self,
        slot: u8,
        dev: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<PciBdf, PciRootError> {
        let s = usize::from(slot);
        if s == 0 || s >= PCI_SLOTS {
            return Err(PciRootError::BadSlot(slot));
        }
        if self.slot_taken(s) {
            return Err(PciRootError::SlotInUse(slot));
        }
        let bdf = PciBdf::new(0, slot, 0);
        {
            let mut d = lock(&dev);
            let mut bars = d.bars();
            bars.sort_by(|a, b| b.size.cmp(&a.size).then(a.index.cmp(&b.index)));
            let mut placed = Vec::new();
            for bar in bars {
                match self.place(&bar) {
                    Some(addr) => placed.push((bar, addr)),
                    None => {
                        for (b, addr) in placed {
                            self.unplace(&b, addr);
                        }
                        return Err(PciRootError::NoBarSpace {
                            bdf,
                            bar: bar.index,
                            kind: bar.kind,
                            size: bar.size,
                        });
                    }
                }
            }
            for (bar, addr) in &placed {
                d.set_bar_address(bar.index, *addr);
            }
            self.placed[s] = placed;
        }
        self.slots[s] = Some(dev);
        Ok(bdf)
    }

    /// Takes the device at `slot` off the bus (hot unplug): the slot and the space its BARs
    /// were placed in are free again. Returns it.
    pub fn detach(&mut self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        let s = usize::from(slot);
        let dev = self.slots.get_mut(s)?.take()?;
        for (bar, addr) in std::mem::take(&mut self.placed[s]) {
            self.unplace(&bar, addr);
        }
        self.relocations.retain(|r| r.bdf.device != slot);
        Some(dev)
    }

    fn allocator_for(&mut self, kind: BarKind) -> Option<&mut AddressAllocator> {
        match kind {
            BarKind::Io => self.io.as_mut(),
            BarKind::Mem32 => Some(&mut self.mmio32),
            BarKind::Mem64 => Some(match self.mmio64.as_mut() {
                Some(a) => a,
                None => &mut self.mmio32,
            }),
        }
    }

    fn place(&mut self, bar: &BarInfo) -> Option<u64> {
        let a = self.allocator_for(bar.kind)?;
        let r = a
            .allocate(bar.size, bar.size, AllocPolicy::FirstMatch)
            .ok()?;
        Some(r.start())
    }

    fn unplace(&mut self, bar: &BarInfo, addr: u64) {
        let size = bar.size;
        if let Some(a) = self.allocator_for(bar.kind) {
            if let Ok(r) = vm_allocator::RangeInclusive::new(addr, addr + size - 1) {
                let _ = a.free(&r);
            }
        }
    }

    /// The device at `bdf`, if any (not the host bridge).
    pub fn device(&self, bdf: PciBdf) -> Option<Arc<Mutex<dyn PciDevice>>> {
        if bdf.bus != 0 || bdf.function != 0 {
            return None;
        }
        self.slots.get(usize::from(bdf.device))?.clone()
    }

    /// The BARs of the device at `bdf`, each with the bus device to insert at its address
    /// (on the MMIO bus, or the PIO bus for I/O BARs) for `size` bytes.
    pub fn bar_bus_devices(&self, bdf: PciBdf) -> Vec<(BarInfo, Arc<Mutex<dyn BusDevice>>)> {
        let Some(dev) = self.device(bdf) else {
            return Vec::new();
        };
        let bars = lock(&dev).bars();
        bars.into_iter()
            .map(|b| {
                let bd: Arc<Mutex<dyn BusDevice>> =
                    Arc::new(Mutex::new(PciBarBusDevice::new(dev.clone(), b.index)));
                (b, bd)
            })
            .collect()
    }

    /// Called (on the vCPU thread, with the root locked) for every BAR move, e.g. to kick an
    /// eventfd so the VMM's control thread calls [`take_bar_relocations`](Self::take_bar_relocations).
    pub fn set_relocation_notifier(&mut self, f: RelocationNotifier) {
        self.on_relocation = Some(f);
    }

    /// BAR moves the guest made since the last call: at most one per BAR, from where the BAR
    /// was at the last call to where it is now (a BAR moved back where it was is left out).
    pub fn take_bar_relocations(&mut self) -> Vec<BarRelocation> {
        std::mem::take(&mut self.relocations)
    }

    /// Reads configuration space of `bdf` at `reg` (any size; absent functions read ones).
    pub fn config_read(&self, bdf: PciBdf, reg: u16, data: &mut [u8]) {
        let dev = self.target(bdf);
        split_dwords(reg, data.len(), |r, range| {
            let chunk = &mut data[range];
            if usize::from(r) >= EXTENDED_CONFIG_SPACE_SIZE {
                chunk.fill(0xff);
                return;
            }
            match &dev {
                Target::HostBridge => self.host_bridge.read(r, chunk),
                Target::IsaBridge => {
                    if let Some(c) = &self.isa_bridge {
                        c.read(r, chunk);
                    }
                }
                Target::Device(d) => lock(d).config_read(r, chunk),
                Target::Piix4Pm => {
                    let c = self.piix4_pm.as_deref();
                    let at = usize::from(r);
                    for (i, b) in chunk.iter_mut().enumerate() {
                        *b = c.and_then(|c| c.get(at + i)).copied().unwrap_or(0);
                    }
                }
                Target::None => chunk.fill(0xff),
            }
        });
    }

    /// Writes configuration space of `bdf` at `reg` (writes to absent functions are dropped).
    pub fn config_write(&mut self, bdf: PciBdf, reg: u16, data: &[u8]) {
        let dev = self.target(bdf);
        let mut moves = Vec::new();
        split_dwords(reg, data.len(), |r, range| {
            let chunk = &data[range];
            if usize::from(r) >= EXTENDED_CONFIG_SPACE_SIZE {
                return;
            }
            match &dev {
                Target::HostBridge => {
                    self.host_bridge.write(r, chunk);
                }
                Target::IsaBridge => {
                    if let Some(c) = &mut self.isa_bridge {
                        c.write(r, chunk);
                    }
                }
                Target::Device(d) => {
                    if let Some(mut m) = lock(d).config_write(r, chunk) {
                        m.bdf = bdf;
                        moves.push(m);
                    }
                }
                Target::Piix4Pm | Target::None => {}
            }
        });
        for m in moves {
            if let Some(f) = &self.on_relocation {
                f(&m);
            }
            self.record(m);
        }
    }

    /// Adds a move to the record of undrained ones, merged with an earlier move of the same
    /// BAR: the record stays bounded (one entry per BAR) however often the guest moves BARs
    /// and whether or not anyone drains it.
    fn record(&mut self, m: BarRelocation) {
        let same = |p: &BarRelocation| p.bdf == m.bdf && p.bar == m.bar;
        match self.relocations.iter().position(same) {
            Some(i) if self.relocations[i].old_addr == m.new_addr => {
                self.relocations.remove(i);
            }
            Some(i) => {
                let p = &mut self.relocations[i];
                // The bus range is still where the first move found it.
                p.new_addr = m.new_addr;
                p.kind = m.kind;
                p.size = m.size;
            }
            None => self.relocations.push(m),
        }
    }

    fn target(&self, bdf: PciBdf) -> Target {
        if bdf == PIIX4_PM_BDF && self.piix4_pm.is_some() {
            return Target::Piix4Pm;
        }
        if bdf.bus != 0 || bdf.function != 0 {
            return Target::None;
        }
        if bdf.device == 0 {
            return Target::HostBridge;
        }
        if usize::from(bdf.device) == ISA_BRIDGE_SLOT && self.isa_bridge.is_some() {
            return Target::IsaBridge;
        }
        match self.device(bdf) {
            Some(d) => Target::Device(d),
            None => Target::None,
        }
    }
}

enum Target {
    None,
    HostBridge,
    IsaBridge,
    Device(Arc<Mutex<dyn PciDevice>>),
    Piix4Pm,
}

/// Calls `f(reg, range_in_data)` for each piece of `[reg, reg + len)` that stays within one
/// dword; registers past u16 range are passed as `u16::MAX`-clamped values that callers treat
/// as out of range.
fn split_dwords(reg: u16, len: usize, mut f: impl FnMut(u16, Range<usize>)) {
    let mut done = 0;
    while done < len {
        let r = usize::from(reg) + done;
        let n = (4 - r % 4).min(len - done);
        f(u16::try_from(r).unwrap_or(u16::MAX), done..done + n);
        done += n;
    }
}

/// The legacy configuration mechanism #1: a [`BusDevice`] for PIO
/// [`PCI_CONFIG_IO_BASE`]..+[`PCI_CONFIG_IO_LEN`] — the address register at 0xCF8 (dword
/// accesses only; other sizes read ones and are dropped, as 0xCF9 is a different register on
/// real chipsets) and the data window at 0xCFC..0xD00 (byte, word or dword at the offset
/// the register number's low bits select).
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    /// The port pair for `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// Decodes the address register plus the data-port byte offset.
    fn target(&self, data_offset: u64) -> Option<(PciBdf, u16)> {
        if self.address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let a = self.address;
        let bdf = PciBdf::new(
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
        );
        Some((bdf, (a & 0xfc) as u16 + data_offset as u16))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                let Some((bdf, reg)) = self.target(offset - 4) else {
                    return;
                };
                let n = data.len().min((8 - offset) as usize);
                lock(&self.root).config_read(bdf, reg, &mut data[..n]);
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.address = v & CONFIG_ADDRESS_MASK;
            }
            4..=7 => {
                let Some((bdf, reg)) = self.target(offset - 4) else {
                    return;
                };
                let n = data.len().min((8 - offset) as usize);
                lock(&self.root).config_write(bdf, reg, &data[..n]);
            }
            _ => tracing::debug!(
                "pci: ignoring {}-byte write at {:#x}",
                data.len(),
                PCI_CONFIG_IO_BASE + offset
            ),
        }
    }
}

/// What a snapshot keeps of the root complex: the configuration-address latch (a guest may be
/// paused between writing 0xcf8 and reading 0xcfc) and the host bridge's standard header
/// (its command register and the like; the functions keep their own).
#[derive(serde::Serialize, serde::Deserialize)]
struct RootState {
    address: u32,
    host_bridge: Vec<u8>,
}

/// Bytes of the host bridge's configuration space a snapshot keeps: the standard header.
const HOST_BRIDGE_SAVED: usize = 64;

/// The root complex as a component of the VM, held by its port pair (which owns the latch).
impl lifecycle::Component for PciConfigIo {
    fn save(&mut self, id: &str) -> Result<Option<lifecycle::Section>, String> {
        let mut host_bridge = vec![0u8; HOST_BRIDGE_SAVED];
        lock(&self.root).host_bridge.read(0, &mut host_bridge);
        let state = RootState {
            address: self.address,
            host_bridge,
        };
        lifecycle::Section::new(id, 1, &state).map(Some)
    }

    fn restore(&mut self, section: &lifecycle::Section) -> Result<(), String> {
        let s: RootState = section.parse(&[1])?;
        if s.host_bridge.len() != HOST_BRIDGE_SAVED {
            return Err(format!(
                "{} bytes of host bridge configuration saved, {HOST_BRIDGE_SAVED} expected",
                s.host_bridge.len()
            ));
        }
        // Through the guest's own write path, a dword at a time: read-only bits stay as this
        // tern builds them.
        let mut root = lock(&self.root);
        for (reg, dword) in s.host_bridge.chunks_exact(4).enumerate() {
            let _ = root.host_bridge.write((reg * 4) as u16, dword);
        }
        self.address = s.address & CONFIG_ADDRESS_MASK;
        Ok(())
    }
}

/// ECAM (memory-mapped configuration): a [`BusDevice`] for an MMIO window where offset
/// `bus << 20 | device << 15 | function << 12 | reg` reaches that function's 4 KiB space.
/// Insert it with length `ECAM_BUS_SIZE * buses`; only bus 0 is populated.
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    /// The ECAM window for `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigMmio { root }
    }

    fn decode(offset: u64) -> (PciBdf, u16) {
        let bus = offset >> 20;
        let bdf = PciBdf::new(
            u8::try_from(bus).unwrap_or(u8::MAX),
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
        );
        // Buses past 255 cannot exist: make them miss.
        let bdf = if bus > 0xff {
            PciBdf::new(0xff, 0x1f, 7)
        } else {
            bdf
        };
        (bdf, (offset & 0xfff) as u16)
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bdf, reg) = Self::decode(offset);
        lock(&self.root).config_read(bdf, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bdf, reg) = Self::decode(offset);
        lock(&self.root).config_write(bdf, reg, data);
    }
}

/// One BAR of a device, as a [`BusDevice`] to insert on the MMIO (or PIO) bus at the BAR's
/// address: offsets are relative to the BAR base.
pub struct PciBarBusDevice {
    dev: Arc<Mutex<dyn PciDevice>>,
    bar: u8,
}

impl PciBarBusDevice {
    /// BAR `bar` of `dev`.
    pub fn new(dev: Arc<Mutex<dyn PciDevice>>, bar: u8) -> Self {
        PciBarBusDevice { dev, bar }
    }
}

impl BusDevice for PciBarBusDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).bar_write(self.bar, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::PCI_COMMAND;

    /// A device with a 32-bit, a 64-bit and an I/O BAR; BAR reads return the offset.
    struct Dummy {
        cfg: PciConfiguration,
        writes: Vec<(u8, u64, Vec<u8>)>,
    }

    impl Dummy {
        fn new(device_id: u16) -> Self {
            let mut cfg = PciConfiguration::new(&PciHeader {
                vendor_id: 0x1234,
                device_id,
                class_code: 0xff_00_00,
                revision: 7,
                ..Default::default()
            });
            cfg.add_bar(0, BarKind::Mem32, 0x1000, false).unwrap();
            cfg.add_bar(1, BarKind::Io, 0x20, false).unwrap();
            cfg.add_bar(2, BarKind::Mem64, 0x10_0000, true).unwrap();
            Dummy {
                cfg,
                writes: Vec::new(),
            }
        }
    }

    impl PciDevice for Dummy {
        fn config_read(&mut self, reg: u16, data: &mut [u8]) {
            assert!(usize::from(reg % 4) + data.len() <= 4, "crosses a dword");
            self.cfg.read(reg, data);
        }
        fn config_write(&mut self, reg: u16, data: &[u8]) -> Option<BarRelocation> {
            assert!(usize::from(reg % 4) + data.len() <= 4, "crosses a dword");
            self.cfg.write(reg, data)
        }
        fn bars(&self) -> Vec<BarInfo> {
            self.cfg.bars()
        }
        fn set_bar_address(&mut self, bar: u8, addr: u64) {
            self.cfg.set_bar_address(bar, addr).unwrap();
        }
        fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            data.fill(bar + offset as u8);
        }
        fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
            self.writes.push((bar, offset, data.to_vec()));
        }
    }

    /// The configuration-address latch and the host bridge's header survive a snapshot;
    /// a header of the wrong size is refused.
    #[test]
    fn the_root_complex_round_trips_its_state() {
        use lifecycle::Component;
        let fresh = || {
            let root = Arc::new(Mutex::new(PciRoot::new(&windows()).unwrap()));
            PciConfigIo::new(root)
        };
        let mut a = fresh();
        // Host bridge command register (offset 4): memory and bus-master enable.
        a.write(0, &(CONFIG_ADDRESS_ENABLE | 4).to_le_bytes());
        a.write(4, &[0x06, 0x00]);
        a.write(0, &(CONFIG_ADDRESS_ENABLE | 0x10).to_le_bytes());
        let saved = a.save("pci-root").unwrap().unwrap();
        let mut b = fresh();
        b.restore(&saved).unwrap();
        assert_eq!(b.save("pci-root").unwrap(), Some(saved.clone()));
        let mut latch = [0u8; 4];
        b.read(0, &mut latch);
        assert_eq!(u32::from_le_bytes(latch), CONFIG_ADDRESS_ENABLE | 0x10);
        b.write(0, &(CONFIG_ADDRESS_ENABLE | 4).to_le_bytes());
        let mut cmd = [0u8; 2];
        b.read(4, &mut cmd);
        assert_eq!(cmd, [0x06, 0x00]);
        let mut bad = saved;
        bad.state["host_bridge"] = serde_json::json!([0, 1, 2]);
        assert!(fresh().restore(&bad).unwrap_err().contains("3 bytes"));
    }

    fn windows() -> PciWindows {
        PciWindows {
            mmio32: 0xc000_0000..0xe000_0000,
            mmio64: None,
            io: Some(0x1000..0x2000),
        }
    }

    fn root_with(n: u16) -> (Arc<Mutex<PciRoot>>, Vec<Arc<Mutex<Dummy>>>) {
        let mut root = PciRoot::new(&windows()).unwrap();
        let mut devs = Vec::new();
        for i in 0..n {
            let d = Arc::new(Mutex::new(Dummy::new(0x100 + i)));
            let bdf = root.attach(d.clone()).unwrap();
            assert_eq!(bdf, PciBdf::new(0, 1 + i as u8, 0));
            devs.push(d);
        }
        (Arc::new(Mutex::new(root)), devs)
    }

    fn cf8(io: &mut PciConfigIo, bus: u32, dev: u32, func: u32, reg: u32) {
        let a = 0x8000_0000 | (bus << 16) | (dev << 11) | (func << 8) | (reg & 0xfc);
        io.write(0, &a.to_le_bytes());
    }

    fn io_read(io: &mut PciConfigIo, offset: u64, len: usize) -> u32 {
        let mut d = [0u8; 4];
        io.read(offset, &mut d[..len]);
        u32::from_le_bytes(d)
    }

    /// A PC-identity root: an i440FX host bridge, the PIIX3 ISA bridge at 00:01.0 (slot 1 is
    /// then not free for devices) and a read-only PIIX4 PM function at 00:01.3; a plain root
    /// has none of them.
    #[test]
    fn pc_identity() {
        let (plain, _) = root_with(0);
        let mut io = PciConfigIo::new(plain.clone());
        cf8(&mut io, 0, 1, 3, 0);
        assert_eq!(io_read(&mut io, 4, 4), 0xffff_ffff);
        plain.lock().unwrap().set_pc_identity(0xb000);
        cf8(&mut io, 0, 0, 0, 0);
        assert_eq!(io_read(&mut io, 4, 4), 0x1237_8086);
        cf8(&mut io, 0, 1, 3, 0);
        assert_eq!(io_read(&mut io, 4, 4), 0x7113_8086);
        cf8(&mut io, 0, 1, 3, 0x40);
        io.write(4, &0x0600_0001u32.to_le_bytes());
        assert_eq!(io_read(&mut io, 4, 4), 0xb001);
        cf8(&mut io, 0, 1, 3, 0x80);
        assert_eq!(io_read(&mut io, 4, 1), 1);
        // 00:01.0 is a single-function PIIX3 ISA bridge whose command register takes writes
        // (OVMF enables I/O decoding before it looks below the bridge).
        cf8(&mut io, 0, 1, 0, 0);
        assert_eq!(io_read(&mut io, 4, 4), 0x7000_8086);
        cf8(&mut io, 0, 1, 0, 8);
        assert_eq!(io_read(&mut io, 4, 4) >> 8, 0x06_01_00);
        cf8(&mut io, 0, 1, 0, 0xc);
        assert_eq!(io_read(&mut io, 4, 4) >> 16 & 0xff, 0, "header type");
        cf8(&mut io, 0, 1, 0, 4);
        io.write(4, &3u16.to_le_bytes());
        assert_eq!(io_read(&mut io, 4, 2) & 3, 3);
        // Devices go after it; slot 1 is not free.
        let mut r = plain.lock().unwrap();
        let d = Arc::new(Mutex::new(Dummy::new(0x100)));
        assert_eq!(r.attach(d.clone()).unwrap(), PciBdf::new(0, 2, 0));
        assert!(matches!(r.attach_at(1, d), Err(PciRootError::SlotInUse(1))));
        assert!(r.detach(1).is_none());
    }

    /// A detached device's slot and BAR space are taken by the next device, at the same
    /// addresses; nothing answers at its slot meanwhile.
    #[test]
    fn a_detached_device_leaves_its_slot_and_bar_space_free() {
        let (root, _) = root_with(3);
        let mut r = root.lock().unwrap();
        let before = r
            .device(PciBdf::new(0, 2, 0))
            .unwrap()
            .lock()
            .unwrap()
            .bars();
        assert!(r.detach(2).is_some());
        assert!(r.detach(2).is_none());
        assert!(r.device(PciBdf::new(0, 2, 0)).is_none());
        let mut v = [0u8; 2];
        r.config_read(PciBdf::new(0, 2, 0), 0, &mut v);
        assert_eq!(v, [0xff, 0xff]);
        let d = Arc::new(Mutex::new(Dummy::new(0x200)));
        assert_eq!(r.attach(d.clone()).unwrap(), PciBdf::new(0, 2, 0));
        let after = d.lock().unwrap().bars();
        let addrs = |b: &[BarInfo]| b.iter().map(|b| (b.index, b.addr)).collect::<Vec<_>>();
        assert_eq!(addrs(&after), addrs(&before));
    }

    #[test]
    fn bar_placement() {
        let (root, devs) = root_with(2);
        let a = devs[0].lock().unwrap().bars();
        let b = devs[1].lock().unwrap().bars();
        // Largest first, naturally aligned, inside the windows, no overlap.
        assert_eq!(a[2].addr, 0xc000_0000);
        assert_eq!(a[0].addr, 0xc010_0000);
        assert_eq!(a[1].addr, 0x1000);
        assert_eq!(b[2].addr, 0xc020_0000);
        assert_eq!(b[0].addr, 0xc010_1000);
        assert_eq!(b[1].addr, 0x1020);
        let mut r = root.lock().unwrap();
        // Slot errors.
        let d = Arc::new(Mutex::new(Dummy::new(9)));
        assert_eq!(r.attach_at(1, d.clone()), Err(PciRootError::SlotInUse(1)));
        assert_eq!(r.attach_at(0, d.clone()), Err(PciRootError::BadSlot(0)));
        assert_eq!(r.attach_at(32, d.clone()), Err(PciRootError::BadSlot(32)));
        // No I/O window: an I/O BAR cannot be placed, and nothing stays allocated.
        let mut small = PciRoot::new(&PciWindows {
            mmio32: 0xc000_0000..0xc020_0000,
            mmio64: None,
            io: None,
        })
        .unwrap();
        assert!(matches!(
            small.attach(d.clone()),
            Err(PciRootError::NoBarSpace { bar: 1, .. })
        ));
        assert!(small.device(PciBdf::new(0, 1, 0)).is_none());
        assert!(PciRoot::new(&PciWindows {
            mmio32: 5..5,
            mmio64: None,
            io: None
        })
        .is_err());
        // The BAR bus devices reach the right BAR.
        let bus_devs = r.bar_bus_devices(PciBdf::new(0, 2, 0));
        assert_eq!(bus_devs.len(), 3);
        let (info, bd) = &bus_devs[2];
        assert_eq!(info.index, 2);
        let mut x = [0u8; 2];
        bd.lock().unwrap().read(3, &mut x);
        assert_eq!(x, [5, 5]);
        bd.lock().unwrap().write(8, &[1, 2, 3, 4]);
        assert_eq!(
            devs[1].lock().unwrap().writes,
            vec![(2, 8, vec![1, 2, 3, 4])]
        );
        assert!(r.bar_bus_devices(PciBdf::new(0, 9, 0)).is_empty());
    }

    #[test]
    fn mmio64_window_and_full_bus() {
        let mut root = PciRoot::new(&PciWindows {
            mmio32: 0xc000_0000..0xe000_0000,
            mmio64: Some(0x100_0000_0000..0x200_0000_0000),
            io: Some(0x1000..0x10000),
        })
        .unwrap();
        for _ in 1..PCI_SLOTS {
            root.attach(Arc::new(Mutex::new(Dummy::new(1)))).unwrap();
        }
        let d = root.device(PciBdf::new(0, 31, 0)).unwrap();
        let bars = d.lock().unwrap().bars();
        assert!(bars[2].addr >= 0x100_0000_0000);
        assert_eq!(
            root.attach(Arc::new(Mutex::new(Dummy::new(1)))),
            Err(PciRootError::NoFreeSlot)
        );
    }

    #[test]
    fn legacy_config_mechanism() {
        let (root, _devs) = root_with(1);
        let mut io = PciConfigIo::new(root.clone());
        // The address register reads back (reserved bits cleared).
        io.write(0, &0x8000_0803u32.to_le_bytes());
        assert_eq!(io_read(&mut io, 0, 4), 0x8000_0800);
        // Non-dword accesses to 0xCF8 are not the address register.
        io.write(0, &[0]);
        assert_eq!(io_read(&mut io, 0, 4), 0x8000_0800);
        assert_eq!(io_read(&mut io, 1, 1), 0xff);
        // Host bridge at 00.0.
        cf8(&mut io, 0, 0, 0, 0);
        assert_eq!(io_read(&mut io, 4, 4), 0x0d57_8086);
        cf8(&mut io, 0, 0, 0, 8);
        assert_eq!(io_read(&mut io, 4, 4) >> 8, 0x06_00_00);
        // Device 01.0: dword, words at 0xCFC/0xCFE, bytes at 0xCFC..0xCFF.
        cf8(&mut io, 0, 1, 0, 0);
        assert_eq!(io_read(&mut io, 4, 4), 0x0100_1234);
        assert_eq!(io_read(&mut io, 4, 2), 0x1234);
        assert_eq!(io_read(&mut io, 6, 2), 0x0100);
        assert_eq!(io_read(&mut io, 4, 1), 0x34);
        assert_eq!(io_read(&mut io, 5, 1), 0x12);
        assert_eq!(io_read(&mut io, 6, 1), 0x00);
        assert_eq!(io_read(&mut io, 7, 1), 0x01);
        // A dword read at 0xCFE only gets the two bytes inside the window.
        assert_eq!(io_read(&mut io, 6, 4), 0xffff_0100);
        cf8(&mut io, 0, 1, 0, 8);
        assert_eq!(io_read(&mut io, 4, 1), 7);
        // Absent: empty slot, other function, other bus, enable bit clear.
        for (bus, dev, func) in [(0, 2, 0), (0, 31, 0), (0, 1, 1), (0, 0, 3), (1, 0, 0)] {
            cf8(&mut io, bus, dev, func, 0);
            assert_eq!(io_read(&mut io, 4, 4), 0xffff_ffff);
            assert_eq!(io_read(&mut io, 6, 2), 0xffff);
            assert_eq!(io_read(&mut io, 7, 1), 0xff);
            io.write(4, &[0; 4]);
        }
        io.write(0, &0x0000_0800u32.to_le_bytes());
        assert_eq!(io_read(&mut io, 4, 4), 0xffff_ffff);
        // Writes through 0xCFC: command register byte write at 0xCFC.
        cf8(&mut io, 0, 1, 0, PCI_COMMAND as u32);
        io.write(4, &[0x06]);
        assert_eq!(io_read(&mut io, 4, 2), 0x06);
        // Status at 0xCFE is read-only.
        io.write(6, &[0xff, 0xff]);
        assert_eq!(io_read(&mut io, 6, 2), 0);
        // Odd offsets out of range are harmless.
        io.write(9, &[1]);
        let mut d = [0u8; 1];
        io.read(12, &mut d);
    }

    #[test]
    fn ecam_access() {
        let (root, _devs) = root_with(1);
        let mut ecam = PciConfigMmio::new(root.clone());
        let off =
            |bus: u64, dev: u64, func: u64, reg: u64| bus << 20 | dev << 15 | func << 12 | reg;
        let rd = |e: &mut PciConfigMmio, o: u64, n: usize| {
            let mut d = [0u8; 8];
            e.read(o, &mut d[..n]);
            u64::from_le_bytes(d)
        };
        assert_eq!(rd(&mut ecam, off(0, 0, 0, 0), 4), 0x0d57_8086);
        assert_eq!(rd(&mut ecam, off(0, 1, 0, 0), 4), 0x0100_1234);
        assert_eq!(rd(&mut ecam, off(0, 1, 0, 2), 2), 0x0100);
        assert_eq!(rd(&mut ecam, off(0, 1, 0, 3), 1), 0x01);
        // A qword is two dwords.
        assert_eq!(rd(&mut ecam, off(0, 1, 0, 8), 8), 0xff00_0007);
        // Extended space of a present device reads zero.
        assert_eq!(rd(&mut ecam, off(0, 1, 0, 0x100), 4), 0);
        // An unaligned dword crossing a dword boundary is split, not rejected.
        assert_eq!(rd(&mut ecam, off(0, 1, 0, 6), 4), 0x0007_0000);
        for o in [
            off(0, 2, 0, 0),
            off(0, 1, 1, 0),
            off(1, 0, 0, 0),
            off(255, 31, 7, 0xffc),
            1 << 40,
        ] {
            assert_eq!(rd(&mut ecam, o, 4), 0xffff_ffff);
            assert_eq!(rd(&mut ecam, o, 1), 0xff);
            ecam.write(o, &[0; 4]);
        }
        ecam.write(off(0, 1, 0, 4), &[0x02, 0]);
        assert_eq!(rd(&mut ecam, off(0, 1, 0, 4), 2), 2);
    }

    #[test]
    fn guest_bar_moves_are_reported() {
        let (root, devs) = root_with(1);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        root.lock()
            .unwrap()
            .set_relocation_notifier(Box::new(move |r| s2.lock().unwrap().push(*r)));
        let mut io = PciConfigIo::new(root.clone());
        // Linux-style sizing of BAR0 then restoring: no move.
        cf8(&mut io, 0, 1, 0, 0x10);
        let orig = io_read(&mut io, 4, 4);
        io.write(4, &[0xff; 4]);
        assert_eq!(io_read(&mut io, 4, 4), 0xffff_f000);
        io.write(4, &orig.to_le_bytes());
        assert!(root.lock().unwrap().take_bar_relocations().is_empty());
        // Writing the same address again: accepted, no move.
        io.write(4, &orig.to_le_bytes());
        assert!(root.lock().unwrap().take_bar_relocations().is_empty());
        // A real move.
        io.write(4, &0xd000_0000u32.to_le_bytes());
        let moves = root.lock().unwrap().take_bar_relocations();
        let expect = BarRelocation {
            bdf: PciBdf::new(0, 1, 0),
            bar: 0,
            kind: BarKind::Mem32,
            old_addr: u64::from(orig),
            new_addr: 0xd000_0000,
            size: 0x1000,
        };
        assert_eq!(moves, vec![expect]);
        assert_eq!(*seen.lock().unwrap(), vec![expect]);
        assert_eq!(devs[0].lock().unwrap().bars()[0].addr, 0xd000_0000);
        assert!(root.lock().unwrap().take_bar_relocations().is_empty());
    }

    #[test]
    fn undrained_bar_moves_stay_bounded() {
        let (root, _devs) = root_with(1);
        let mut io = PciConfigIo::new(root.clone());
        cf8(&mut io, 0, 1, 0, 0x10);
        let orig = io_read(&mut io, 4, 4);
        // A guest moving BAR0 back and forth, with nobody draining the record.
        for i in 0..10_000u32 {
            let addr = 0xd000_0000 + (i % 7) * 0x1000;
            io.write(4, &addr.to_le_bytes());
        }
        let n = root.lock().unwrap().relocations.len();
        assert!(n <= 1, "{n} undrained moves recorded");
        let moves = root_take(&root);
        assert_eq!(moves.len(), 1);
        assert_eq!(
            (moves[0].old_addr, moves[0].new_addr),
            (u64::from(orig), 0xd000_0000 + (9_999 % 7) * 0x1000)
        );
        // Moved away and back again: nothing to follow.
        io.write(4, &0xd800_0000u32.to_le_bytes());
        io.write(4, &(0xd000_0000u32 + (9_999 % 7) * 0x1000).to_le_bytes());
        assert!(root_take(&root).is_empty());
    }

    fn root_take(root: &Arc<Mutex<PciRoot>>) -> Vec<BarRelocation> {
        root.lock().unwrap().take_bar_relocations()
    }
}
