//! Address-range dispatch of guest PIO/MMIO accesses to devices.
//!
//! A bus is fixed once the vCPUs run (they share it without a lock), except inside its
//! *windows*: a window is a range handed to a bus of its own behind a read-write lock, where
//! devices come, go and move while the guest runs (PCI BARs: the guest places them, and
//! hotplugged functions bring theirs). Addresses inside a window stay absolute.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Bus errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps an existing one or is empty.
    #[error("bus range {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

enum Target {
    Device(Arc<Mutex<dyn BusDevice>>),
    Window(Arc<RwLock<Bus>>),
}

struct Entry {
    len: u64,
    target: Target,
}

/// A set of non-overlapping address ranges, each owned by a device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `dev` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        self.insert_target(Target::Device(dev), base, len)
    }

    /// Hands `[base, base + len)` to `window`, a bus whose devices may change while this one
    /// is in use; accesses there go to `window` at their absolute address.
    pub fn insert_window(
        &mut self,
        window: Arc<RwLock<Bus>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        self.insert_target(Target::Window(window), base, len)
    }

    /// Removes the device at `base` (exactly); returns it with its length.
    pub fn remove(&mut self, base: u64) -> Option<(Arc<Mutex<dyn BusDevice>>, u64)> {
        match self.ranges.get(&base) {
            Some(Entry {
                target: Target::Device(_),
                ..
            }) => {}
            _ => return None,
        }
        match self.ranges.remove(&base) {
            Some(Entry {
                len,
                target: Target::Device(d),
            }) => Some((d, len)),
            _ => None,
        }
    }

    /// Whether `dev` answers at `base` (the same device, not an equal one).
    pub fn holds_at(&self, base: u64, dev: &Arc<Mutex<dyn BusDevice>>) -> bool {
        matches!(self.ranges.get(&base), Some(Entry { target: Target::Device(d), .. }) if Arc::ptr_eq(d, dev))
    }

    fn insert_target(&mut self, target: Target, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((b, e)) = self.ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Entry { len, target });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Target)> {
        let (base, e) = self.ranges.range(..=addr).next_back()?;
        (addr - base < e.len).then_some((addr - base, &e.target))
    }

    /// Dispatches a read; returns false when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, Target::Device(dev))) => {
                // A poisoned lock means a device panicked earlier; keep serving the guest.
                let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
                d.read(off, data);
                true
            }
            Some((_, Target::Window(w))) => {
                w.read().unwrap_or_else(|p| p.into_inner()).read(addr, data)
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, Target::Device(dev))) => {
                let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
                d.write(off, data);
                true
            }
            Some((_, Target::Window(w))) => w
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .write(addr, data),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Rec {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn a_window_dispatches_at_absolute_addresses_and_its_devices_move() {
        let window = Arc::new(RwLock::new(Bus::new()));
        let mut bus = Bus::new();
        bus.insert_window(window.clone(), 0x1000, 0x1000).unwrap();
        let dev: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Rec::default()));
        window
            .write()
            .unwrap()
            .insert(dev.clone(), 0x1800, 0x10)
            .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x1804, &mut b));
        assert_eq!(b[0], 4, "offset within the device");
        assert!(
            !bus.read(0x1810, &mut b),
            "inside the window, outside any device"
        );
        // Moved while the outer bus stays as it is.
        let (d, len) = window.write().unwrap().remove(0x1800).unwrap();
        assert!(window.write().unwrap().remove(0x1800).is_none());
        window.write().unwrap().insert(d, 0x1100, len).unwrap();
        assert!(window.read().unwrap().holds_at(0x1100, &dev));
        assert!(!bus.read(0x1804, &mut b));
        assert!(bus.write(0x1102, &[9]));
        assert!(bus.read(0x1102, &mut b));
        assert!(
            bus.insert(dev.clone(), 0x1f00, 0x10).is_err(),
            "the window's range is taken"
        );
        assert!(
            bus.remove(0x1000).is_none(),
            "a window is not a device to remove"
        );
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Rec::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        assert_eq!(
            bus.insert(a.clone(), 0x3ff, 1),
            Err(BusError::Overlap {
                base: 0x3ff,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(a.clone(), 0x3f0, 9),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9
            })
        );
        assert!(bus.insert(a.clone(), 0x100, 0).is_err());
        assert!(bus.insert(a.clone(), u64::MAX, 2).is_err());
        bus.insert(a.clone(), 0x400, 1).unwrap();
        bus.insert(a.clone(), 0x3f0, 8).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 5);
        assert!(!bus.read(0x401, &mut d));
        assert!(!bus.read(0x3e0, &mut d));
        assert!(bus.write(0x400, &[7]));
        assert_eq!(a.lock().unwrap().0, vec![(0, vec![7])]);
    }
}
