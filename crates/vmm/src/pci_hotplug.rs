//! ACPI PCI hotplug: virtio-pci functions plugged into and out of the root bus while the
//! guest runs, the way unmodified Linux handles it (its `acpiphp` driver), as QEMU's PIIX4
//! machines and Cloud Hypervisor do it. ACPI rather than native PCIe hotplug because tern's
//! functions sit on the root bus, with no PCIe root ports to carry hotplug slots, and because
//! the guest needs nothing beyond the ACPI it already uses for CPU hotplug.
//!
//! - **What the guest sees.** Under `\_SB_.PCI0` the DSDT has one device per slot 1-31
//!   (`Snnn`, `_ADR` its slot, `_SUN` its number, `_EJ0` ejects it), a scan method `PCNT` that
//!   notifies each slot being added (device check) or removed (eject request), and a generic
//!   event device `\_SB_.GED3` (GSI [`ACPI_PCI_HOTPLUG_GSI`]) whose `_EVT` runs the scan.
//! - **The controller**, 12 ports at [`PCI_HOTPLUG_PORT`] (tern's own layout, the shape of
//!   QEMU's): at +0 the slots being added (a bitmap, cleared when read), at +4 the slots being
//!   removed, at +8 a write ejects the slots it names.
//! - **Adding**: the VMM plugs the function in (`PciBus::plug`), marks its slot being added and
//!   raises the GED; Linux scans the slot, places the BARs (tern follows) and binds the driver.
//!   **Removing**: the VMM marks the slot being removed and raises the GED; Linux unbinds the
//!   driver and calls `_EJ0`, and only then does the VMM take the function out (the ejection
//!   is signalled to the VMM's loop, [`PciHotplug::ejected_fd`]). A guest may eject a slot on
//!   its own (`/sys/bus/pci/slots/N/power`); that removes the device too.
//! - The slots being added and removed are the controller's state in snapshots.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use acpi_tables::{aml, Aml, AmlSink};
use lifecycle::{Component, Section};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{kvm_err, setup, VmmError};
use crate::sync::lock;

/// First port of the controller.
pub const PCI_HOTPLUG_PORT: u64 = 0xae00;
/// Its length in ports.
pub const PCI_HOTPLUG_LEN: u64 = 12;
/// The GSI of `\_SB_.GED3`: an ISA pin nothing else uses.
pub const ACPI_PCI_HOTPLUG_GSI: u32 = 10;
/// Slots 1-31 (0 is the host bridge).
const SLOTS: std::ops::RangeInclusive<u8> = 1..=31;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    /// Slots being added (the guest has not scanned them yet).
    up: u32,
    /// Slots being removed (the guest has not ejected them yet).
    down: u32,
}

struct Inner {
    state: State,
    /// Slots the guest ejected, for the VMM to take out.
    ejected: u32,
}

/// The controller: the guest's view of slots coming and going, and the VMM's hand on them.
pub struct PciHotplug {
    inner: Mutex<Inner>,
    /// Raises `\_SB_.GED3`.
    ged: EventFd,
    /// Tells the VMM's loop that the guest ejected slots.
    ejected: EventFd,
}

