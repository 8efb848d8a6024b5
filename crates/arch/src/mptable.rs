//! Intel MultiProcessor Specification 1.4 table, so guests find every vCPU, the IOAPIC and the
//! ISA interrupt routing without ACPI (`acpi=off` guests and the probe guest rely on it).
//!
//! No maintained crate writes MP tables, so this is tern's own, small, code.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{APIC_START, IOAPIC_START, MPTABLE_END, MPTABLE_START};

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Unsupported vCPU count.
    #[error("an MP table can describe 1 to 254 vCPUs, not {0}")]
    TooManyCpus(u32),
    /// The table does not fit in the BIOS area.
    #[error("the MP table ({0} bytes) does not fit in the BIOS area")]
    TooBig(usize),
    /// Guest memory write failed.
    #[error("cannot write the MP table into guest memory")]
    Write,
}

const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const NUM_IRQS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer structure followed by the configuration table, as placed at
/// `base`. The IOAPIC gets APIC ID `num_cpus`.
pub fn build(num_cpus: u32, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus as u8;
    let table_addr = base + 16;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[0, cpu as u8, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&0x0000_0600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // FPU + APIC
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n -> IOAPIC pin n, as KVM's default routing does.
    for irq in 0..NUM_IRQS {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0: ExtINT (the 8259), LINT1: NMI, on every LAPIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    let table_len = 44 + entries.len();
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"TERN    ");
    header.extend_from_slice(b"TERNVM      ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);

    let mut out = mpf;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs at [`MPTABLE_START`].
pub fn setup_mptable<M: GuestMemory>(mem: &M, num_cpus: u32) -> Result<(), MptableError> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    if bytes.len() as u64 > MPTABLE_END - MPTABLE_START {
        return Err(MptableError::TooBig(bytes.len()));
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for n in [1u32, 2, 8, 254] {
            let t = build(n, MPTABLE_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, MPTABLE_START + 16);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap()) as u32;
            assert_eq!(count, n + 1 + 1 + 24 + 2);
            // Walk the entries: processors first, each with its APIC ID; BSP flagged.
            let mut off = 44;
            let mut cpus = 0;
            while off < table.len() {
                let size = if table[off] == 0 { 20 } else { 8 };
                if table[off] == 0 {
                    assert_eq!(table[off + 1] as u32, cpus);
                    assert_eq!(table[off + 3] & CPU_BSP != 0, cpus == 0);
                    cpus += 1;
                }
                off += size;
            }
            assert_eq!(off, table.len());
            assert_eq!(cpus, n);
        }
    }

    #[test]
    fn bad_counts() {
        assert!(matches!(build(0, 0), Err(MptableError::TooManyCpus(0))));
        assert!(matches!(build(255, 0), Err(MptableError::TooManyCpus(255))));
    }

    #[test]
    fn fits_in_guest() {
        let m =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        setup_mptable(&m, 254).unwrap();
        let small =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(setup_mptable(&small, 1).is_err());
    }
}
