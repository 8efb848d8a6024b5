//! A type-0 PCI configuration space: 256 standard bytes plus the 4 KiB extended space that
//! ECAM reaches (it reads as zeros: no extended capabilities).
//!
//! Every byte has a write mask, so a guest can only change what is writable on real hardware:
//! the command register's enable bits, cache line size, interrupt line, BARs (through their
//! own logic) and whatever writable bits a capability declares. The status register has no
//! error bits to clear, so it is read-only; its "capabilities list" bit is set once a
//! capability is added.
//!
//! BARs follow the sizing protocol: writing all-ones to a BAR dword makes it read back the
//! size mask (with the type bits), and writing anything else programs the address. A change
//! of address, once no half of the BAR is in the sizing state, is reported as a
//! [`BarRelocation`].

use super::{BarInfo, BarRelocation, PciBdf};

/// Size of the standard (legacy-reachable) configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Size of the extended configuration space reachable through ECAM.
pub const EXTENDED_CONFIG_SPACE_SIZE: usize = 4096;
/// Number of BAR registers of a type-0 header.
pub const NUM_BARS: usize = 6;

/// Vendor ID register.
pub const PCI_VENDOR_ID: u16 = 0x00;
/// Device ID register.
pub const PCI_DEVICE_ID: u16 = 0x02;
/// Command register.
pub const PCI_COMMAND: u16 = 0x04;
/// Status register.
pub const PCI_STATUS: u16 = 0x06;
/// Revision ID register.
pub const PCI_REVISION_ID: u16 = 0x08;
/// Class code (prog-if at 0x09, subclass 0x0a, class 0x0b).
pub const PCI_CLASS_PROG: u16 = 0x09;
/// Cache line size register.
pub const PCI_CACHE_LINE_SIZE: u16 = 0x0c;
/// Header type register.
pub const PCI_HEADER_TYPE: u16 = 0x0e;
/// First BAR register.
pub const PCI_BAR0: u16 = 0x10;
/// Subsystem vendor ID register.
pub const PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
/// Subsystem ID register.
pub const PCI_SUBSYSTEM_ID: u16 = 0x2e;
/// Expansion ROM base address register.
pub const PCI_ROM_ADDRESS: u16 = 0x30;
/// Capabilities pointer.
pub const PCI_CAPABILITY_LIST: u16 = 0x34;
/// Interrupt line register.
pub const PCI_INTERRUPT_LINE: u16 = 0x3c;
/// Interrupt pin register.
pub const PCI_INTERRUPT_PIN: u16 = 0x3d;

/// Command: I/O space enable.
pub const PCI_COMMAND_IO: u16 = 1 << 0;
/// Command: memory space enable.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus master enable.
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Command: parity error response.
pub const PCI_COMMAND_PARITY: u16 = 1 << 6;
/// Command: SERR# enable.
pub const PCI_COMMAND_SERR: u16 = 1 << 8;
/// Command: INTx emulation disable.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: the capabilities pointer is valid.
pub const PCI_STATUS_CAP_LIST: u16 = 1 << 4;

/// Capability ID of vendor-specific capabilities (virtio uses these).
pub const PCI_CAP_ID_VNDR: u8 = 0x09;
/// Capability ID of MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;

/// Where the first capability goes (right after the type-0 header).
const FIRST_CAP_OFFSET: u16 = 0x40;
const COMMAND_WMASK: u16 = PCI_COMMAND_IO
    | PCI_COMMAND_MEMORY
    | PCI_COMMAND_MASTER
    | PCI_COMMAND_PARITY
    | PCI_COMMAND_SERR
    | PCI_COMMAND_INTX_DISABLE;
const BAR_AREA: std::ops::Range<u16> = PCI_BAR0..PCI_BAR0 + 4 * NUM_BARS as u16;

/// The identity of a function, fixed at creation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code as `0xCCSSPP`: class, subclass, programming interface.
    pub class_code: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Interrupt pin (0 none, 1 INTA# .. 4 INTD#).
    pub interrupt_pin: u8,
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// Port I/O.
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (uses two BAR registers).
    Mem64,
}