impl PciHotplug {
    /// A controller raising `ged` (an irqfd on [`ACPI_PCI_HOTPLUG_GSI`]).
    pub fn new(ged: EventFd) -> Result<Self, VmmError> {
        Ok(PciHotplug {
            inner: Mutex::new(Inner {
                state: State::default(),
                ejected: 0,
            }),
            ged,
            ejected: EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| setup(format!("eventfd: {e}")))?,
        })
    }

    fn raise(&self) -> Result<(), String> {
        self.ged
            .write(1)
            .map_err(|e| format!("cannot signal the guest: {e}"))
    }

    /// Tells the guest a function was plugged in at `slot`.
    pub fn added(&self, slot: u8) -> Result<(), String> {
        {
            let mut g = lock(&self.inner);
            g.state.up |= 1 << slot;
            g.state.down &= !(1 << slot);
        }
        self.raise()
    }

    /// Asks the guest to let go of the function at `slot`; it is taken out once ejected.
    pub fn remove(&self, slot: u8) -> Result<(), String> {
        lock(&self.inner).state.down |= 1 << slot;
        self.raise()
    }

    /// Whether the guest was asked to let go of `slot` and has not yet.
    pub fn removing(&self, slot: u8) -> bool {
        lock(&self.inner).state.down & (1 << slot) != 0
    }

    /// Signalled when the guest ejected slots ([`take_ejected`](Self::take_ejected)).
    pub fn ejected_fd(&self) -> RawFd {
        self.ejected.as_raw_fd()
    }

    /// The slots the guest ejected since the last call.
    pub fn take_ejected(&self) -> Vec<u8> {
        let _ = self.ejected.read();
        let bits = std::mem::take(&mut lock(&self.inner).ejected);
        SLOTS.filter(|s| bits & (1 << s) != 0).collect()
    }
}

/// Adds the controller to `dm` (its ports, its state as component `pci-hotplug`, its DSDT
/// part) with its GED as an irqfd.
pub fn attach(
    vm: &kvm_ioctls::VmFd,
    dm: &mut crate::device_manager::DeviceManager,
) -> Result<Arc<PciHotplug>, VmmError> {
    let ged = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup(format!("eventfd: {e}")))?;
    vm.register_irqfd(&ged, ACPI_PCI_HOTPLUG_GSI)
        .map_err(kvm_err("register PCI hotplug irqfd"))?;
    let hp = Arc::new(PciHotplug::new(ged)?);
    let ports = Arc::new(Mutex::new(Ports(hp.clone())));
    let e = dm.describe("pci-hotplug", "the PCI hotplug controller");
    e.component = Some(ports.clone());
    // Snapshots from before PCI hotplug have no state for it.
    e.optional_in_old_snapshots = true;
    e.acpi = Some(Box::new(PciHotplugAcpi));
    dm.add_pio("pci-hotplug", ports, PCI_HOTPLUG_PORT, PCI_HOTPLUG_LEN)?;
    Ok(hp)
}

/// The controller's registers on the port bus.
pub struct Ports(pub Arc<PciHotplug>);

impl devices::BusDevice for Ports {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut g = lock(&self.0.inner);
        let mut regs = [0u8; PCI_HOTPLUG_LEN as usize];
        regs[0..4].copy_from_slice(&g.state.up.to_le_bytes());
        regs[4..8].copy_from_slice(&g.state.down.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = regs.get(offset as usize + i).copied().unwrap_or(0);
        }
        if offset == 0 {
            // The guest scans what it read.
            g.state.up = 0;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 8 {
            return;
        }
        let mut b = [0u8; 4];
        for (i, v) in data.iter().take(4).enumerate() {
            b[i] = *v;
        }
        let slots = u32::from_le_bytes(b) & !1;
        if slots == 0 {
            return;
        }
        {
            let mut g = lock(&self.0.inner);
            g.ejected |= slots;
            g.state.down &= !slots;
            g.state.up &= !slots;
        }
        let _ = self.0.ejected.write(1);
    }
}

impl Component for Ports {
    fn save(&mut self, id: &str) -> Result<Option<Section>, String> {
        let g = lock(&self.0.inner);
        Section::new(id, 1, &g.state).map(Some)
    }

    fn restore(&mut self, section: &Section) -> Result<(), String> {
        let s: State = section.parse(&[1])?;
        if (s.up | s.down) & 1 != 0 {
            return Err("the PCI hotplug state names slot 0 (the host bridge)".into());
        }
        lock(&self.0.inner).state = s;
        Ok(())
    }
}

fn slot_name(slot: u8) -> String {
    format!("S{slot:03X}")
}

