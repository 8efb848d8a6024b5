//! ACPI tables (built with the `acpi_tables` crate): RSDP, XSDT, a hardware-reduced FADT with
//! sleep-control, sleep-status and reset registers, a MADT listing every vCPU and the IOAPIC,
//! an MCFG for PCI, and a DSDT: the `_S5_` sleep type so guests can power off, then whatever
//! the VM's devices say about themselves (each device renders its own AML).
//!
//! Hardware-reduced ACPI needs no PM1 event/control
//! blocks, no SCI and no PM timer: power-off and reset are single port writes that tern turns
//! into VM exits. Guests without MP-table support (e.g. Debian's cloud kernel has
//! `CONFIG_X86_MPPARSE` off) find their CPUs through the MADT.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::*;

/// The sleep type tern's `_S5_` object declares; the guest writes it (shifted, with SLP_EN)
/// to the sleep control register to power off.
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN bit of the hardware-reduced sleep control register.
pub const SLEEP_ENABLE: u8 = 1 << 5;

const OEM_ID: [u8; 6] = *b"TERNVM";
const OEM_TABLE_ID: [u8; 8] = *b"TERNVM01";
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags: no VGA (bit 2). (No 8042 bit: the i8042 is only there for
/// the reset line; there is a CMOS RTC.)
const IAPC_BOOT_ARCH: u16 = 1 << 2;
/// CMOS register holding the century.
const RTC_CENTURY_REG: u8 = 0x32;

/// ACPI errors.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in their area.
    #[error("ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooBig(u64),
    /// Guest memory write failed.
    #[error("cannot write ACPI tables into guest memory")]
    Write,
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_reg(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// The PCI root bridge's ECAM, as the MCFG describes it (the bridge describes itself in the
/// DSDT: `devices::pci::HostBridgeAcpi`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciAcpi {
    /// ECAM base.
    pub ecam_base: u64,
    /// Last bus number the ECAM covers.
    pub last_bus: u8,
}

/// What the ACPI tables describe besides the fixed hardware-reduced registers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcpiPlatform {
    /// Number of vCPUs at boot.
    pub num_cpus: u8,
    /// Most vCPUs (CPU hotplug); those beyond `num_cpus` are listed disabled but online
    /// capable. Below `num_cpus` (0 too) means `num_cpus`.
    pub max_cpus: u8,
    /// The PCI root bridge's ECAM (for the MCFG), when the VM has PCI.
    pub pci: Option<PciAcpi>,
    /// The devices' own descriptions, in DSDT order: each device renders itself (its
    /// `acpi_tables::Aml`), and the DSDT is `_S5_` followed by these bytes.
    pub devices: Vec<u8>,
    /// Full ACPI with fixed-hardware PM1 blocks and a PM timer at this port (e.g.
    /// [`ACPI_PM1_BASE`]), and a FACS, instead of hardware-reduced ACPI: for firmware boots,
    /// where the OS must take over the legacy PIC and PIT from the firmware, which it does only
    /// with full ACPI.
    pub legacy_pm: Option<u64>,
}

/// One table (or the RSDP) and where it goes in guest memory.
pub type TablePiece = (u64, Vec<u8>);

