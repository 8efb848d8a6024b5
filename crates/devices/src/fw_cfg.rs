//! The firmware configuration device (`fw_cfg`) at ports 0x510–0x51b: how firmware (SeaBIOS,
//! OVMF) learns what tern built — the memory map, the ACPI tables, the CPU count, the boot
//! order — without tern writing anything into guest memory before the firmware runs.
//!
//! Hand-written: no rust-vmm crate models it. The interface is the one SeaBIOS and OVMF
//! implement (QEMU's `docs/specs/fw_cfg.rst` documents it):
//! - **Items** are numbered by a 16-bit key. A few numbered keys are fixed (signature `QEMU`,
//!   interface id, CPU counts, "no graphics"); the rest are **files**, listed by name in the
//!   directory item (key 0x19) and numbered from 0x20.
//! - **Traditional interface**: a 16-bit write to 0x510 selects an item and rewinds it; each
//!   byte read from 0x511 returns the next byte (zero past the end).
//! - **DMA interface**: the guest writes the guest-physical address of a 16-byte access
//!   descriptor (big-endian `control`, `length`, `address`) to 0x514 (high half) and 0x518 (low
//!   half, which starts the transfer). The device may select an item, then reads `length`
//!   bytes of it into guest memory (zero-filled past the end), skips them, or writes them
//!   (only to writable items), and finally stores the result in `control`: 0, or the error
//!   bit. Reading 0x514..0x51c returns the DMA signature `QEMU CFG`.
//!
//! Every field of a descriptor comes from the guest: lengths are bounded by the item and by
//! guest memory, and a descriptor or buffer outside guest memory fails that transfer only.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::BusDevice;

/// First port of the device.
pub const FW_CFG_PORT: u64 = 0x510;
/// Ports it takes: selector (0x510, 16 bit), data (0x511), DMA address (0x514..0x51c).
pub const FW_CFG_PORT_LEN: u64 = 0x0c;

/// Key of the signature item (`QEMU`).
pub const KEY_SIGNATURE: u16 = 0x00;
/// Key of the interface id (bit 0: traditional interface, bit 1: DMA).
pub const KEY_ID: u16 = 0x01;
/// Key of the VM's UUID (16 bytes).
pub const KEY_UUID: u16 = 0x02;
/// Key of the "no graphics" flag (u16): SeaBIOS then mirrors its screen on COM1.
pub const KEY_NOGRAPHIC: u16 = 0x04;
/// Key of the number of vCPUs present at boot (u16).
pub const KEY_NB_CPUS: u16 = 0x05;
/// Key of the most vCPUs the VM can have (u16).
pub const KEY_MAX_CPUS: u16 = 0x0f;
/// Key of the file directory.
pub const KEY_FILE_DIR: u16 = 0x19;
/// Key of the first file.
pub const KEY_FIRST_FILE: u16 = 0x20;

/// Interface id: the traditional interface and DMA.
const ID_TRADITIONAL: u32 = 1;
const ID_DMA: u32 = 2;
/// The DMA port's read-back signature.
const DMA_SIGNATURE: [u8; 8] = *b"QEMU CFG";
/// DMA control bits.
const DMA_ERROR: u32 = 0x01;
const DMA_READ: u32 = 0x02;
const DMA_SKIP: u32 = 0x04;
const DMA_SELECT: u32 = 0x08;
const DMA_WRITE: u32 = 0x10;
/// Largest file name, with its terminating NUL.
const FILE_NAME_LEN: usize = 56;
/// Bytes per directory entry: size (u32), key (u16), reserved (u16), name.
const DIR_ENTRY_LEN: usize = 64;
/// Zero-fill chunk of a DMA read past an item's end.
const ZERO_CHUNK: usize = 4096;

/// Errors of building the item set (tern's own mistakes, not guest input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    /// A file name longer than 55 bytes or empty.
    #[error("fw_cfg file name '{0}' is empty or longer than 55 bytes")]
    BadName(String),
    /// Two files with one name.
    #[error("fw_cfg file '{0}' is added twice")]
    Duplicate(String),
    /// More files than keys.
    #[error("too many fw_cfg files")]
    Full,
}

struct Item {
    data: Vec<u8>,
    writable: bool,
}

/// The items the firmware reads: fixed keys and named files.
#[derive(Default)]
pub struct FwCfgItems {
    items: BTreeMap<u16, Item>,
    files: BTreeMap<String, u16>,
}

