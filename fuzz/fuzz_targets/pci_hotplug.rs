//! The PCI hotplug controller: register reads and writes on its ports as a guest's AML (or a
//! hostile guest) makes them, the VMM announcing and withdrawing slots, and a fuzzed snapshot
//! state put into a fresh controller. Slot 0 (the host bridge) is never ejected, a slot is
//! ejected only when the guest names it, and what the VMM learns is a set of slots 1-31.
#![no_main]
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use tern_fuzz::Input;
use vmm::pci_hotplug::{PciHotplug, Ports};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn controller() -> Ports {
    Ports(std::sync::Arc::new(
        PciHotplug::new(EventFd::new(EFD_NONBLOCK).unwrap()).unwrap(),
    ))
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut p = controller();
    // Slots the guest named in an eject write since the VMM last looked.
    let mut named = 0u32;
    while !input.is_empty() {
        match input.u8() % 6 {
            0 => {
                let (offset, len) = (u64::from(input.u8() % 16), usize::from(input.u8() % 9));
                let mut buf = vec![0u8; len];
                p.read(offset, &mut buf);
            }
            1 => {
                let offset = u64::from(input.u8() % 16);
                let len = usize::from(input.u8() % 9);
                let bytes = input.bytes(len).to_vec();
                if offset == 8 {
                    let mut b = [0u8; 4];
                    for (i, v) in bytes.iter().take(4).enumerate() {
                        b[i] = *v;
                    }
                    named |= u32::from_le_bytes(b);
                }
                p.write(offset, &bytes);
            }
            2 => {
                let slot = input.u8() % 31 + 1;
                p.0.added(slot).unwrap();
            }
            3 => {
                let slot = input.u8() % 31 + 1;
                p.0.remove(slot).unwrap();
                assert!(p.0.removing(slot));
            }
            4 => {
                // A snapshot's state (JSON) restored into a fresh controller.
                let len = usize::from(input.u16() % 256);
                let json = input.bytes(len);
                if let Ok(state) = serde_json::from_slice::<serde_json::Value>(json) {
                    let section = lifecycle::Section {
                        id: "pci-hotplug".into(),
                        version: 1,
                        state,
                    };
                    let mut fresh = controller();
                    if lifecycle::Component::restore(&mut fresh, &section).is_ok() {
                        assert!(!fresh.0.removing(0));
                        assert!(lifecycle::Component::save(&mut fresh, "pci-hotplug").is_ok());
                    }
                }
            }
            _ => {
                for slot in p.0.take_ejected() {
                    assert!((1..=31).contains(&slot), "slot {slot}");
                    assert!(named & (1 << slot) != 0, "slot {slot} was never named");
                }
                named = 0;
            }
        }
        assert!(!p.0.removing(0));
    }
});
