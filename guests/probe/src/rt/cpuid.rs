//! CPUID from ring 3.

use core::arch::x86_64::{__cpuid_count, CpuidResult};

pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    __cpuid_count(leaf, subleaf)
}

pub fn max_leaf() -> u32 {
    cpuid(0, 0).eax
}

/// 12-byte vendor/signature string from ebx, ecx, edx (vendor leaf order).
pub fn vendor() -> [u8; 12] {
    let r = cpuid(0, 0);
    regs_to_str(r.ebx, r.edx, r.ecx)
}

/// Hypervisor signature of leaf 0x40000000 (ebx, ecx, edx order) and max leaf.
pub fn hypervisor() -> ([u8; 12], u32) {
    let r = cpuid(0x4000_0000, 0);
    (regs_to_str(r.ebx, r.ecx, r.edx), r.eax)
}

pub fn regs_to_str(a: u32, b: u32, c: u32) -> [u8; 12] {
    let mut s = [0u8; 12];
    s[0..4].copy_from_slice(&a.to_le_bytes());
    s[4..8].copy_from_slice(&b.to_le_bytes());
    s[8..12].copy_from_slice(&c.to_le_bytes());
    s
}

/// Printable form of a signature (NULs and non-graphic bytes dropped).
pub fn sig_str(sig: &[u8; 12], buf: &mut [u8; 12]) -> usize {
    let mut n = 0;
    for &c in sig {
        if c.is_ascii_graphic() {
            buf[n] = c;
            n += 1;
        }
    }
    n
}

/// TSC frequency in kHz from CPUID, if reported (0x40000010, 0x15, 0x16).
pub fn tsc_khz() -> Option<u64> {
    let (_, hv_max) = hypervisor();
    if hv_max >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010, 0).eax;
        if khz != 0 {
            return Some(u64::from(khz));
        }
    }
    let max = max_leaf();
    if max >= 0x15 {
        let r = cpuid(0x15, 0);
        if r.eax != 0 && r.ebx != 0 && r.ecx != 0 {
            return Some(u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax) / 1000);
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16, 0).eax & 0xffff;
        if mhz != 0 {
            return Some(u64::from(mhz) * 1000);
        }
    }
    None
}
