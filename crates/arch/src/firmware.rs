//! Firmware boots: where a firmware image (SeaBIOS, or any flat image with an x86 reset
//! vector) goes in guest memory, and the memory map tern hands it through fw_cfg.
//!
//! The image is mapped read-only so that it ends at 4 GiB, where the vCPU's reset vector
//! (0xffff_fff0) lies; its last 256 KiB (or all of it, if smaller) are also copied into RAM
//! below 1 MiB, ending at 0x100000, where its real-mode and 32-bit code runs. On a PC the
//! chipset shows the last 128 KiB there and SeaBIOS copies the rest itself once it has made
//! that RAM writable through the host bridge's PAM registers; tern's RAM there is always
//! writable and it has no PAM registers, so tern makes the copy SeaBIOS would have made.
//! Nothing else is written into guest memory: the firmware builds its own tables and asks
//! fw_cfg for the rest.

use crate::layout::*;
use crate::memory::low_ram_end;

/// Smallest firmware image: 64 KiB.
pub const FIRMWARE_MIN_SIZE: u64 = 64 << 10;
/// How much of the image is copied below 1 MiB (0xc0000..0x100000).
pub const LEGACY_ALIAS_MAX: u64 = 256 << 10;
/// fw_cfg file of the memory map.
pub const E820_FILE: &str = "etc/e820";
/// Bytes per entry of the fw_cfg memory map: address, length (u64), type (u32).
const E820_ENTRY_LEN: usize = 20;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// A firmware image that cannot be used, with the reason in a few words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FirmwareError {
    /// Too small, too large or not a whole number of pages.
    #[error("{0} bytes is not a firmware image size (64 KiB to 16 MiB, in 4 KiB pages)")]
    Size(u64),
    /// The last 16 bytes hold no jump instruction.
    #[error("it has no x86 reset vector (no jump in its last 16 bytes)")]
    NoResetVector,
    /// A UEFI variable store that is empty, not in 4 KiB blocks, or too large beside the code.
    #[error("{0} bytes is not a UEFI variable store size (4 KiB blocks, code and variables 16 MiB at most)")]
    VarsSize(u64),
}

/// Checks that `image` can be a flat x86 firmware image: its size, and a jump at its reset
/// vector (16 bytes before its end, after NOPs), which catches truncated, empty and unrelated
/// files.
pub fn check_image(image: &[u8]) -> Result<(), FirmwareError> {
    let len = image.len() as u64;
    if !(FIRMWARE_MIN_SIZE..=FIRMWARE_MAX_SIZE).contains(&len) || !len.is_multiple_of(4096) {
        return Err(FirmwareError::Size(len));
    }
    let vector = &image[image.len() - 16..];
    match vector.iter().find(|&&b| b != 0x90) {
        // jmp far, jmp near, jmp short.
        Some(0xe9..=0xeb) => Ok(()),
        _ => Err(FirmwareError::NoResetVector),
    }
}

/// Guest address of an image of `len` bytes: it ends at 4 GiB.
pub fn rom_base(len: u64) -> u64 {
    RAM_64BIT_START - len
}

/// Checks a UEFI variable store of `vars_len` bytes for a code image of `code_len` bytes, and
/// returns its guest address: right below the code, as OVMF's flash layout has it.
pub fn vars_base(code_len: u64, vars_len: u64) -> Result<u64, FirmwareError> {
    if vars_len == 0
        || !vars_len.is_multiple_of(4096)
        || code_len.saturating_add(vars_len) > FIRMWARE_MAX_SIZE
    {
        return Err(FirmwareError::VarsSize(vars_len));
    }
    Ok(rom_base(code_len) - vars_len)
}

/// Where the copy of the image's top below 1 MiB goes, and which bytes of `image` it holds.
pub fn legacy_alias(image: &[u8]) -> (u64, &[u8]) {
    let n = (image.len() as u64).min(LEGACY_ALIAS_MAX) as usize;
    (HIMEM_START - n as u64, &image[image.len() - n..])
}