/// Builds all tables for `num_cpus` vCPUs; returns `(guest address, bytes)` pieces and the
/// RSDP address.
pub fn build(platform: &AcpiPlatform) -> Result<(Vec<TablePiece>, u64), AcpiError> {
    let num_cpus = platform.num_cpus;
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let mut next = align(rsdp_addr + Rsdp::len() as u64);
    // The FACS (full ACPI only) first, 64-byte aligned as it must be.
    let facs = platform.legacy_pm.map(|_| {
        let at = (next + 63) & !63;
        next = align(at + acpi_tables::facs::FACS::len() as u64);
        (at, bytes(&acpi_tables::facs::FACS::new()))
    });

    // DSDT: the S5 sleep type.
    // The body is built apart and appended once: `Sdt` sums the whole table again for every
    // byte appended to it, which for a DSDT of PCI hotplug slots took most of tern's start.
    let mut body = Vec::new();
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE]));
    s5.to_aml_bytes(&mut body);
    // Then every device's own description.
    body.vec(&platform.devices);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    let dsdt_bytes = bytes(&dsdt);
    let dsdt_addr = next;
    next = align(next + dsdt_bytes.len() as u64);

    // FADT.
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::PwrButton)
        .flag(Flags::ResetRegSup);
    if let (Some((facs_addr, _)), Some(pm1_base)) = (&facs, platform.legacy_pm) {
        fadt = fadt.firmware_ctrl_64(*facs_addr);
        fadt.sci_int = ACPI_SCI_IRQ.into();
        let blk = |off: u64, len: u8| {
            (
                ((pm1_base + off) as u32).into(),
                GAS::new(
                    AddressSpace::SystemIo,
                    len * 8,
                    0,
                    AccessSize::Undefined,
                    pm1_base + off,
                ),
            )
        };
        (fadt.pm1a_evt_blk, fadt.x_pm1a_evt_blk) = blk(0, 4);
        (fadt.pm1a_cnt_blk, fadt.x_pm1a_cnt_blk) = blk(4, 2);
        (fadt.pm_tmr_blk, fadt.x_pm_tmr_blk) = blk(8, 4);
        (fadt.pm1_evt_len, fadt.pm1_cnt_len, fadt.pm_tmr_len) = (4, 2, 4);
    } else {
        fadt = fadt.flag(Flags::HwReducedAcpi);
        fadt.sleep_control_reg = io_reg(ACPI_SLEEP_CONTROL_PORT);
        fadt.sleep_status_reg = io_reg(ACPI_SLEEP_STATUS_PORT);
    }
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.century = RTC_CENTURY_REG;
    fadt.reset_reg = io_reg(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    let mut fadt_bytes = bytes(&fadt.finalize());
    // The 32-bit DSDT field too (offset 40), with the same address: firmware such as SeaBIOS
    // reads only that one. The crate sets only X_DSDT, so patch it and fix the checksum.
    let dsdt32 = (dsdt_addr as u32).to_le_bytes();
    for (i, b) in dsdt32.iter().enumerate() {
        fadt_bytes[40 + i] = *b;
        fadt_bytes[9] = fadt_bytes[9].wrapping_sub(*b);
    }
    let fadt_addr = next;
    next = align(next + fadt_bytes.len() as u64);

    // MADT.
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    // Every possible vCPU: those not there at boot can be plugged in later (CPU hotplug).
    let max_cpus = platform.max_cpus.max(num_cpus);
    for cpu in 0..max_cpus {
        let status = if cpu < num_cpus {
            EnabledStatus::Enabled
        } else {
            EnabledStatus::DisabledOnlineCapable
        };
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, status));
    }
    madt.add_structure(IoApic::new(max_cpus, IOAPIC_START as u32, 0));
    let mut madt_bytes = bytes(&madt);
    // MADT flags (offset 40): PCAT_COMPAT, the machine has dual 8259s (KVM's in-kernel PIC).
    // Without it Linux assumes no legacy IRQs and leaves ISA IRQs such as COM1's unrouted.
    // The crate has no setter for the flags, so patch the byte and fix the checksum.
    madt_bytes[40] |= 1;
    madt_bytes[9] = madt_bytes[9].wrapping_sub(1);
    let madt_addr = next;
    next = align(next + madt_bytes.len() as u64);

    let mut pieces_extra = Vec::new();
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if let Some(pci) = &platform.pci {
        let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        mcfg.add_ecam(pci.ecam_base, 0, 0, pci.last_bus);
        let mcfg_bytes = bytes(&mcfg);
        let mcfg_addr = next;
        next = align(next + mcfg_bytes.len() as u64);
        xsdt.add_entry(mcfg_addr);
        pieces_extra.push((mcfg_addr, mcfg_bytes));
    }
    let xsdt_bytes = bytes(&xsdt);
    let xsdt_addr = next;
    next += xsdt_bytes.len() as u64;

    if next > ACPI_END {
        return Err(AcpiError::TooBig(next - ACPI_START));
    }
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    let mut pieces = vec![(rsdp_addr, rsdp)];
    pieces.extend(facs);
    pieces.extend([
        (dsdt_addr, dsdt_bytes),
        (fadt_addr, fadt_bytes),
        (madt_addr, madt_bytes),
        (xsdt_addr, xsdt_bytes),
    ]);
    pieces.extend(pieces_extra);
    Ok((pieces, rsdp_addr))
}

