//! Extra mappings in the live page tables, edited from ring 3 (the tables
//! are identity mapped and user accessible, like everything else).
//!
//! Used for device memory: virtio-mmio windows named on the command line and
//! PCI BARs. They usually lie in the last GiB below 4 GiB, which the boot map
//! already maps uncached; anything else (a 64-bit BAR above 4 GiB, a window
//! in a cached part of the first 3 GiB) gets 2 MiB uncached user pages.
//! Also for RAM beyond the boot map (a virtio-mem device's region above
//! 4 GiB), which gets 2 MiB cached (write-back) user pages.

use super::phys::PhysAlloc;
use super::sys;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const LARGE: u64 = 1 << 7;
/// Physical-address bits of a table entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// A 2 MiB user page with PAT index 3 (PCD|PWT): uncached with the reset PAT.
const UC_2M: u64 = PRESENT | WRITABLE | USER | WRITE_THROUGH | CACHE_DISABLE | LARGE;
/// A 2 MiB user page, write-back.
const WB_2M: u64 = PRESENT | WRITABLE | USER | LARGE;
/// A table entry pointing at the next level.
const TABLE: u64 = PRESENT | WRITABLE | USER;
const PAGE_2M: u64 = 2 << 20;
/// Highest physical address 4-level paging can describe.
const PHYS_LIMIT: u64 = 1 << 52;

/// Make `[base, base + len)` accessible to ring 3, uncached, identity mapped
/// (whole 2 MiB pages). New paging structures come from `pa`. The TLB is
/// flushed only when an entry changed, and only on the calling CPU: other
/// CPUs may keep a stale cached mapping of a remapped page until their next
/// CR3 load (the APs only run scenario jobs, which touch no devices).
pub fn map_uncached(pa: &mut PhysAlloc, base: u64, len: u64) -> Result<(), &'static str> {
    map(pa, base, len, UC_2M)
}

/// Make `[base, base + len)` accessible to ring 3 as ordinary (write-back)
/// memory, identity mapped in whole 2 MiB pages; otherwise as
/// [`map_uncached`].
pub fn map_cached(pa: &mut PhysAlloc, base: u64, len: u64) -> Result<(), &'static str> {
    map(pa, base, len, WB_2M)
}

fn map(pa: &mut PhysAlloc, base: u64, len: u64, flags: u64) -> Result<(), &'static str> {
    if len == 0 {
        return Ok(());
    }
    let end = base
        .checked_add(len)
        .filter(|&e| e <= PHYS_LIMIT)
        .ok_or("range beyond the physical address space")?;
    let pml4 = sys::read_cr(3) & ADDR_MASK;
    let mut changed = false;
    let mut page = base & !(PAGE_2M - 1);
    while page < end {
        let pdpt = next_table(pa, pml4, page >> 39)?;
        let pd = next_table(pa, pdpt, page >> 30)?;
        let entry = pd + ((page >> 21) & 511) * 8;
        let want = page | flags;
        // SAFETY: `entry` is a slot of a live page directory, identity mapped;
        // the new value maps device memory or RAM the caller owns (or leaves
        // the slot unchanged).
        unsafe {
            let e = entry as *mut u64;
            if e.read_volatile() != want {
                e.write_volatile(want);
                changed = true;
            }
        }
        page += PAGE_2M;
    }
    if changed {
        sys::flush_tlb();
    }
    Ok(())
}

/// The table that entry `index & 511` of `table` points to, allocating a
/// zeroed one if the entry is empty.
fn next_table(pa: &mut PhysAlloc, table: u64, index: u64) -> Result<u64, &'static str> {
    let entry = (table + (index & 511) * 8) as *mut u64;
    // SAFETY: `table` is a live paging structure (CR3 or reached from it),
    // identity mapped and user accessible.
    let v = unsafe { entry.read_volatile() };
    if v & PRESENT != 0 {
        if v & LARGE != 0 {
            return Err("a 1 GiB page is in the way");
        }
        return Ok(v & ADDR_MASK);
    }
    let new = pa.alloc(4096, 4096).ok_or("no memory for page tables")?;
    // SAFETY: `new` is a fresh page from the allocator (identity mapped RAM);
    // it is zeroed before the entry makes it visible to the MMU.
    unsafe {
        core::ptr::write_bytes(new as *mut u8, 0, 4096);
        entry.write_volatile(new | TABLE);
    }
    Ok(new)
}