/// The memory map firmware reads from fw_cfg (`etc/e820`) for `mem_size` bytes of RAM: all RAM
/// below the 32-bit hole from address 0 (the firmware carves out its own areas) and above 4
/// GiB, the PCIe ECAM window and KVM's TSS and identity-map pages reserved.
pub fn e820_file(mem_size: u64) -> Vec<u8> {
    let mut entries = vec![(0, low_ram_end(mem_size), E820_RAM)];
    if mem_size > MMIO_HOLE_START {
        entries.push((RAM_64BIT_START, mem_size - MMIO_HOLE_START, E820_RAM));
    }
    entries.push((PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    entries.push((
        KVM_IDENTITY_MAP_ADDRESS,
        KVM_TSS_ADDRESS + 3 * 4096 - KVM_IDENTITY_MAP_ADDRESS,
        E820_RESERVED,
    ));
    let mut out = Vec::with_capacity(entries.len() * E820_ENTRY_LEN);
    for (addr, len, kind) in entries {
        out.extend_from_slice(&u64::to_le_bytes(addr));
        out.extend_from_slice(&u64::to_le_bytes(len));
        out.extend_from_slice(&u32::to_le_bytes(kind));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        // jmp far f000:e05b, as SeaBIOS has it.
        v[len - 16..len - 11].copy_from_slice(&[0xea, 0x5b, 0xe0, 0x00, 0xf0]);
        v
    }

    #[test]
    fn images_are_checked() {
        assert_eq!(check_image(&image(256 << 10)), Ok(()));
        let mut nops = image(64 << 10);
        let n = nops.len();
        nops[n - 16..n - 13].copy_from_slice(&[0x90, 0x90, 0xe9]);
        assert_eq!(check_image(&nops), Ok(()));
        assert_eq!(
            check_image(&vec![0u8; 256 << 10]),
            Err(FirmwareError::NoResetVector)
        );
        assert_eq!(check_image(&image(4096)), Err(FirmwareError::Size(4096)));
        assert_eq!(
            check_image(&image((256 << 10) + 512)),
            Err(FirmwareError::Size((256 << 10) + 512))
        );
        assert!(check_image(&image(32 << 20)).is_err());
    }

    #[test]
    fn the_uefi_64_bit_window_is_ovmfs() {
        // OVMF with 40 physical address bits put its 64-bit BARs at 0xe0_0000_0000.
        assert_eq!(uefi_pci_mmio64(40), 0xe0_0000_0000..0x100_0000_0000);
        assert_eq!(uefi_pci_mmio64(48).end, 1 << 48);
        assert_eq!(uefi_pci_mmio64(0), uefi_pci_mmio64(36));
        assert_eq!(uefi_pci_mmio64(99), uefi_pci_mmio64(52));
    }

    #[test]
    fn uefi_variables_sit_below_the_code() {
        // OVMF's 4 MiB layout: 528 KiB of variables, then the code up to 4 GiB.
        let (code, vars) = (0x37c000, 0x84000);
        assert_eq!(vars_base(code, vars), Ok(0xffc0_0000));
        for bad in [0, 4095, 13 << 20] {
            assert_eq!(vars_base(code, bad), Err(FirmwareError::VarsSize(bad)));
        }
    }

    #[test]
    fn the_image_ends_at_4g_and_its_top_is_below_1m() {
        let img = image(256 << 10);
        assert_eq!(rom_base(img.len() as u64), 0xfffc_0000);
        let (at, bytes) = legacy_alias(&img);
        assert_eq!(at, 0xc_0000);
        assert_eq!(bytes.len(), 256 << 10);
        assert_eq!(&bytes[bytes.len() - 16..], &img[img.len() - 16..]);
        let small = image(64 << 10);
        assert_eq!(legacy_alias(&small).0, 0xf_0000);
        // Below the firmware: KVM's pages.
        assert!(KVM_TSS_ADDRESS + 3 * 4096 <= rom_base(FIRMWARE_MAX_SIZE));
    }

    #[test]
    fn memory_map_for_firmware() {
        let e = |m: &[u8], i: usize| {
            let b = &m[i * 20..(i + 1) * 20];
            (
                u64::from_le_bytes(b[0..8].try_into().unwrap()),
                u64::from_le_bytes(b[8..16].try_into().unwrap()),
                u32::from_le_bytes(b[16..20].try_into().unwrap()),
            )
        };
        let m = e820_file(1 << 30);
        assert_eq!(m.len(), 3 * 20);
        assert_eq!(e(&m, 0), (0, 1 << 30, 1));
        assert_eq!(e(&m, 1), (PCI_ECAM_START, PCI_ECAM_SIZE, 2));
        assert_eq!(e(&m, 2), (0xfeff_c000, 0x4000, 2));
        let m = e820_file(4 << 30);
        assert_eq!(e(&m, 0), (0, MMIO_HOLE_START, 1));
        assert_eq!(e(&m, 1), (1 << 32, (4 << 30) - MMIO_HOLE_START, 1));
    }
}