/// The DSDT's part: the slots, the scan, the eject method and the GED.
pub struct PciHotplugAcpi;

impl Aml for PciHotplugAcpi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let region = aml::OpRegion::new(
            "PCST".into(),
            aml::OpRegionSpace::SystemIO,
            &(PCI_HOTPLUG_PORT as usize),
            &(PCI_HOTPLUG_LEN as usize),
        );
        let fields = aml::Field::new(
            "PCST".into(),
            aml::FieldAccessType::DWord,
            aml::FieldLockRule::NoLock,
            aml::FieldUpdateRule::WriteAsZeroes,
            vec![
                aml::FieldEntry::Named(*b"PCIU", 32),
                aml::FieldEntry::Named(*b"PCID", 32),
                aml::FieldEntry::Named(*b"B0EJ", 32),
            ],
        );
        let mutex = aml::Mutex::new("BLCK".into(), 0);
        let acquire = aml::Acquire::new("BLCK".into(), 0xffff);
        let release = aml::Release::new("BLCK".into());
        let (pciu, pcid, b0ej): (aml::Path, aml::Path, aml::Path) =
            ("PCIU".into(), "PCID".into(), "B0EJ".into());

        // PCEJ(slot): eject it.
        let eject = aml::ShiftLeft::new(&b0ej, &aml::ONE, &aml::Arg(0));
        let pcej = aml::Method::new("PCEJ".into(), 1, true, vec![&acquire, &eject, &release]);

        // PCNT: notify each slot being added (1: device check) or removed (3: eject request).
        let read_up = aml::Store::new(&aml::Local(0), &pciu);
        let read_down = aml::Store::new(&aml::Local(1), &pcid);
        let slots: Vec<u8> = SLOTS.collect();
        let names: Vec<aml::Path> = slots
            .iter()
            .map(|s| slot_name(*s).as_str().into())
            .collect();
        let masks: Vec<u32> = slots.iter().map(|s| 1u32 << s).collect();
        let ups: Vec<aml::And> = masks
            .iter()
            .map(|m| aml::And::new(&aml::ZERO, &aml::Local(0), m))
            .collect();
        let downs: Vec<aml::And> = masks
            .iter()
            .map(|m| aml::And::new(&aml::ZERO, &aml::Local(1), m))
            .collect();
        let up_set: Vec<aml::NotEqual> = ups
            .iter()
            .map(|a| aml::NotEqual::new(a, &aml::ZERO))
            .collect();
        let down_set: Vec<aml::NotEqual> = downs
            .iter()
            .map(|a| aml::NotEqual::new(a, &aml::ZERO))
            .collect();
        let checks: Vec<aml::Notify> = names.iter().map(|n| aml::Notify::new(n, &1u8)).collect();
        let ejects: Vec<aml::Notify> = names.iter().map(|n| aml::Notify::new(n, &3u8)).collect();
        let if_up: Vec<aml::If> = up_set
            .iter()
            .zip(&checks)
            .map(|(c, n)| aml::If::new(c, vec![n]))
            .collect();
        let if_down: Vec<aml::If> = down_set
            .iter()
            .zip(&ejects)
            .map(|(c, n)| aml::If::new(c, vec![n]))
            .collect();
        let mut body: Vec<&dyn Aml> = vec![&acquire, &read_up, &read_down, &release];
        for i in 0..slots.len() {
            body.push(&if_up[i]);
            body.push(&if_down[i]);
        }
        let pcnt = aml::Method::new("PCNT".into(), 0, true, body);

        let devs: Vec<SlotDevice> = slots.iter().map(|&slot| SlotDevice { slot }).collect();
        let mut children: Vec<&dyn Aml> = vec![&region, &fields, &mutex, &pcej, &pcnt];
        for d in &devs {
            children.push(d);
        }
        aml::Scope::new("_SB_.PCI0".into(), children).to_aml_bytes(sink);

        // The controller's ports, claimed so that nothing else is placed there.
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A06"));
        let uid = aml::Name::new("_UID".into(), &"PCI hotplug");
        let io = aml::IO::new(
            PCI_HOTPLUG_PORT as u16,
            PCI_HOTPLUG_PORT as u16,
            1,
            PCI_HOTPLUG_LEN as u8,
        );
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io]));
        aml::Device::new("_SB_.PHPR".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);

        // GED3: a hotplug event scans.
        let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
        let ged_uid = aml::Name::new("_UID".into(), &3u8);
        let irq = aml::Interrupt::new(true, true, false, false, ACPI_PCI_HOTPLUG_GSI);
        let ged_crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
        let scan = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
        let evt = aml::Method::new("_EVT".into(), 1, true, vec![&scan]);
        aml::Device::new("_SB_.GED3".into(), vec![&ged_hid, &ged_uid, &ged_crs, &evt])
            .to_aml_bytes(sink);
    }
}

