//! The VM generation ID: 16 random bytes at [`VMGENID_ADDR`] in guest memory, which the guest
//! finds through the DSDT's `\_SB_.VGEN` device. tern writes one at boot and a new one after
//! every restore from a snapshot, then raises the interrupt of `\_SB_.GED1` so the guest reads
//! it again: VMs restored from the same snapshot never share an ID, so a guest can tell it is a
//! clone (and, for one, reseed its random number generator).

use arch::layout::{ACPI_VMGENID_GSI, VMGENID_ADDR, VMGENID_SIZE};
use arch::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

/// A generation ID, as it lies in guest memory.
pub type GenerationId = [u8; VMGENID_SIZE];

/// A new ID from the host kernel's random number generator.
pub fn fresh() -> std::io::Result<GenerationId> {
    let mut id = [0u8; VMGENID_SIZE];
    let mut filled = 0;
    while filled < id.len() {
        let rest = &mut id[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes to `rest`, a live buffer we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(id)
}

/// Writes a new ID into guest memory; returns it.
pub fn write_new(mem: &GuestMemoryMmap) -> Result<GenerationId, String> {
    let id =
        fresh().map_err(|e| format!("cannot get random bytes for the VM generation ID: {e}"))?;
    mem.write_slice(&id, GuestAddress(VMGENID_ADDR))
        .map_err(|e| format!("cannot write the VM generation ID at {VMGENID_ADDR:#x}: {e}"))?;
    Ok(id)
}

/// The ID currently in guest memory.
pub fn read(mem: &GuestMemoryMmap) -> Result<GenerationId, String> {
    let mut id = [0u8; VMGENID_SIZE];
    mem.read_slice(&mut id, GuestAddress(VMGENID_ADDR))
        .map_err(|e| format!("cannot read the VM generation ID at {VMGENID_ADDR:#x}: {e}"))?;
    Ok(id)
}

/// The ID as 32 lowercase hex digits, bytes in memory order.
pub fn hex(id: &GenerationId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The VM generation ID device and its notifier, as the DSDT describes them.
///
/// `\_SB_.VGEN` (`_HID "VMGENCTR"`, `_CID "VM_Gen_Counter"`) has a method `ADDR` returning
/// `Package { low 32 bits, high 32 bits }` of [`VMGENID_ADDR`], where the 16-byte ID lives.
/// When tern changes the ID it raises [`ACPI_VMGENID_GSI`], the interrupt of a second generic
/// event device, `\_SB_.GED1`, whose `_EVT` does `Notify (\_SB_.VGEN, 0x80)`; the guest then
/// reads the new ID. (The power button keeps `\_SB_.GED_` and its own interrupt to itself.)
pub struct VmGenIdAcpi;

impl acpi_tables::Aml for VmGenIdAcpi {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        use acpi_tables::aml;
        let hid = aml::Name::new("_HID".into(), &"VMGENCTR");
        let cid = aml::Name::new("_CID".into(), &"VM_Gen_Counter");
        let ddn = aml::Name::new("_DDN".into(), &"VM_Gen_Counter");
        let lo = (VMGENID_ADDR & 0xffff_ffff) as u32;
        let hi = (VMGENID_ADDR >> 32) as u32;
        let addr_pkg = aml::Package::new(vec![&lo, &hi]);
        let ret = aml::Return::new(&addr_pkg);
        let addr = aml::Method::new("ADDR".into(), 0, false, vec![&ret]);
        aml::Device::new("_SB_.VGEN".into(), vec![&hid, &cid, &ddn, &addr]).to_aml_bytes(sink);
        let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
        let ged_uid = aml::Name::new("_UID".into(), &aml::ONE);
        let ged_irq = aml::Interrupt::new(true, true, false, false, ACPI_VMGENID_GSI);
        let ged_crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ged_irq]));
        let vgen: aml::Path = "\\_SB_.VGEN".into();
        let notify = aml::Notify::new(&vgen, &0x80u8);
        let evt = aml::Method::new("_EVT".into(), 1, true, vec![&notify]);
        aml::Device::new("_SB_.GED1".into(), vec![&ged_hid, &ged_uid, &ged_crs, &evt])
            .to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fresh_and_land_at_their_address() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let a = write_new(&mem).unwrap();
        assert_eq!(read(&mem).unwrap(), a);
        let b = write_new(&mem).unwrap();
        assert_ne!(a, b);
        assert_eq!(read(&mem).unwrap(), b);
        let mut raw = [0u8; VMGENID_SIZE];
        mem.read_slice(&mut raw, GuestAddress(0xe_f000)).unwrap();
        assert_eq!(raw, b);
        assert_eq!(
            hex(&[0, 1, 0xab, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]),
            "0001abff000000000000000000000010"
        );
    }

    #[test]
    fn memory_without_the_page_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(write_new(&mem).unwrap_err().contains("0xef000"));
        assert!(read(&mem).is_err());
    }
}
