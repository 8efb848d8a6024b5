//! The VM's devices as their owner keeps them: each under its id, with where it sits on the
//! buses, its state (when it has any, as a component of the VM) and what it says about itself
//! in the DSDT. The buses are filled through it, so every range has an owner; the DSDT and the
//! device part of the component walk are read off it, in the order devices were described.

use std::sync::{Arc, Mutex};

use acpi_tables::Aml;
use devices::{Bus, BusDevice};

use crate::components::{Components, Phase, Shared};
use crate::error::{setup, VmmError};

/// Where a device answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    /// Ports `[base, base + len)`.
    Pio {
        /// First port.
        base: u64,
        /// How many.
        len: u64,
    },
    /// Guest physical addresses `[base, base + len)`.
    Mmio {
        /// First address.
        base: u64,
        /// How many bytes.
        len: u64,
    },
}

/// One device.
pub struct DeviceEntry {
    /// Its id (its section's key when it is stateful).
    pub id: String,
    /// What the user calls it.
    pub name: String,
    /// Where it answers.
    pub ranges: Vec<Range>,
    /// Its state, when it has any.
    pub component: Option<Shared>,
    /// Its description in the DSDT, when the guest learns of it through ACPI.
    pub acpi: Option<Box<dyn Aml + Send>>,
    /// Older snapshots may have no state for it (it keeps its fresh state then).
    pub optional_in_old_snapshots: bool,
}

/// The VM's devices and the buses they answer on.
#[derive(Default)]
pub struct DeviceManager {
    pio: Bus,
    mmio: Bus,
    entries: Vec<DeviceEntry>,
}

impl DeviceManager {
    /// The entry of `id`, made (named `name`) if it is new.
    pub fn describe(&mut self, id: &str, name: &str) -> &mut DeviceEntry {
        let i = match self.entries.iter().position(|e| e.id == id) {
            Some(i) => i,
            None => {
                self.entries.push(DeviceEntry {
                    id: id.to_string(),
                    name: name.to_string(),
                    ranges: Vec::new(),
                    component: None,
                    acpi: None,
                    optional_in_old_snapshots: false,
                });
                self.entries.len() - 1
            }
        };
        &mut self.entries[i]
    }

    /// Puts device `id`'s `dev` on the port bus at `[base, base + len)`.
    pub fn add_pio(
        &mut self,
        id: &str,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), VmmError> {
        self.add(id, dev, Range::Pio { base, len })
    }

    /// Puts device `id`'s `dev` on the MMIO bus at `[base, base + len)`.
    pub fn add_mmio(
        &mut self,
        id: &str,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), VmmError> {
        self.add(id, dev, Range::Mmio { base, len })
    }

    /// Hands `[base, base + len)` of the MMIO bus to `window`, whose devices device `id` may
    /// change while the guest runs (see [`devices::Bus::insert_window`]).
    pub fn add_mmio_window(
        &mut self,
        id: &str,
        window: Arc<std::sync::RwLock<Bus>>,
        base: u64,
        len: u64,
    ) -> Result<(), VmmError> {
        self.mmio.insert_window(window, base, len).map_err(setup)?;
        self.describe(id, id).ranges.push(Range::Mmio { base, len });
        Ok(())
    }

    fn add(
        &mut self,
        id: &str,
        dev: Arc<Mutex<dyn BusDevice>>,
        range: Range,
    ) -> Result<(), VmmError> {
        let (bus, base, len) = match range {
            Range::Pio { base, len } => (&mut self.pio, base, len),
            Range::Mmio { base, len } => (&mut self.mmio, base, len),
        };
        bus.insert(dev, base, len).map_err(setup)?;
        self.describe(id, id).ranges.push(range);
        Ok(())
    }

    /// The device `id`, if there is one.
    pub fn get(&self, id: &str) -> Option<&DeviceEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// The devices, in the order they were described.
    pub fn entries(&self) -> &[DeviceEntry] {
        &self.entries
    }

    /// The devices' own DSDT descriptions, in order.
    pub fn dsdt(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for a in self.entries.iter().filter_map(|e| e.acpi.as_ref()) {
            a.to_aml_bytes(&mut out);
        }
        out
    }

    /// Registers every stateful device, in order, handing it over to `components` (which
    /// alone keeps it from then on: a device unplugged later is gone once it leaves them).
    pub fn register(&mut self, components: &mut Components) {
        for e in &mut self.entries {
            if let Some(c) = e.component.take() {
                components.register(&e.id, &e.name, Phase::Device, c);
                if e.optional_in_old_snapshots {
                    components.optional_in_old_snapshots();
                }
            }
        }
    }

    /// The buses, to share with the vCPUs (nothing more is added to them).
    pub fn buses(&mut self) -> (Arc<Bus>, Arc<Bus>) {
        (
            Arc::new(std::mem::take(&mut self.pio)),
            Arc::new(std::mem::take(&mut self.mmio)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dev;
    impl BusDevice for Dev {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(7);
        }
        fn write(&mut self, _: u64, _: &[u8]) {}
    }

    struct Name(&'static str);
    impl Aml for Name {
        fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
            sink.vec(self.0.as_bytes());
        }
    }

    #[test]
    fn devices_own_their_ranges_and_describe_themselves_in_order() {
        let mut m = DeviceManager::default();
        m.describe("b", "device b").acpi = Some(Box::new(Name("BBBB")));
        m.add_pio("a", Arc::new(Mutex::new(Dev)), 0x10, 2).unwrap();
        m.add_mmio("b", Arc::new(Mutex::new(Dev)), 0x1000, 0x100)
            .unwrap();
        m.describe("a", "ignored: a exists").acpi = Some(Box::new(Name("AAAA")));
        assert!(m.add_pio("c", Arc::new(Mutex::new(Dev)), 0x11, 1).is_err());
        assert_eq!(m.get("b").unwrap().name, "device b");
        assert_eq!(
            m.get("a").unwrap().ranges,
            vec![Range::Pio { base: 0x10, len: 2 }]
        );
        assert_eq!(
            m.get("b").unwrap().ranges,
            vec![Range::Mmio {
                base: 0x1000,
                len: 0x100
            }]
        );
        assert_eq!(m.dsdt(), b"BBBBAAAA");
        let (pio, mmio) = m.buses();
        let mut d = [0u8; 1];
        assert!(pio.read(0x11, &mut d) && d == [7]);
        assert!(mmio.read(0x10ff, &mut d));
        assert!(!mmio.read(0x1100, &mut d));
    }
}