/// Errors of building a configuration space (programming errors of the VMM, not guest input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciConfigError {
    /// BAR index out of range, or a 64-bit BAR at index 5.
    #[error("BAR index {0} is out of range")]
    BadBarIndex(u8),
    /// The BAR register (or the upper half of a 64-bit BAR) is already used.
    #[error("BAR {0} is already in use")]
    BarInUse(u8),
    /// Size not a power of two, or out of range for the kind.
    #[error("invalid size {size:#x} for a {kind:?} BAR")]
    BadBarSize {
        /// The kind.
        kind: BarKind,
        /// The rejected size.
        size: u64,
    },
    /// No BAR at this index.
    #[error("no BAR {0}")]
    NoSuchBar(u8),
    /// Address not aligned to the BAR's size or outside what the BAR can decode.
    #[error("address {addr:#x} is not valid for BAR {bar}")]
    BadBarAddress {
        /// The BAR.
        bar: u8,
        /// The rejected address.
        addr: u64,
    },
    /// No room left in the 256-byte space for this capability.
    #[error("no room for a {len}-byte capability")]
    NoCapabilitySpace {
        /// Its length, header included.
        len: usize,
    },
    /// The write mask of a capability does not match its body.
    #[error("capability write mask length {mask} differs from body length {body}")]
    BadCapabilityMask {
        /// Body length.
        body: usize,
        /// Mask length.
        mask: usize,
    },
}

#[derive(Clone, Copy, Debug)]
struct Bar {
    kind: BarKind,
    prefetchable: bool,
    size: u64,
    /// The address the registers hold (for halves not in the sizing state).
    addr: u64,
    /// The address last reported (initial placement or last relocation).
    mapped: u64,
    /// Low and high register currently in the sizing state.
    sizing: [bool; 2],
}