/// Writes the ACPI tables; returns the RSDP address.
pub fn setup_acpi<M: GuestMemory>(mem: &M, platform: &AcpiPlatform) -> Result<u64, AcpiError> {
    let (pieces, rsdp) = build(platform)?;
    for (addr, data) in pieces {
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|_| AcpiError::Write)?;
    }
    Ok(rsdp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn vcpus_that_may_be_plugged_in_later_are_listed_online_capable() {
        let platform = AcpiPlatform {
            num_cpus: 2,
            max_cpus: 4,
            ..Default::default()
        };
        let (pieces, _) = build(&platform).unwrap();
        let madt = &pieces
            .iter()
            .find(|(_, d)| d.starts_with(b"APIC"))
            .unwrap()
            .1;
        let mut off = 44;
        let mut flags = Vec::new();
        let mut ioapic_id = None;
        while off < madt.len() {
            match madt[off] {
                0 => flags.push(madt[off + 4]),
                1 => ioapic_id = Some(madt[off + 2]),
                _ => {}
            }
            off += madt[off + 1] as usize;
        }
        // Enabled, enabled, online capable, online capable; the IOAPIC's id after them all.
        assert_eq!(flags, vec![1, 1, 2, 2]);
        assert_eq!(ioapic_id, Some(4));
    }

    #[test]
    fn tables_are_well_formed() {
        for n in [1u8, 2, 254] {
            let platform = AcpiPlatform {
                num_cpus: n,
                max_cpus: n,
                // One device's description: `Name (TDEV, Zero)`.
                devices: vec![0x08, b'T', b'D', b'E', b'V', 0x00],
                pci: Some(PciAcpi {
                    ecam_base: 0xe000_0000,
                    last_bus: 0,
                }),
                legacy_pm: None,
            };
            let (pieces, rsdp_addr) = build(&platform).unwrap();
            let find = |sig: &[u8]| {
                pieces
                    .iter()
                    .find(|(_, d)| d.starts_with(sig))
                    .unwrap()
                    .clone()
            };
            let (a, rsdp) = find(b"RSD PTR ");
            assert_eq!(a, rsdp_addr);
            assert_eq!(sum(&rsdp[..20]), 0);
            assert_eq!(sum(&rsdp), 0);
            let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
            let (xa, _) = find(b"XSDT");
            assert_eq!(xa, xsdt_addr);
            for sig in [&b"XSDT"[..], b"FACP", b"APIC", b"DSDT", b"MCFG"] {
                let (_, t) = find(sig);
                let len = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
                assert_eq!(len, t.len(), "{:?} length", std::str::from_utf8(sig));
                assert_eq!(sum(&t), 0, "{:?} checksum", std::str::from_utf8(sig));
            }
            // MADT: one local APIC entry (type 0, 8 bytes) per vCPU, then the IOAPIC.
            let (_, madt) = find(b"APIC");
            let mut off = 44;
            let mut cpus = 0;
            let mut ioapics = 0;
            while off < madt.len() {
                match madt[off] {
                    0 => {
                        assert_eq!(madt[off + 3], cpus);
                        cpus += 1;
                    }
                    1 => ioapics += 1,
                    t => panic!("unexpected MADT entry {t}"),
                }
                off += madt[off + 1] as usize;
            }
            assert_eq!((cpus, ioapics), (n, 1));
            assert_eq!(madt[40] & 1, 1, "PCAT_COMPAT");
            // The DSDT carries _S5_, then the devices' descriptions as they gave them.
            let (_, dsdt) = find(b"DSDT");
            assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
            assert!(dsdt.ends_with(&[0x08, b'T', b'D', b'E', b'V', 0x00]));
            let (_, mcfg) = find(b"MCFG");
            assert_eq!(sum(&mcfg), 0);
            assert_eq!(
                u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
                0xe000_0000
            );
            // FADT: hardware-reduced, sleep control at our port.
            let (_, fadt) = find(b"FACP");
            let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
            assert_ne!(flags & (1 << 20), 0);
            let sleep_ctl = u64::from_le_bytes(fadt[244 + 4..244 + 12].try_into().unwrap());
            let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
            let dsdt32 = u32::from_le_bytes(fadt[40..44].try_into().unwrap());
            assert_eq!(u64::from(dsdt32), x_dsdt);
            assert_eq!(x_dsdt, find(b"DSDT").0);
            assert_eq!(sleep_ctl, ACPI_SLEEP_CONTROL_PORT);
        }
    }
}