/// One slot: its address, its number, and its eject method.
struct SlotDevice {
    slot: u8,
}

impl Aml for SlotDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let slot = u32::from(self.slot);
        let adr = aml::Name::new("_ADR".into(), &(slot << 16));
        let sun = aml::Name::new("_SUN".into(), &slot);
        let call = aml::MethodCall::new("PCEJ".into(), vec![&slot]);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&call]);
        aml::Device::new(slot_name(self.slot).as_str().into(), vec![&adr, &sun, &ej0])
            .to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::BusDevice;

    fn reg(p: &mut Ports, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        p.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn slots_are_announced_scanned_and_ejected() {
        let ged = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let hp = Arc::new(PciHotplug::new(ged.try_clone().unwrap()).unwrap());
        let mut p = Ports(hp.clone());
        hp.added(5).unwrap();
        assert_eq!(ged.read().unwrap(), 1, "the GED fired");
        assert_eq!(reg(&mut p, 0), 1 << 5);
        assert_eq!(reg(&mut p, 0), 0, "cleared once read");
        hp.remove(5).unwrap();
        assert!(hp.removing(5));
        assert_eq!(reg(&mut p, 4), 1 << 5);
        assert_eq!(reg(&mut p, 4), 1 << 5, "stays until ejected");
        assert!(hp.take_ejected().is_empty());
        // The guest ejects slot 5 (and tries slot 0, the host bridge).
        p.write(8, &((1u32 << 5) | 1).to_le_bytes());
        assert_eq!(hp.take_ejected(), vec![5]);
        assert!(!hp.removing(5));
        assert_eq!(reg(&mut p, 4), 0);
        assert!(hp.take_ejected().is_empty());
        // State: what is pending survives a snapshot; slot 0 is refused.
        hp.remove(7).unwrap();
        let saved = p.save("pci-hotplug").unwrap().unwrap();
        let other = Arc::new(PciHotplug::new(EventFd::new(0).unwrap()).unwrap());
        let mut q = Ports(other.clone());
        q.restore(&saved).unwrap();
        assert!(other.removing(7));
        let mut bad = saved;
        bad.state["down"] = serde_json::json!(1);
        assert!(q.restore(&bad).unwrap_err().contains("slot 0"));
    }

    #[test]
    fn the_dsdt_part_names_every_slot_and_the_scan() {
        let mut out = Vec::new();
        PciHotplugAcpi.to_aml_bytes(&mut out);
        let has = |n: &[u8]| out.windows(n.len()).any(|w| w == n);
        for n in [
            &b"PCNT"[..],
            b"PCEJ",
            b"B0EJ",
            b"GED3",
            b"PHPR",
            b"S001",
            b"S01F",
            b"_EJ0",
            b"_SUN",
        ] {
            assert!(has(n), "no {}", String::from_utf8_lossy(n));
        }
        assert!(!has(b"S000") && !has(b"S020"));
    }
}