impl Bar {
    fn type_bits(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0x1,
            BarKind::Mem32 => u32::from(self.prefetchable) << 3,
            BarKind::Mem64 => 0x4 | (u32::from(self.prefetchable) << 3),
        }
    }

    fn low_flag_mask(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0x3,
            _ => 0xf,
        }
    }

    /// Writable address bits (all halves), from the size.
    fn addr_mask(&self) -> u64 {
        let m = !(self.size - 1);
        match self.kind {
            BarKind::Mem64 => m,
            _ => m & 0xffff_ffff,
        }
    }

    fn read_low(&self) -> u32 {
        let v = if self.sizing[0] {
            self.addr_mask() as u32
        } else {
            self.addr as u32
        };
        (v & !self.low_flag_mask()) | self.type_bits()
    }

    fn read_high(&self) -> u32 {
        if self.sizing[1] {
            (self.addr_mask() >> 32) as u32
        } else {
            (self.addr >> 32) as u32
        }
    }

    fn info(&self, index: u8) -> BarInfo {
        BarInfo {
            index,
            kind: self.kind,
            prefetchable: self.prefetchable,
            addr: self.mapped,
            size: self.size,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum BarSlot {
    Empty,
    Bar(Bar),
    /// Upper half of the 64-bit BAR at the previous index.
    Upper,
}

/// A function's configuration space.
pub struct PciConfiguration {
    bytes: Box<[u8; EXTENDED_CONFIG_SPACE_SIZE]>,
    wmask: Box<[u8; EXTENDED_CONFIG_SPACE_SIZE]>,
    bars: [BarSlot; NUM_BARS],
    /// Offset of the last capability in the list.
    last_cap: Option<u16>,
    /// Where the next capability may start.
    next_cap: u16,
}

impl PciConfiguration {
    /// A type-0 configuration space for `header`, with no BARs or capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut c = PciConfiguration {
            bytes: Box::new([0; EXTENDED_CONFIG_SPACE_SIZE]),
            wmask: Box::new([0; EXTENDED_CONFIG_SPACE_SIZE]),
            bars: [BarSlot::Empty; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
        };
        c.put(PCI_VENDOR_ID, &header.vendor_id.to_le_bytes());
        c.put(PCI_DEVICE_ID, &header.device_id.to_le_bytes());
        c.put(PCI_REVISION_ID, &[header.revision]);
        c.put(PCI_CLASS_PROG, &header.class_code.to_le_bytes()[..3]);
        c.put(PCI_HEADER_TYPE, &[0]);
        c.put(
            PCI_SUBSYSTEM_VENDOR_ID,
            &header.subsystem_vendor_id.to_le_bytes(),
        );
        c.put(PCI_SUBSYSTEM_ID, &header.subsystem_id.to_le_bytes());
        c.put(PCI_INTERRUPT_PIN, &[header.interrupt_pin]);
        c.put_mask(PCI_COMMAND, &COMMAND_WMASK.to_le_bytes());
        c.put_mask(PCI_CACHE_LINE_SIZE, &[0xff]);
        c.put_mask(PCI_INTERRUPT_LINE, &[0xff]);
        c
    }

    fn put(&mut self, reg: u16, data: &[u8]) {
        let r = usize::from(reg);
        self.bytes[r..r + data.len()].copy_from_slice(data);
    }

    fn put_mask(&mut self, reg: u16, mask: &[u8]) {
        let r = usize::from(reg);
        self.wmask[r..r + mask.len()].copy_from_slice(mask);
    }

    /// Declares BAR `index`: `size` bytes (a power of two) of `kind`, unplaced (address 0).
    pub fn add_bar(
        &mut self,
        index: u8,
        kind: BarKind,
        size: u64,
        prefetchable: bool,
    ) -> Result<(), PciConfigError> {
        let i = usize::from(index);
        let wide = kind == BarKind::Mem64;
        if i >= NUM_BARS || (wide && i + 1 >= NUM_BARS) {
            return Err(PciConfigError::BadBarIndex(index));
        }
        if !matches!(self.bars[i], BarSlot::Empty)
            || (wide && !matches!(self.bars[i + 1], BarSlot::Empty))
        {
            return Err(PciConfigError::BarInUse(index));
        }
        let (min, max) = match kind {
            BarKind::Io => (4, 1 << 16),
            BarKind::Mem32 => (16, 1 << 31),
            BarKind::Mem64 => (16, 1 << 63),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciConfigError::BadBarSize { kind, size });
        }
        self.bars[i] = BarSlot::Bar(Bar {
            kind,
            prefetchable: prefetchable && kind != BarKind::Io,
            size,
            addr: 0,
            mapped: 0,
            sizing: [false; 2],
        });
        if wide {
            self.bars[i + 1] = BarSlot::Upper;
        }
        Ok(())
    }

    /// Places BAR `index` at `addr` (aligned to its size and decodable by its kind). This is
    /// the VMM's placement: it is not reported as a relocation.
    pub fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), PciConfigError> {
        let bar = match self.bars.get_mut(usize::from(index)) {
            Some(BarSlot::Bar(b)) => b,
            _ => return Err(PciConfigError::NoSuchBar(index)),
        };
        let limit = match bar.kind {
            BarKind::Io => 1 << 16,
            BarKind::Mem32 => 1 << 32,
            BarKind::Mem64 => u64::MAX,
        };
        if addr & (bar.size - 1) != 0 || addr > limit - bar.size {
            return Err(PciConfigError::BadBarAddress { bar: index, addr });
        }
        bar.addr = addr;
        bar.mapped = addr;
        bar.sizing = [false; 2];
        Ok(())
    }

    /// BAR `index`, if declared (the upper half of a 64-bit BAR is not one).
    pub fn bar(&self, index: u8) -> Option<BarInfo> {
        match self.bars.get(usize::from(index)) {
            Some(BarSlot::Bar(b)) => Some(b.info(index)),
            _ => None,
        }
    }

    /// All declared BARs, by index.
    pub fn bars(&self) -> Vec<BarInfo> {
        (0..NUM_BARS as u8).filter_map(|i| self.bar(i)).collect()
    }

    /// Appends a capability with ID `id`: `body` is everything after the two header bytes (ID,
    /// next pointer); `wmask` (same length as `body`, or empty for read-only) says which bits
    /// the guest may write. Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        wmask: &[u8],
    ) -> Result<u16, PciConfigError> {
        if !wmask.is_empty() && wmask.len() != body.len() {
            return Err(PciConfigError::BadCapabilityMask {
                body: body.len(),
                mask: wmask.len(),
            });
        }
        let len = body.len() + 2;
        let off = self.next_cap;
        if usize::from(off) + len > CONFIG_SPACE_SIZE {
            return Err(PciConfigError::NoCapabilitySpace { len });
        }
        self.put(off, &[id, 0]);
        self.put(off + 2, body);
        if !wmask.is_empty() {
            self.put_mask(off + 2, wmask);
        }
        match self.last_cap {
            Some(last) => self.put(last + 1, &[off as u8]),
            None => self.put(PCI_CAPABILITY_LIST, &[off as u8]),
        }
        let status = self.read_u16(PCI_STATUS) | PCI_STATUS_CAP_LIST;
        self.put(PCI_STATUS, &status.to_le_bytes());
        self.last_cap = Some(off);
        // Next capability starts dword-aligned.
        self.next_cap = (off + len as u16 + 3) & !3;
        Ok(off)
    }

    /// Walks the capability list: `(id, offset)` of each capability, as a driver would.
    pub fn capabilities(&self) -> Vec<(u8, u16)> {
        let mut out = Vec::new();
        let mut ptr = self.read_u8(PCI_CAPABILITY_LIST) & !3;
        // A list can hold at most 48 dword-aligned entries in 0x40..0x100: bound the walk.
        while ptr != 0 && out.len() < 48 {
            out.push((self.read_u8(u16::from(ptr)), u16::from(ptr)));
            ptr = self.read_u8(u16::from(ptr) + 1) & !3;
        }
        out
    }

    /// Reads `data.len()` bytes at `reg`; bytes past the 4 KiB space read as 0xff.
    pub fn read(&self, reg: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::from(reg)
                .checked_add(i)
                .and_then(|r| u16::try_from(r).ok())
                .map_or(0xff, |r| self.read_byte(r));
        }
    }

    fn read_byte(&self, reg: u16) -> u8 {
        if BAR_AREA.contains(&reg) {
            let i = usize::from((reg - PCI_BAR0) / 4);
            let dword = match self.bars[i] {
                BarSlot::Empty => 0,
                BarSlot::Bar(b) => b.read_low(),
                BarSlot::Upper => match self.bars[i - 1] {
                    BarSlot::Bar(b) => b.read_high(),
                    _ => 0,
                },
            };
            return dword.to_le_bytes()[usize::from(reg % 4)];
        }
        self.bytes.get(usize::from(reg)).copied().unwrap_or(0xff)
    }

    /// Reads a byte.
    pub fn read_u8(&self, reg: u16) -> u8 {
        let mut b = [0; 1];
        self.read(reg, &mut b);
        b[0]
    }

    /// Reads a little-endian word.
    pub fn read_u16(&self, reg: u16) -> u16 {
        let mut b = [0; 2];
        self.read(reg, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads a little-endian dword.
    pub fn read_u32(&self, reg: u16) -> u32 {
        let mut b = [0; 4];
        self.read(reg, &mut b);
        u32::from_le_bytes(b)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(PCI_COMMAND)
    }

    /// A guest write of `data` at `reg`: only writable bits change. Returns the BAR move it
    /// caused. A write within one dword touches at most one BAR (both halves of a 64-bit BAR
    /// written by one 8-byte access make one move); should a wider write move two BARs, the
    /// second move stays unreported until the next write to that BAR ([`PciRoot`] splits
    /// accesses into dwords, so it never happens there).
    ///
    /// [`PciRoot`]: super::PciRoot
    pub fn write(&mut self, reg: u16, data: &[u8]) -> Option<BarRelocation> {
        // BAR dwords touched: index, new bytes, which bytes were written.
        let mut bar_dwords: Vec<(usize, [u8; 4], [bool; 4])> = Vec::new();
        for (i, &v) in data.iter().enumerate() {
            let Some(r) = usize::from(reg)
                .checked_add(i)
                .filter(|&r| r < EXTENDED_CONFIG_SPACE_SIZE)
            else {
                break;
            };
            let r16 = r as u16;
            if BAR_AREA.contains(&r16) {
                let idx = usize::from((r16 - PCI_BAR0) / 4);
                let pos = match bar_dwords.iter().position(|d| d.0 == idx) {
                    Some(p) => p,
                    None => {
                        bar_dwords.push((idx, [0; 4], [false; 4]));
                        bar_dwords.len() - 1
                    }
                };
                bar_dwords[pos].1[r % 4] = v;
                bar_dwords[pos].2[r % 4] = true;
                continue;
            }
            let m = self.wmask[r];
            self.bytes[r] = (self.bytes[r] & !m) | (v & m);
        }
        let mut touched = Vec::new();
        for (idx, vals, present) in bar_dwords {
            let base = PCI_BAR0 + 4 * idx as u16;
            let mut cur = [0u8; 4];
            self.read(base, &mut cur);
            for k in 0..4 {
                if present[k] {
                    cur[k] = vals[k];
                }
            }
            if let Some(b) = self.write_bar_dword(idx, u32::from_le_bytes(cur)) {
                if !touched.contains(&b) {
                    touched.push(b);
                }
            }
        }
        touched.into_iter().find_map(|b| self.take_bar_move(b))
    }

    /// Updates the BAR register `idx`; returns the index of the BAR it belongs to.
    fn write_bar_dword(&mut self, idx: usize, v: u32) -> Option<usize> {
        let (bar_idx, high) = match self.bars[idx] {
            BarSlot::Empty => return None,
            BarSlot::Bar(_) => (idx, false),
            BarSlot::Upper => (idx - 1, true),
        };
        let BarSlot::Bar(bar) = &mut self.bars[bar_idx] else {
            return None;
        };
        let half = usize::from(high);
        if v == u32::MAX {
            bar.sizing[half] = true;
            return Some(bar_idx);
        }
        bar.sizing[half] = false;
        let mask = bar.addr_mask();
        bar.addr = if high {
            (bar.addr & 0xffff_ffff) | ((u64::from(v) << 32) & mask)
        } else {
            (bar.addr & !0xffff_ffff) | (u64::from(v) & mask & 0xffff_ffff)
        };
        Some(bar_idx)
    }

    /// Reports (once) a programmed address of BAR `bar_idx` that differs from the mapped one.
    fn take_bar_move(&mut self, bar_idx: usize) -> Option<BarRelocation> {
        let BarSlot::Bar(bar) = &mut self.bars[bar_idx] else {
            return None;
        };
        if bar.sizing.iter().any(|&s| s) || bar.addr == bar.mapped {
            return None;
        }
        let r = BarRelocation {
            bdf: PciBdf::default(),
            bar: bar_idx as u8,
            kind: bar.kind,
            old_addr: bar.mapped,
            new_addr: bar.addr,
            size: bar.size,
        };
        ratelimit::info_limited!(
            "pci: guest moved BAR {} ({:?}, {:#x} bytes) from {:#x} to {:#x}",
            r.bar,
            r.kind,
            r.size,
            r.old_addr,
            r.new_addr
        );
        bar.mapped = bar.addr;
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            class_code: 0xff_00_00,
            revision: 1,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
            interrupt_pin: 1,
        }
    }

    #[test]
    fn header_fields_and_read_only() {
        let mut c = PciConfiguration::new(&header());
        assert_eq!(c.read_u32(0), 0x1044_1af4);
        assert_eq!(c.read_u32(0x08), 0xff00_0001);
        assert_eq!(c.read_u32(0x2c), 0x0040_1af4);
        assert_eq!(c.read_u8(PCI_INTERRUPT_PIN), 1);
        // Vendor/device, class, revision, subsystem, header type, pin: read-only.
        for reg in [0u16, 0x08, 0x0c, 0x2c, 0x30, 0x34, 0x3c] {
            let before = c.read_u32(reg);
            c.write(reg, &[0xff; 4]);
            let after = c.read_u32(reg);
            match reg {
                // Cache line size is the only writable byte of 0x0c.
                0x0c => assert_eq!(after, before | 0xff),
                // Interrupt line is writable; the pin is not.
                0x3c => assert_eq!(after, (before & !0xff) | 0xff),
                _ => assert_eq!(after, before, "reg {reg:#x}"),
            }
        }
        // Command: only the defined enable bits stick; status is read-only.
        c.write(PCI_COMMAND, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.command(), COMMAND_WMASK);
        assert_eq!(c.read_u16(PCI_STATUS), 0);
        // Byte writes at odd offsets.
        c.write(PCI_COMMAND, &[0x02]);
        assert_eq!(c.command(), (COMMAND_WMASK & 0xff00) | PCI_COMMAND_MEMORY);
        // The extended space reads zero and ignores writes; past it reads ones.
        c.write(0x100, &[1, 2, 3, 4]);
        assert_eq!(c.read_u32(0x100), 0);
        assert_eq!(c.read_u32(0xffe), 0xffff_0000);
        let mut past = [0u8; 4];
        c.read(u16::MAX - 1, &mut past);
        assert_eq!(past, [0xff; 4]);
    }

    #[test]
    fn bar_sizing_32_64_io() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(0, BarKind::Mem32, 0x1000, false).unwrap();
        c.add_bar(1, BarKind::Io, 0x20, false).unwrap();
        c.add_bar(2, BarKind::Mem64, 0x4_0000_0000, true).unwrap();
        assert_eq!(
            c.add_bar(3, BarKind::Mem32, 0x1000, false),
            Err(PciConfigError::BarInUse(3))
        );
        assert_eq!(
            c.add_bar(5, BarKind::Mem64, 0x1000, false),
            Err(PciConfigError::BadBarIndex(5))
        );
        assert!(c.add_bar(4, BarKind::Mem32, 0x1800, false).is_err());
        c.set_bar_address(0, 0xc000_0000).unwrap();
        c.set_bar_address(1, 0x1000).unwrap();
        c.set_bar_address(2, 0x8_0000_0000).unwrap();
        assert!(c.set_bar_address(0, 0xc000_0800).is_err());
        assert!(c.set_bar_address(4, 0).is_err());

        assert_eq!(c.read_u32(0x10), 0xc000_0000);
        assert_eq!(c.read_u32(0x14), 0x1001);
        assert_eq!(c.read_u32(0x18), 0x0000_000c);
        assert_eq!(c.read_u32(0x1c), 0x8);

        // Size each as Linux does: write ones, read, restore.
        for (reg, expect) in [
            (0x10u16, 0xffff_f000u32),
            (0x14, 0xffff_ffe1),
            (0x18, 0x0000_000c),
            (0x1c, 0xffff_fffc),
            (0x20, 0),
            (0x24, 0),
        ] {
            let orig = c.read_u32(reg);
            assert_eq!(c.write(reg, &u32::MAX.to_le_bytes()), None);
            assert_eq!(c.read_u32(reg), expect, "reg {reg:#x}");
            assert_eq!(c.write(reg, &orig.to_le_bytes()), None);
            assert_eq!(c.read_u32(reg), orig);
        }
        // Both halves of the 64-bit BAR sized at once.
        c.write(0x18, &[0xff; 4]);
        c.write(0x1c, &[0xff; 4]);
        let size = !((u64::from(c.read_u32(0x1c)) << 32) | u64::from(c.read_u32(0x18) & !0xf)) + 1;
        assert_eq!(size, 0x4_0000_0000);
        c.write(0x18, &0xcu32.to_le_bytes());
        assert_eq!(c.write(0x1c, &8u32.to_le_bytes()), None);
        assert_eq!(c.bar(2).unwrap().addr, 0x8_0000_0000);
        assert_eq!(c.bars().len(), 3);
    }

    #[test]
    fn bar_relocation_reported() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(0, BarKind::Mem32, 0x1000, false).unwrap();
        c.add_bar(2, BarKind::Mem64, 0x2000, false).unwrap();
        c.set_bar_address(0, 0xc000_0000).unwrap();
        c.set_bar_address(2, 0xc000_2000).unwrap();
        let r = c.write(0x10, &0xd000_0123u32.to_le_bytes()).unwrap();
        assert_eq!(
            (r.bar, r.old_addr, r.new_addr, r.size),
            (0, 0xc000_0000, 0xd000_0000, 0x1000)
        );
        assert_eq!(c.read_u32(0x10), 0xd000_0000);
        assert_eq!(c.bar(0).unwrap().addr, 0xd000_0000);
        // Byte write into the BAR: merged with the current value.
        let r = c.write(0x11, &[0x50]).unwrap();
        assert_eq!(r.new_addr, 0xd000_5000);
        // Moving a 64-bit BAR above 4 GiB: low then high.
        let r = c.write(0x18, &0x0000_4000u32.to_le_bytes()).unwrap();
        assert_eq!(r.new_addr, 0x4000);
        let r = c.write(0x1c, &1u32.to_le_bytes()).unwrap();
        assert_eq!((r.bar, r.old_addr, r.new_addr), (2, 0x4000, 0x1_0000_4000));
        // An 8-byte write over both halves moves it once.
        let r = c.write(0x18, &0x2000_0000_6000u64.to_le_bytes()).unwrap();
        assert_eq!((r.old_addr, r.new_addr), (0x1_0000_4000, 0x2000_0000_6000));
        // Sizing the low half while the high one changes: no move until sizing ends.
        c.write(0x18, &[0xff; 4]);
        assert_eq!(c.write(0x1c, &0u32.to_le_bytes()), None);
        let r = c.write(0x18, &0x6000u32.to_le_bytes()).unwrap();
        assert_eq!(r.new_addr, 0x6000);
    }

    #[test]
    fn capability_list() {
        let mut c = PciConfiguration::new(&header());
        assert_eq!(c.read_u16(PCI_STATUS) & PCI_STATUS_CAP_LIST, 0);
        assert!(c.capabilities().is_empty());
        let a = c.add_capability(PCI_CAP_ID_VNDR, &[16, 1, 0], &[]).unwrap();
        let b = c
            .add_capability(PCI_CAP_ID_MSIX, &[0, 0, 0, 0], &[0, 0xc0, 0, 0])
            .unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_ne!(c.read_u16(PCI_STATUS) & PCI_STATUS_CAP_LIST, 0);
        assert_eq!(c.read_u8(PCI_CAPABILITY_LIST), 0x40);
        assert_eq!(
            c.capabilities(),
            vec![(PCI_CAP_ID_VNDR, 0x40), (PCI_CAP_ID_MSIX, 0x48)]
        );
        // Header bytes and the read-only body are not writable; declared bits are.
        c.write(0x40, &[0xff; 4]);
        assert_eq!(c.read_u32(0x40), 0x0110_4809);
        c.write(0x4a, &[0xff, 0xff]);
        assert_eq!(c.read_u16(0x4a), 0xc000);
        assert!(matches!(
            c.add_capability(1, &[0; 2], &[0; 1]),
            Err(PciConfigError::BadCapabilityMask { .. })
        ));
        assert!(matches!(
            c.add_capability(1, &[0; 200], &[]),
            Err(PciConfigError::NoCapabilitySpace { .. })
        ));
    }

    #[test]
    fn looping_capability_list_is_bounded() {
        let mut c = PciConfiguration::new(&header());
        c.add_capability(PCI_CAP_ID_VNDR, &[0; 2], &[]).unwrap();
        // Make the capability point at itself.
        c.put(0x41, &[0x40]);
        assert_eq!(c.capabilities().len(), 48);
    }
}
