//! Guest physical memory layout of a tern x86_64 VM.
//!
//! ```text
//! 0x0000_0500  boot GDT            0x0000_9000  PML4
//! 0x0000_0520  boot IDT (empty)    0x0000_a000  PDPT
//! 0x0000_6000  PVH start_info      0x0000_b000  4 x PD (identity map of 4 GiB, 2 MiB pages)
//! 0x0000_7000  Linux zero page     0x0002_0000  kernel command line
//! 0x0000_8ff0  boot stack top      0x0009_fc00  EBDA: MP table
//! 0x000e_0000  ACPI tables         0x000e_f000  VM generation ID (16 bytes)
//! 0x000f_0000  MP table
//! 0x0010_0000  kernel              ... RAM up to min(size, 3 GiB)
//! 0xc000_0000  32-bit MMIO hole (PCI, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000) up to 4 GiB;
//!              a firmware boot maps the firmware image at its top (at most 16 MiB)
//! 0x1_0000_0000 the rest of RAM
//! ```

/// Start of the boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), after the 56-byte start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, after the module list.
pub const PVH_MEMMAP_START: u64 = 0x6060;
/// Maximum number of PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;
/// Linux `boot_params` (the zero page).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line tern accepts (bytes, without the NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory.
pub const EBDA_END: u64 = 0xa0000;
/// High memory starts at 1 MiB: kernels load here or above.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above 4 GiB.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Address KVM uses for the TSS (three pages, inside the MMIO hole, below the 16 MiB under
/// 4 GiB that firmware may take).
pub const KVM_TSS_ADDRESS: u64 = 0xfeff_d000;
/// Address KVM uses for the real-mode identity map page.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfeff_c000;
/// Largest firmware image tern maps below 4 GiB.
pub const FIRMWARE_MAX_SIZE: u64 = 16 << 20;
/// Lowest guest RAM size tern accepts.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest RAM size tern accepts (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;
/// MP floating pointer and configuration table (BIOS area, scanned by guests).
pub const MPTABLE_START: u64 = 0xf_0000;
/// End of the area the MP table may use.
pub const MPTABLE_END: u64 = 0x10_0000;
/// ACPI tables: RSDP first (in the BIOS area guests scan), then XSDT, FADT, MADT, DSDT.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the ACPI table area (the VM generation ID page follows).
pub const ACPI_END: u64 = VMGENID_ADDR;
/// The VM generation ID: 16 random bytes tern writes at boot and replaces after every restore
/// from a snapshot, so a guest can tell it is a clone (the DSDT's `\_SB_.VGEN` device names
/// this address). It has the page between the ACPI tables (which end below it) and the MP
/// table to itself, in the BIOS area (`EBDA_END`..`HIMEM_START`) that the e820 map leaves out
/// of RAM, so a guest never allocates it.
pub const VMGENID_ADDR: u64 = 0xe_f000;
/// Size of the VM generation ID.
pub const VMGENID_SIZE: usize = 16;
/// PIO port of the ACPI sleep control register (hardware-reduced ACPI).
pub const ACPI_SLEEP_CONTROL_PORT: u64 = 0x3c0;
/// PIO port of the ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u64 = 0x3c1;
/// PIO port of the ACPI reset register.
pub const ACPI_RESET_PORT: u64 = 0x3c2;
/// Value written to the reset register to reset the machine.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// PIO base of the fixed-hardware ACPI registers of a firmware boot (PM1 event block, PM1
/// control block at +4, PM timer at +8): `devices::acpi::Pm1Block`.
pub const ACPI_PM1_BASE: u64 = 0x600;
/// ISA interrupt of the ACPI SCI (declared for a firmware boot's full ACPI; never raised).
pub const ACPI_SCI_IRQ: u16 = 9;
/// The 64-bit PCI window of a UEFI-booted VM whose vCPUs have `phys_bits` physical address
/// bits: the top eighth of the address space, where OVMF puts its 64-bit PCI aperture.
pub fn uefi_pci_mmio64(phys_bits: u8) -> std::ops::Range<u64> {
    let bits = u32::from(phys_bits.clamp(36, 52));
    (1u64 << bits) - (1u64 << (bits - 3))..1u64 << bits
}

/// The PM1 blocks and PM timer of a UEFI-booted VM: where OVMF expects a PIIX4's (its
/// shutdown writes there whatever the tables say).
pub const UEFI_ACPI_PM1_BASE: u64 = 0xb000;
/// 32-bit PCI MMIO window (BARs), the low part of the MMIO hole.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
/// End (exclusive) of the 32-bit PCI MMIO window.
pub const PCI_MMIO32_END: u64 = 0xe000_0000;
/// The 32-bit PCI BAR window of a firmware boot: the top of the hole below the IOAPIC, where
/// SeaBIOS places BARs (downwards from 0xfec0_0000, whatever the VMM's own placement). A
/// firmware VM has PCI only, so the virtio-mmio range inside it is unused.
pub const FIRMWARE_PCI_MMIO32_START: u64 = 0xf000_0000;

/// The 32-bit PCI BAR window, `start..end`: tern's own for a kernel boot, the firmware's for a
/// firmware boot.
pub fn pci_mmio32(firmware: bool) -> std::ops::Range<u64> {
    if firmware {
        FIRMWARE_PCI_MMIO32_START..IOAPIC_START
    } else {
        PCI_MMIO32_START..PCI_MMIO32_END
    }
}

/// PCIe enhanced configuration (ECAM) window: 1 MiB per bus.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Buses the ECAM window covers (bus 0 only, for now).
pub const PCI_ECAM_BUSES: u64 = 1;
/// Size of the ECAM window.
pub const PCI_ECAM_SIZE: u64 = PCI_ECAM_BUSES << 20;
/// First virtio-mmio device; each gets [`VIRTIO_MMIO_SIZE`] bytes.
pub const VIRTIO_MMIO_START: u64 = 0xfeb0_0000;
/// Register window of one virtio-mmio device.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio devices a VM can have: one IOAPIC pin each, 16..=22 (pin 23 is kept for
/// the ACPI generic event device).
pub const VIRTIO_MMIO_MAX: u64 = 7;
/// GSI of the first virtio-mmio device.
pub const VIRTIO_MMIO_FIRST_GSI: u32 = 16;
/// First GSI handed out for MSI routes (after the 24 IOAPIC pins).
pub const MSI_FIRST_GSI: u32 = 24;
/// GSI of the ACPI generic event device (GED) that signals the power button.
pub const ACPI_GED_GSI: u32 = 23;
/// GSI of the second generic event device (`\_SB_.GED1`), which tells the guest that the VM
/// generation ID changed. An ISA pin nothing else uses (the PIT has 0, COM1 4, the RTC 8;
/// guests assume 1 and 12 for the keyboard controller and 3 for COM2), edge-triggered and
/// active high as ISA interrupts are.
pub const ACPI_VMGENID_GSI: u32 = 5;
/// First GSI used for PCI INTx (IOAPIC pins 16..=22, shared round-robin by slot).
pub const PCI_INTX_FIRST_GSI: u32 = 16;
/// Number of GSIs PCI INTx is spread over.
pub const PCI_INTX_GSIS: u32 = 7;

/// The GSI INTA# of PCI slot `slot` (1..32) is routed to.
pub fn pci_intx_gsi(slot: u8) -> u32 {
    PCI_INTX_FIRST_GSI + (u32::from(slot).saturating_sub(1) % PCI_INTX_GSIS)
}