impl FwCfgItems {
    /// The fixed items every VM has: the signature, the interface id (with DMA), `cpus` and
    /// `max_cpus`, and "no graphics".
    pub fn new(cpus: u16, max_cpus: u16) -> Self {
        let mut s = FwCfgItems::default();
        s.set(KEY_SIGNATURE, b"QEMU".to_vec());
        s.set(KEY_ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec());
        s.set(KEY_NOGRAPHIC, 1u16.to_le_bytes().to_vec());
        s.set(KEY_NB_CPUS, cpus.to_le_bytes().to_vec());
        s.set(KEY_MAX_CPUS, max_cpus.max(cpus).to_le_bytes().to_vec());
        s.rebuild_dir();
        s
    }

    /// Sets the numbered item `key`.
    pub fn set(&mut self, key: u16, data: Vec<u8>) {
        self.items.insert(
            key,
            Item {
                data,
                writable: false,
            },
        );
    }

    /// Adds the file `name`; returns its key. Keys follow the sorted names, as SeaBIOS and OVMF
    /// see them in the directory.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        self.add(name, data, false)
    }

    /// Adds the file `name` that the firmware may also write (by DMA, within its size).
    pub fn add_writable_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        self.add(name, data, true)
    }

    fn add(&mut self, name: &str, data: Vec<u8>, writable: bool) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() >= FILE_NAME_LEN || name.contains('\0') {
            return Err(FwCfgError::BadName(name.into()));
        }
        if self.files.contains_key(name) {
            return Err(FwCfgError::Duplicate(name.into()));
        }
        if self.files.len() >= usize::from(u16::MAX - KEY_FIRST_FILE) {
            return Err(FwCfgError::Full);
        }
        // Renumber every file so that keys follow the names.
        let mut all: Vec<(String, Item)> = std::mem::take(&mut self.files)
            .into_iter()
            .filter_map(|(n, k)| self.items.remove(&k).map(|i| (n, i)))
            .collect();
        all.push((name.into(), Item { data, writable }));
        all.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (n, item)) in all.into_iter().enumerate() {
            let key = KEY_FIRST_FILE + i as u16;
            self.items.insert(key, item);
            self.files.insert(n, key);
        }
        self.rebuild_dir();
        Ok(self.files[name])
    }

    /// The key of file `name`.
    pub fn key(&self, name: &str) -> Option<u16> {
        self.files.get(name).copied()
    }

    /// The current contents of item `key`.
    pub fn data(&self, key: u16) -> Option<&[u8]> {
        self.items.get(&key).map(|i| i.data.as_slice())
    }

    fn rebuild_dir(&mut self) {
        let mut dir = Vec::with_capacity(4 + self.files.len() * DIR_ENTRY_LEN);
        dir.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        let mut by_key: Vec<(&String, &u16)> = self.files.iter().collect();
        by_key.sort_by_key(|(_, k)| **k);
        for (name, key) in by_key {
            let size = self.items.get(key).map_or(0, |i| i.data.len());
            dir.extend_from_slice(&(size as u32).to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        self.items.insert(
            KEY_FILE_DIR,
            Item {
                data: dir,
                writable: false,
            },
        );
    }
}

/// The device: the items, the selected one and the position in it, and DMA.
pub struct FwCfg<M: GuestMemory> {
    items: FwCfgItems,
    mem: M,
    selected: u16,
    offset: u64,
    dma_high: u32,
}

impl<M: GuestMemory> FwCfg<M> {
    /// A device serving `items`, reaching guest memory `mem` for DMA.
    pub fn new(items: FwCfgItems, mem: M) -> Self {
        FwCfg {
            items,
            mem,
            selected: KEY_SIGNATURE,
            offset: 0,
            dma_high: 0,
        }
    }

    /// The items, as the firmware may have changed them.
    pub fn items(&self) -> &FwCfgItems {
        &self.items
    }

    fn select(&mut self, key: u16) {
        tracing::debug!("fw_cfg: item {key:#06x} selected");
        self.selected = key;
        self.offset = 0;
    }

    fn next_byte(&mut self) -> u8 {
        let b = self
            .items
            .items
            .get(&self.selected)
            .and_then(|i| {
                usize::try_from(self.offset)
                    .ok()
                    .and_then(|o| i.data.get(o))
            })
            .copied()
            .unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        b
    }

    /// Runs the DMA descriptor at guest address `at`.
    fn dma(&mut self, at: u64) {
        let mut desc = [0u8; 16];
        if self.mem.read_slice(&mut desc, GuestAddress(at)).is_err() {
            tracing::debug!("fw_cfg: DMA descriptor at {at:#x} is outside guest memory");
            return;
        }
        let control = u32::from_be_bytes(desc[0..4].try_into().unwrap_or_default());
        let length = u32::from_be_bytes(desc[4..8].try_into().unwrap_or_default());
        let addr = u64::from_be_bytes(desc[8..16].try_into().unwrap_or_default());
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let ok = if control & DMA_READ != 0 {
            self.dma_read(addr, length)
        } else if control & DMA_WRITE != 0 {
            self.dma_write(addr, length)
        } else {
            // A skip, or a bare select.
            if control & DMA_SKIP != 0 {
                self.offset = self.offset.saturating_add(u64::from(length));
            }
            true
        };
        let result: u32 = if ok { 0 } else { DMA_ERROR };
        // The status goes back where the descriptor was; if that fails there is no one to tell.
        let _ = self
            .mem
            .write_slice(&result.to_be_bytes(), GuestAddress(at));
    }

    fn dma_read(&mut self, addr: u64, length: u32) -> bool {
        let length = u64::from(length);
        let data = self
            .items
            .items
            .get(&self.selected)
            .map_or(&[][..], |i| i.data.as_slice());
        let start = usize::try_from(self.offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let avail = (data.len() - start).min(usize::try_from(length).unwrap_or(usize::MAX));
        let mut ok = self
            .mem
            .write_slice(&data[start..start + avail], GuestAddress(addr))
            .is_ok();
        // Past the item's end the guest reads zeroes.
        let zeros = [0u8; ZERO_CHUNK];
        let mut done = avail as u64;
        while ok && done < length {
            let n = (length - done).min(ZERO_CHUNK as u64) as usize;
            let to = addr.checked_add(done);
            ok = to.is_some_and(|to| self.mem.write_slice(&zeros[..n], GuestAddress(to)).is_ok());
            done += n as u64;
        }
        self.offset = self.offset.saturating_add(length);
        ok
    }

    fn dma_write(&mut self, addr: u64, length: u32) -> bool {
        let Some(item) = self.items.items.get_mut(&self.selected) else {
            return false;
        };
        let Ok(start) = usize::try_from(self.offset) else {
            return false;
        };
        let len = length as usize;
        let fits = item.writable && start.checked_add(len).is_some_and(|e| e <= item.data.len());
        if !fits {
            return false;
        }
        let ok = self
            .mem
            .read_slice(&mut item.data[start..start + len], GuestAddress(addr))
            .is_ok();
        self.offset = self.offset.saturating_add(u64::from(length));
        ok
    }
}

impl<M: GuestMemory + Send> BusDevice for FwCfg<M> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            1 => data.iter_mut().for_each(|b| *b = self.next_byte()),
            4..=11 => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = DMA_SIGNATURE
                        .get(offset as usize - 4 + i)
                        .copied()
                        .unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            // The selector is 16 bits, little-endian as port I/O is.
            (0, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (4, 4) => self.dma_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
            (8, 4) => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let at = (u64::from(self.dma_high) << 32) | u64::from(low);
                self.dma_high = 0;
                self.dma(at);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    type Mem = GuestMemoryMmap<()>;

    fn mem() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn device() -> FwCfg<Mem> {
        let mut items = FwCfgItems::new(2, 4);
        items.add_file("etc/e820", vec![1, 2, 3, 4, 5]).unwrap();
        items
            .add_file("bootorder", b"/pci@i0cf8/*@1\n".to_vec())
            .unwrap();
        items.add_writable_file("etc/scratch", vec![0; 8]).unwrap();
        FwCfg::new(items, mem())
    }

    fn read_item(d: &mut FwCfg<Mem>, key: u16, n: usize) -> Vec<u8> {
        d.write(0, &key.to_le_bytes());
        let mut out = vec![0u8; n];
        for b in out.iter_mut() {
            let mut x = [0u8];
            d.read(1, &mut x);
            *b = x[0];
        }
        out
    }

    fn dma(d: &mut FwCfg<Mem>, at: u64, control: u32, len: u32, addr: u64) -> u32 {
        let mut desc = Vec::new();
        desc.extend_from_slice(&control.to_be_bytes());
        desc.extend_from_slice(&len.to_be_bytes());
        desc.extend_from_slice(&addr.to_be_bytes());
        d.mem.write_slice(&desc, GuestAddress(at)).unwrap();
        d.write(4, &((at >> 32) as u32).to_be_bytes());
        d.write(8, &(at as u32).to_be_bytes());
        let mut c = [0u8; 4];
        d.mem.read_slice(&mut c, GuestAddress(at)).unwrap();
        u32::from_be_bytes(c)
    }

    #[test]
    fn signature_id_and_directory() {
        let mut d = device();
        assert_eq!(read_item(&mut d, KEY_SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut d, KEY_ID, 4), 3u32.to_le_bytes());
        assert_eq!(read_item(&mut d, KEY_NB_CPUS, 2), 2u16.to_le_bytes());
        assert_eq!(read_item(&mut d, KEY_MAX_CPUS, 2), 4u16.to_le_bytes());
        let dir = read_item(&mut d, KEY_FILE_DIR, 4 + 3 * 64 + 4);
        assert_eq!(&dir[..4], &3u32.to_be_bytes());
        // Sorted by name: bootorder, etc/e820, etc/scratch, keys from 0x20.
        let entry = |i: usize| &dir[4 + i * 64..4 + (i + 1) * 64];
        assert_eq!(&entry(0)[0..4], &15u32.to_be_bytes());
        assert_eq!(&entry(0)[4..6], &0x20u16.to_be_bytes());
        assert!(entry(0)[8..].starts_with(b"bootorder\0"));
        assert_eq!(&entry(1)[4..6], &0x21u16.to_be_bytes());
        assert!(entry(1)[8..].starts_with(b"etc/e820\0"));
        // Past the end: zeroes.
        assert_eq!(&dir[4 + 3 * 64..], &[0, 0, 0, 0]);
        assert_eq!(read_item(&mut d, 0x21, 7), [1, 2, 3, 4, 5, 0, 0]);
        assert_eq!(d.items().key("etc/e820"), Some(0x21));
        let mut sig = [0u8; 8];
        d.read(4, &mut sig[..4]);
        d.read(8, &mut sig[4..]);
        assert_eq!(&sig, b"QEMU CFG");
    }

    #[test]
    fn dma_select_read_skip_and_zero_fill() {
        let mut d = device();
        let key = u32::from(d.items().key("etc/e820").unwrap());
        let control = (key << 16) | DMA_SELECT | DMA_READ;
        d.mem
            .write_slice(&[0xaa; 16], GuestAddress(0x2000))
            .unwrap();
        assert_eq!(dma(&mut d, 0x1000, control, 3, 0x2000), 0);
        // Skip one, then read past the end.
        assert_eq!(dma(&mut d, 0x1000, DMA_SKIP, 1, 0), 0);
        assert_eq!(dma(&mut d, 0x1000, DMA_READ, 6, 0x2003), 0);
        let mut got = [0u8; 10];
        d.mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(got, [1, 2, 3, 5, 0, 0, 0, 0, 0, 0xaa]);
    }

    #[test]
    fn dma_errors_stay_in_the_guest() {
        let mut d = device();
        let key = u32::from(d.items().key("etc/e820").unwrap());
        // Writing a read-only file, reading to outside guest memory, a huge zero fill that
        // runs off the end of memory: each fails with the error bit, nothing else happens.
        assert_eq!(
            dma(
                &mut d,
                0x1000,
                (key << 16) | DMA_SELECT | DMA_WRITE,
                2,
                0x2000
            ),
            DMA_ERROR
        );
        assert_eq!(
            dma(
                &mut d,
                0x1000,
                (key << 16) | DMA_SELECT | DMA_READ,
                5,
                1 << 40
            ),
            DMA_ERROR
        );
        assert_eq!(
            dma(
                &mut d,
                0x1000,
                (key << 16) | DMA_SELECT | DMA_READ,
                u32::MAX,
                0x8000
            ),
            DMA_ERROR
        );
        assert_eq!(
            dma(
                &mut d,
                0x1000,
                (0x7777 << 16) | DMA_SELECT | DMA_READ,
                4,
                0x2000
            ),
            0
        );
        // A descriptor outside guest memory is ignored.
        d.write(4, &1u32.to_be_bytes());
        d.write(8, &0u32.to_be_bytes());
    }

    #[test]
    fn writable_files_take_dma_writes_within_their_size() {
        let mut d = device();
        let key = u32::from(d.items().key("etc/scratch").unwrap());
        d.mem
            .write_slice(&[9, 8, 7, 6], GuestAddress(0x3000))
            .unwrap();
        let c = (key << 16) | DMA_SELECT | DMA_WRITE;
        assert_eq!(dma(&mut d, 0x1000, c, 4, 0x3000), 0);
        assert_eq!(dma(&mut d, 0x1000, DMA_WRITE, 4, 0x3000), 0);
        assert_eq!(dma(&mut d, 0x1000, DMA_WRITE, 1, 0x3000), DMA_ERROR);
        assert_eq!(
            d.items().data(key as u16).unwrap(),
            &[9, 8, 7, 6, 9, 8, 7, 6]
        );
    }

    #[test]
    fn bad_file_names_are_refused() {
        let mut items = FwCfgItems::new(1, 1);
        assert!(items.add_file("", vec![]).is_err());
        assert!(items.add_file(&"x".repeat(56), vec![]).is_err());
        items.add_file(&"x".repeat(55), vec![]).unwrap();
        assert_eq!(
            items.add_file(&"x".repeat(55), vec![]),
            Err(FwCfgError::Duplicate("x".repeat(55)))
        );
    }
}
