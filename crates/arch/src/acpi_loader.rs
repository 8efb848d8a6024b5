//! ACPI tables for firmware boots, handed over the way SeaBIOS and OVMF take them: as fw_cfg
//! files plus a *linker/loader script* (`etc/table-loader`) that tells the firmware where to
//! put them and how to patch them, since only the firmware knows which memory it leaves to the
//! OS.
//!
//! Hand-written: no crate produces this script. Its format (QEMU's `bios-linker-loader`, which
//! SeaBIOS's `romfile_loader` and OVMF's `AcpiPlatformDxe` read) is a list of 128-byte
//! little-endian commands:
//! - ALLOCATE (1): load file F, aligned, in the high zone (1) or the F segment (2, for the RSDP
//!   that guests find by scanning 0xe0000..0x100000);
//! - ADD_POINTER (2): add the address where file S landed to the `size`-byte field at
//!   `offset` of file D (so the field holds an offset into S beforehand);
//! - ADD_CHECKSUM (3): set the byte at `offset` of file F so bytes `start..start+length` sum to
//!   zero.
//!
//! The tables themselves are the ones [`crate::acpi::build`] makes for direct boots, laid out
//! at their offsets from the first table: every pointer between them (RSDP → XSDT, XSDT →
//! tables, FADT → DSDT) becomes an offset and an ADD_POINTER, every checksum an ADD_CHECKSUM.

use crate::acpi::{build, AcpiError, AcpiPlatform};

/// fw_cfg file of the tables (everything but the RSDP).
pub const TABLES_FILE: &str = "etc/acpi/tables";
/// fw_cfg file of the RSDP.
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
/// fw_cfg file of the linker/loader script.
pub const LOADER_FILE: &str = "etc/table-loader";

const CMD_ALLOCATE: u32 = 1;
const CMD_ADD_POINTER: u32 = 2;
const CMD_ADD_CHECKSUM: u32 = 3;
const ZONE_HIGH: u8 = 1;
const ZONE_FSEG: u8 = 2;
const COMMAND_LEN: usize = 128;
const NAME_LEN: usize = 56;
/// Bytes of the ACPI 1.0 part of the RSDP (its first checksum covers them).
const RSDP_V1_LEN: u32 = 20;

/// The three fw_cfg files of a firmware boot's ACPI tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirmwareAcpi {
    /// `etc/acpi/tables`.
    pub tables: Vec<u8>,
    /// `etc/acpi/rsdp`.
    pub rsdp: Vec<u8>,
    /// `etc/table-loader`.
    pub loader: Vec<u8>,
}

fn name(n: &str) -> [u8; NAME_LEN] {
    let mut b = [0u8; NAME_LEN];
    b[..n.len()].copy_from_slice(n.as_bytes());
    b
}

fn allocate(file: &str, align: u32, zone: u8) -> [u8; COMMAND_LEN] {
    let mut c = [0u8; COMMAND_LEN];
    c[0..4].copy_from_slice(&CMD_ALLOCATE.to_le_bytes());
    c[4..60].copy_from_slice(&name(file));
    c[60..64].copy_from_slice(&align.to_le_bytes());
    c[64] = zone;
    c
}

fn add_pointer(dest: &str, src: &str, offset: u32, size: u8) -> [u8; COMMAND_LEN] {
    let mut c = [0u8; COMMAND_LEN];
    c[0..4].copy_from_slice(&CMD_ADD_POINTER.to_le_bytes());
    c[4..60].copy_from_slice(&name(dest));
    c[60..116].copy_from_slice(&name(src));
    c[116..120].copy_from_slice(&offset.to_le_bytes());
    c[120] = size;
    c
}

fn add_checksum(file: &str, offset: u32, start: u32, length: u32) -> [u8; COMMAND_LEN] {
    let mut c = [0u8; COMMAND_LEN];
    c[0..4].copy_from_slice(&CMD_ADD_CHECKSUM.to_le_bytes());
    c[4..60].copy_from_slice(&name(file));
    c[60..64].copy_from_slice(&offset.to_le_bytes());
    c[64..68].copy_from_slice(&start.to_le_bytes());
    c[68..72].copy_from_slice(&length.to_le_bytes());
    c
}

