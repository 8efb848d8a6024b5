//! PCI configuration space through the legacy mechanism (address port 0xCF8,
//! data ports 0xCFC–0xCFF), from ring 3. Every access is two port exits.

use core::fmt;

use super::io::{inb, inl, inw, outl, outw};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Configuration-space offsets of a type-0 header.
pub const VENDOR_ID: u8 = 0x00;
pub const COMMAND: u8 = 0x04;
pub const STATUS: u8 = 0x06;
pub const SUBSYSTEM_ID: u8 = 0x2e;
pub const HEADER_TYPE: u8 = 0x0e;
pub const BAR0: u8 = 0x10;
pub const CAP_PTR: u8 = 0x34;

pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const STATUS_CAP_LIST: u16 = 1 << 4;
const HEADER_MULTI_FUNCTION: u8 = 0x80;

/// Bus/device/function.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

impl Bdf {
    fn select(self, offset: u8) {
        let addr = 1 << 31
            | u32::from(self.bus) << 16
            | u32::from(self.dev & 31) << 11
            | u32::from(self.func & 7) << 8
            | u32::from(offset & 0xfc);
        outl(CONFIG_ADDRESS, addr);
    }

    pub fn read32(self, offset: u8) -> u32 {
        self.select(offset);
        inl(CONFIG_DATA)
    }

    pub fn read16(self, offset: u8) -> u16 {
        self.select(offset);
        inw(CONFIG_DATA + u16::from(offset & 2))
    }

    pub fn read8(self, offset: u8) -> u8 {
        self.select(offset);
        inb(CONFIG_DATA + u16::from(offset & 3))
    }

    pub fn write16(self, offset: u8, value: u16) {
        self.select(offset);
        outw(CONFIG_DATA + u16::from(offset & 2), value);
    }

    /// Memory address of BAR `index`, as assigned by the VMM or firmware
    /// (never reprogrammed). `None` for an I/O BAR, the upper half of a 64-bit
    /// BAR or a BAR index out of range; `Some(0)` means unassigned.
    pub fn mem_bar(self, index: u8) -> Option<u64> {
        if index > 5 {
            return None;
        }
        let lo = self.read32(BAR0 + 4 * index);
        if lo & 1 != 0 {
            return None;
        }
        let base = u64::from(lo & !0xf);
        match (lo >> 1) & 3 {
            0 => Some(base),
            2 if index < 5 => Some(base | u64::from(self.read32(BAR0 + 4 * (index + 1))) << 32),
            _ => None,
        }
    }

    /// Set bits in the command register (read-modify-write of 16 bits).
    pub fn enable(self, bits: u16) {
        let cmd = self.read16(COMMAND);
        if cmd & bits != bits {
            self.write16(COMMAND, cmd | bits);
        }
    }

    /// Offsets of the capabilities with ID `id`, in list order; `f` returns
    /// false to stop. The walk is bounded (a malformed list cannot loop).
    pub fn for_each_cap(self, id: u8, mut f: impl FnMut(u8) -> bool) {
        if self.read16(STATUS) & STATUS_CAP_LIST == 0 {
            return;
        }
        let mut ptr = self.read8(CAP_PTR) & 0xfc;
        for _ in 0..48 {
            if ptr < 0x40 {
                return;
            }
            let head = self.read16(ptr);
            if head as u8 == id && !f(ptr) {
                return;
            }
            ptr = (head >> 8) as u8 & 0xfc;
        }
    }
}

/// Calls `f(bdf, vendor_device_dword)` for every function present on bus 0.
pub fn scan_bus0(mut f: impl FnMut(Bdf, u32)) {
    for dev in 0..32 {
        let first = Bdf {
            bus: 0,
            dev,
            func: 0,
        };
        let id = first.read32(VENDOR_ID);
        if id & 0xffff == 0xffff || id & 0xffff == 0 {
            continue;
        }
        f(first, id);
        if first.read8(HEADER_TYPE) & HEADER_MULTI_FUNCTION == 0 {
            continue;
        }
        for func in 1..8 {
            let bdf = Bdf { bus: 0, dev, func };
            let id = bdf.read32(VENDOR_ID);
            if id & 0xffff != 0xffff && id & 0xffff != 0 {
                f(bdf, id);
            }
        }
    }
}
