//! The VM generation ID: 16 random bytes at [`VMGENID_ADDR`] in guest memory, which the guest
//! finds through the DSDT's `\_SB_.VGEN` device. tern writes one at boot and a new one after
//! every restore from a snapshot, then raises the interrupt of `\_SB_.GED1` so the guest reads
//! it again: VMs restored from the same snapshot never share an ID, so a guest can tell it is a
//! clone (and, for one, reseed its random number generator).

use arch::layout::{VMGENID_ADDR, VMGENID_SIZE};
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
