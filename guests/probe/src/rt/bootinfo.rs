//! Boot information from either entry path, copied out of guest memory early
//! (before the AP trampoline or anything else may overwrite low memory).

use super::io::phys_read;
use crate::layout::{BOOT_LINUX64, BOOT_PVH};
use crate::ring0::{BOOT_INFO_PADDR, BOOT_PROTOCOL};
use core::sync::atomic::Ordering;

pub const PVH_MAGIC: u32 = 0x336e_c578;
pub const MAX_CMDLINE: usize = 2048;
pub const MAX_REGIONS: usize = 128;
/// E820 / PVH memory type for usable RAM.
pub const MEM_RAM: u32 = 1;

#[derive(Clone, Copy, Default)]
pub struct Region {
    pub base: u64,
    pub size: u64,
    pub kind: u32,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Pvh,
    Linux64,
}

impl Entry {
    pub fn name(self) -> &'static str {
        match self {
            Entry::Pvh => "pvh",
            Entry::Linux64 => "linux64",
        }
    }
}

pub struct BootInfo {
    pub entry: Entry,
    /// Physical address of `hvm_start_info` or `boot_params`.
    pub info_paddr: u64,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    regions: [Region; MAX_REGIONS],
    nregions: usize,
    /// ACPI RSDP from the boot protocol, if it gave one.
    pub rsdp: Option<u64>,
}

impl BootInfo {
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.nregions]
    }

    /// Sum of usable RAM in bytes.
    pub fn usable_bytes(&self) -> u64 {
        self.regions()
            .iter()
            .filter(|r| r.kind == MEM_RAM)
            .map(|r| r.size)
            .sum()
    }

    fn push_region(&mut self, base: u64, size: u64, kind: u32) {
        if self.nregions < MAX_REGIONS && size != 0 {
            self.regions[self.nregions] = Region { base, size, kind };
            self.nregions += 1;
        }
    }

    fn copy_cmdline(&mut self, paddr: u64) {
        if paddr == 0 {
            return;
        }
        let mut n = 0;
        while n < MAX_CMDLINE {
            // SAFETY: the boot protocol gave this NUL-terminated string in RAM.
            let c: u8 = unsafe { phys_read(paddr + n as u64) };
            if c == 0 {
                break;
            }
            // Keep the output line printable.
            self.cmdline[n] = if c == b'"' {
                b'\''
            } else if c.is_ascii_graphic() {
                c
            } else {
                b' '
            };
            n += 1;
        }
        // Trim trailing blanks.
        while n > 0 && self.cmdline[n - 1] == b' ' {
            n -= 1;
        }
        self.cmdline_len = n;
    }
}

/// Why the boot information could not be read.
pub enum BootError {
    BadPvhMagic(u32),
    UnknownProtocol(u32),
}

/// Parse what the entry point left in `BOOT_PROTOCOL` / `BOOT_INFO_PADDR`.
pub fn parse() -> Result<BootInfo, BootError> {
    let protocol = BOOT_PROTOCOL.load(Ordering::Relaxed);
    let paddr = BOOT_INFO_PADDR.load(Ordering::Relaxed);
    let mut bi = BootInfo {
        entry: Entry::Pvh,
        info_paddr: paddr,
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
        regions: [Region::default(); MAX_REGIONS],
        nregions: 0,
        rsdp: None,
    };
    match protocol {
        BOOT_PVH => {
            // SAFETY: EBX at the PVH entry pointed to hvm_start_info in RAM.
            let magic: u32 = unsafe { phys_read(paddr) };
            if magic != PVH_MAGIC {
                return Err(BootError::BadPvhMagic(magic));
            }
            // SAFETY: fields of hvm_start_info (layout of version 0/1).
            unsafe {
                let version: u32 = phys_read(paddr + 4);
                let cmdline: u64 = phys_read(paddr + 24);
                let rsdp: u64 = phys_read(paddr + 32);
                bi.copy_cmdline(cmdline);
                bi.rsdp = (rsdp != 0).then_some(rsdp);
                if version >= 1 {
                    let map: u64 = phys_read(paddr + 40);
                    let entries: u32 = phys_read(paddr + 48);
                    for i in 0..u64::from(entries).min(MAX_REGIONS as u64) {
                        let e = map + i * 24;
                        bi.push_region(phys_read(e), phys_read(e + 8), phys_read(e + 16));
                    }
                }
            }
        }
        BOOT_LINUX64 => {
            bi.entry = Entry::Linux64;
            // SAFETY: RSI at the 64-bit entry pointed to boot_params (zero page).
            unsafe {
                let rsdp: u64 = phys_read(paddr + 0x070);
                let ext_cmdline: u32 = phys_read(paddr + 0x0c8);
                let e820_entries: u8 = phys_read(paddr + 0x1e8);
                let cmdline: u32 = phys_read(paddr + 0x228);
                bi.copy_cmdline((u64::from(ext_cmdline) << 32) | u64::from(cmdline));
                bi.rsdp = (rsdp != 0).then_some(rsdp);
                for i in 0..u64::from(e820_entries).min(128) {
                    let e = paddr + 0x2d0 + i * 20;
                    bi.push_region(phys_read(e), phys_read(e + 8), phys_read(e + 16));
                }
            }
        }
        other => return Err(BootError::UnknownProtocol(other)),
    }
    Ok(bi)
}
