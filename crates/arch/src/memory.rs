//! Guest RAM regions and the e820 map that describes them.

use crate::layout::*;

/// An e820 memory type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Memory type.
    pub kind: E820Type,
}

/// The RAM regions `(guest address, size)` for a guest of `mem_size` bytes: RAM below the
/// 32-bit MMIO hole, and the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (RAM_64BIT_START, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// Alignment of the hotpluggable memory region's start: 1 GiB, a multiple of every memory
/// block size Linux picks for guests below 64 GiB (128 MiB up to 2 GiB), so the guest can
/// use the region from its first byte.
pub const HOTPLUG_ALIGN: u64 = 1 << 30;

/// The region `(guest address, size)` where `hotplug` bytes of hotpluggable memory (a
/// virtio-mem device's) live for a guest with `mem_size` bytes of boot RAM: above 4 GiB and
/// above all boot RAM, at a [`HOTPLUG_ALIGN`] boundary; None without hotpluggable memory.
/// It is not in the e820 map: the guest learns of it from the device.
pub fn hotplug_region(mem_size: u64, hotplug: u64) -> Option<(u64, u64)> {
    if hotplug == 0 {
        return None;
    }
    let ram_end = ram_regions(mem_size)
        .last()
        .map_or(0, |&(a, s)| a + s)
        .max(RAM_64BIT_START);
    Some((ram_end.next_multiple_of(HOTPLUG_ALIGN), hotplug))
}

/// Every region of guest memory: the RAM regions ([`ram_regions`]), then the hotpluggable
/// region ([`hotplug_region`]) if there is one.
pub fn guest_regions(mem_size: u64, hotplug: u64) -> Vec<(u64, u64)> {
    let mut v = ram_regions(mem_size);
    v.extend(hotplug_region(mem_size, hotplug));
    v
}

/// The highest usable address below the MMIO hole, plus one.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

/// The e820 map the guest is given for `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: EBDA_END - EBDA_START,
            kind: E820Type::Reserved,
        },
    ];
    let low_end = low_ram_end(mem_size);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820Type::Ram,
        });
    }
    // The PCIe ECAM window, so guests trust the MCFG's address.
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820Type::Reserved,
    });
    if mem_size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: RAM_64BIT_START,
            size: mem_size - MMIO_HOLE_START,
            kind: E820Type::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[3],
            E820Entry {
                addr: PCI_ECAM_START,
                size: PCI_ECAM_SIZE,
                kind: E820Type::Reserved
            }
        );
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIMEM_START,
                size: (256 << 20) - HIMEM_START,
                kind: E820Type::Ram
            }
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(
            ram,
            (256 << 20) - (EBDA_END - EBDA_START) - (HIMEM_START - EBDA_END)
        );
    }

    #[test]
    fn big_guest_splits_around_hole() {
        let size = 4u64 << 30;
        assert_eq!(
            ram_regions(size),
            vec![(0, MMIO_HOLE_START), (RAM_64BIT_START, 1 << 30)]
        );
        let map = e820_map(size);
        assert_eq!(map.last().unwrap().addr, RAM_64BIT_START);
        assert_eq!(map.last().unwrap().size, 1 << 30);
        // No RAM entry overlaps the MMIO hole.
        for e in map.iter().filter(|e| e.kind == E820Type::Ram) {
            assert!(e.addr + e.size <= MMIO_HOLE_START || e.addr >= RAM_64BIT_START);
        }
    }

    #[test]
    fn the_generation_id_is_in_guest_memory_but_not_ram_the_guest_may_use() {
        let id = (VMGENID_ADDR, VMGENID_ADDR + VMGENID_SIZE as u64);
        assert!(ACPI_END <= id.0 && id.1 <= MPTABLE_START);
        for size in [MIN_MEMORY, 256 << 20, 4 << 30] {
            assert!(ram_regions(size)
                .iter()
                .any(|&(a, s)| a <= id.0 && id.1 <= a + s));
            for e in e820_map(size).iter().filter(|e| e.kind == E820Type::Ram) {
                assert!(id.1 <= e.addr || id.0 >= e.addr + e.size, "{e:?}");
            }
        }
    }

    #[test]
    fn hotplug_memory_lies_above_ram_and_4g_aligned_to_1g() {
        assert_eq!(hotplug_region(1 << 30, 0), None);
        assert_eq!(
            hotplug_region(1 << 30, 512 << 20),
            Some((4 << 30, 512 << 20))
        );
        // 4 GiB of RAM ends at 5 GiB; 4.5 GiB at 5.5 GiB, rounded up to 6 GiB.
        assert_eq!(hotplug_region(4 << 30, 1 << 30), Some((5 << 30, 1 << 30)));
        assert_eq!(hotplug_region(9 << 29, 1 << 30), Some((6 << 30, 1 << 30)));
        for size in [MIN_MEMORY, 1 << 30, MMIO_HOLE_START, 4 << 30, 9 << 29] {
            let regions = guest_regions(size, 256 << 20);
            assert_eq!(regions.len(), ram_regions(size).len() + 1);
            let (a, _) = *regions.last().unwrap();
            for &(r, s) in &regions[..regions.len() - 1] {
                assert!(r + s <= a);
            }
            // Not RAM the guest finds in its e820 map.
            for e in e820_map(size) {
                assert!(e.addr + e.size <= a, "{e:?}");
            }
        }
    }

    #[test]
    fn exactly_the_hole_size() {
        assert_eq!(ram_regions(MMIO_HOLE_START).len(), 1);
        assert_eq!(e820_map(MMIO_HOLE_START).len(), 4);
    }
}