/// Turns the pointer field of `size` bytes at `at` of `blob` (an absolute address inside
/// `base..base+len`) into an offset from `base`; returns whether it did (a zero or outside
/// field is left alone).
fn relocate(blob: &mut [u8], at: usize, size: usize, base: u64, len: u64) -> bool {
    let mut v = [0u8; 8];
    v[..size].copy_from_slice(&blob[at..at + size]);
    let addr = u64::from_le_bytes(v);
    if addr == 0 || addr < base || addr >= base + len {
        return false;
    }
    blob[at..at + size].copy_from_slice(&(addr - base).to_le_bytes()[..size]);
    true
}

/// The tables of `platform` as fw_cfg files and the script that loads them.
pub fn firmware_acpi(platform: &AcpiPlatform) -> Result<FirmwareAcpi, AcpiError> {
    let (pieces, rsdp_addr) = build(platform)?;
    let tables: Vec<&(u64, Vec<u8>)> = pieces.iter().filter(|(a, _)| *a != rsdp_addr).collect();
    let base = tables.iter().map(|(a, _)| *a).min().unwrap_or(0);
    let end = tables
        .iter()
        .map(|(a, d)| a + d.len() as u64)
        .max()
        .unwrap_or(base);
    let len = end - base;
    let mut blob = vec![0u8; len as usize];
    for (a, d) in &tables {
        let at = (a - base) as usize;
        blob[at..at + d.len()].copy_from_slice(d);
    }
    let mut rsdp = pieces
        .iter()
        .find(|(a, _)| *a == rsdp_addr)
        .map(|(_, d)| d.clone())
        .unwrap_or_default();

    let mut pointers = Vec::new();
    let mut checksums = Vec::new();
    for (a, d) in &tables {
        let at = (a - base) as usize;
        let table_len = d.len();
        let fields: Vec<(usize, usize)> = match &d[0..4] {
            b"XSDT" => (36..table_len).step_by(8).map(|o| (o, 8)).collect(),
            b"RSDT" => (36..table_len).step_by(4).map(|o| (o, 4)).collect(),
            // FIRMWARE_CTRL, DSDT, X_FIRMWARE_CTRL, X_DSDT.
            b"FACP" => vec![(36, 4), (40, 4), (132, 8), (140, 8)],
            _ => Vec::new(),
        };
        for (off, size) in fields {
            if off + size <= table_len && relocate(&mut blob, at + off, size, base, len) {
                pointers.push(add_pointer(
                    TABLES_FILE,
                    TABLES_FILE,
                    (at + off) as u32,
                    size as u8,
                ));
            }
        }
        // Every table but the FACS has a checksum. Its byte starts at zero: OVMF stores the
        // sum of the range, that byte included, where SeaBIOS subtracts it from the byte; only
        // from zero do both get it right.
        if &d[0..4] != b"FACS" {
            blob[at + 9] = 0;
            checksums.push(add_checksum(
                TABLES_FILE,
                (at + 9) as u32,
                at as u32,
                table_len as u32,
            ));
        }
    }
    // The RSDP: RSDT (32 bit) and XSDT (64 bit) addresses, and its two checksums.
    for (off, size) in [(16usize, 4usize), (24, 8)] {
        if off + size <= rsdp.len() && relocate(&mut rsdp, off, size, base, len) {
            pointers.push(add_pointer(RSDP_FILE, TABLES_FILE, off as u32, size as u8));
        }
    }
    rsdp[8] = 0;
    checksums.push(add_checksum(RSDP_FILE, 8, 0, RSDP_V1_LEN));
    if rsdp.len() >= 36 {
        rsdp[32] = 0;
        checksums.push(add_checksum(RSDP_FILE, 32, 0, rsdp.len() as u32));
    }

    let mut loader = Vec::new();
    // A FACS must be 64-byte aligned; the tables keep their offsets from the first one.
    let align = if base % 64 == 0 { 64 } else { 16 };
    loader.extend_from_slice(&allocate(TABLES_FILE, align, ZONE_HIGH));
    loader.extend_from_slice(&allocate(RSDP_FILE, 16, ZONE_FSEG));
    for c in pointers.iter().chain(checksums.iter()) {
        loader.extend_from_slice(c);
    }
    Ok(FirmwareAcpi {
        tables: blob,
        rsdp,
        loader,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::PciAcpi;

    /// How a firmware applies ADD_CHECKSUM: SeaBIOS subtracts the range's sum from the byte,
    /// OVMF stores the checksum of the range, the byte included.
    #[derive(Clone, Copy)]
    enum Checksums {
        SeaBios,
        Ovmf,
    }

    /// Runs a loader script the way SeaBIOS and OVMF do, placing each file at the address given;
    /// both must give the same bytes.
    fn run(f: &FirmwareAcpi, tables_at: u64, rsdp_at: u64) -> (Vec<u8>, Vec<u8>) {
        let seabios = run_as(f, tables_at, rsdp_at, Checksums::SeaBios);
        assert_eq!(seabios, run_as(f, tables_at, rsdp_at, Checksums::Ovmf));
        seabios
    }

    fn run_as(
        f: &FirmwareAcpi,
        tables_at: u64,
        rsdp_at: u64,
        how: Checksums,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut tables = f.tables.clone();
        let mut rsdp = f.rsdp.clone();
        let addr = |n: &str| match n {
            TABLES_FILE => tables_at,
            RSDP_FILE => rsdp_at,
            other => panic!("unknown file {other}"),
        };
        let file_name = |b: &[u8]| {
            let end = b.iter().position(|&c| c == 0).unwrap();
            String::from_utf8(b[..end].to_vec()).unwrap()
        };
        for c in f.loader.chunks(COMMAND_LEN) {
            let cmd = u32::from_le_bytes(c[0..4].try_into().unwrap());
            match cmd {
                CMD_ALLOCATE => {
                    let n = file_name(&c[4..60]);
                    let align = u32::from_le_bytes(c[60..64].try_into().unwrap());
                    assert_eq!(addr(&n) % u64::from(align), 0);
                }
                CMD_ADD_POINTER => {
                    let dest = file_name(&c[4..60]);
                    let src = file_name(&c[60..116]);
                    let off = u32::from_le_bytes(c[116..120].try_into().unwrap()) as usize;
                    let size = c[120] as usize;
                    let d = if dest == TABLES_FILE {
                        &mut tables
                    } else {
                        &mut rsdp
                    };
                    let mut v = [0u8; 8];
                    v[..size].copy_from_slice(&d[off..off + size]);
                    let p = u64::from_le_bytes(v) + addr(&src);
                    d[off..off + size].copy_from_slice(&p.to_le_bytes()[..size]);
                }
                CMD_ADD_CHECKSUM => {
                    let n = file_name(&c[4..60]);
                    let off = u32::from_le_bytes(c[60..64].try_into().unwrap()) as usize;
                    let start = u32::from_le_bytes(c[64..68].try_into().unwrap()) as usize;
                    let len = u32::from_le_bytes(c[68..72].try_into().unwrap()) as usize;
                    let d = if n == TABLES_FILE {
                        &mut tables
                    } else {
                        &mut rsdp
                    };
                    let sum = d[start..start + len]
                        .iter()
                        .fold(0u8, |a, x| a.wrapping_add(*x));
                    d[off] = match how {
                        Checksums::SeaBios => d[off].wrapping_sub(sum),
                        Checksums::Ovmf => 0u8.wrapping_sub(sum),
                    };
                }
                other => panic!("unknown command {other}"),
            }
        }
        (tables, rsdp)
    }

    /// Loaded where the direct boot puts them, the tables are byte for byte the direct boot's.
    #[test]
    fn loaded_tables_equal_the_direct_boot_tables() {
        let platform = AcpiPlatform {
            num_cpus: 2,
            max_cpus: 4,
            pci: Some(PciAcpi {
                ecam_base: 0xe000_0000,
                last_bus: 0,
            }),
            devices: vec![0x08, b'T', b'D', b'E', b'V', 0x00],
            legacy_pm: None,
        };
        let f = firmware_acpi(&platform).unwrap();
        assert_eq!(f.loader.len() % COMMAND_LEN, 0);
        let (pieces, rsdp_addr) = build(&platform).unwrap();
        let base = pieces
            .iter()
            .filter(|(a, _)| *a != rsdp_addr)
            .map(|(a, _)| *a)
            .min()
            .unwrap();
        let (tables, rsdp) = run(&f, base, rsdp_addr);
        for (a, d) in &pieces {
            if *a == rsdp_addr {
                assert_eq!(&rsdp, d);
            } else {
                let at = (a - base) as usize;
                assert_eq!(&tables[at..at + d.len()], &d[..], "{:?}", &d[0..4]);
            }
        }
    }

    /// Loaded elsewhere, every pointer follows and every checksum holds.
    #[test]
    fn tables_loaded_anywhere_point_at_each_other() {
        let platform = AcpiPlatform {
            num_cpus: 1,
            max_cpus: 1,
            pci: None,
            devices: Vec::new(),
            legacy_pm: None,
        };
        let f = firmware_acpi(&platform).unwrap();
        let at = 0x7ffe_0000u64;
        let (tables, rsdp) = run(&f, at, 0xf5a30);
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let table = |addr: u64| {
            let o = (addr - at) as usize;
            let len = u32::from_le_bytes(tables[o + 4..o + 8].try_into().unwrap()) as usize;
            &tables[o..o + len]
        };
        let x = table(xsdt);
        assert_eq!(&x[0..4], b"XSDT");
        assert_eq!(sum(x), 0);
        let mut sigs = Vec::new();
        for e in x[36..].chunks(8) {
            let t = table(u64::from_le_bytes(e.try_into().unwrap()));
            assert_eq!(sum(t), 0);
            sigs.push(t[0..4].to_vec());
            if &t[0..4] == b"FACP" {
                let dsdt = table(u64::from_le_bytes(t[140..148].try_into().unwrap()));
                assert_eq!(&dsdt[0..4], b"DSDT");
                assert_eq!(sum(dsdt), 0);
            }
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }

    /// With full ACPI (firmware boots): the FADT names the PM1 blocks and a 64-byte aligned
    /// FACS that follows the tables wherever they go, and is not hardware-reduced.
    #[test]
    fn full_acpi_has_a_facs_and_pm1_blocks() {
        let platform = AcpiPlatform {
            num_cpus: 1,
            max_cpus: 1,
            pci: None,
            devices: Vec::new(),
            legacy_pm: Some(crate::layout::ACPI_PM1_BASE),
        };
        let f = firmware_acpi(&platform).unwrap();
        for at in [0x7ffe_0000u64, 0x3fff_e040] {
            let (tables, rsdp) = run(&f, at, 0xf5a30);
            let table = |addr: u64| &tables[(addr - at) as usize..];
            let xsdt = table(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
            let fadt = table(u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
            assert_eq!(&fadt[0..4], b"FACP");
            let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
            assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
            assert_eq!(u16::from_le_bytes(fadt[46..48].try_into().unwrap()), 9);
            assert_eq!(
                u32::from_le_bytes(fadt[56..60].try_into().unwrap()),
                0x600,
                "PM1a_EVT_BLK"
            );
            assert_eq!(u32::from_le_bytes(fadt[64..68].try_into().unwrap()), 0x604);
            assert_eq!(u32::from_le_bytes(fadt[76..80].try_into().unwrap()), 0x608);
            let facs_addr = u64::from_le_bytes(fadt[132..140].try_into().unwrap());
            assert_eq!(facs_addr % 64, 0);
            let facs = table(facs_addr);
            assert_eq!(&facs[0..4], b"FACS");
            assert_eq!(u32::from_le_bytes(facs[4..8].try_into().unwrap()), 64);
        }
    }
}
