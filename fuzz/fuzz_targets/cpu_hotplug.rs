//! The CPU hotplug controller: register reads and writes on its ports as a guest's AML makes
//! them (select a vCPU, acknowledge, eject), resize requests, and a fuzzed snapshot state put
//! into a fresh controller. vCPU 0 always stays present, and the counts stay within the
//! maximum.
#![no_main]
use std::sync::Arc;

use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use tern_fuzz::Input;
use vmm::control::VmControl;
use vmm::cpu_hotplug::{CpuHotplug, Ports};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn controller(count: u8, max: u8) -> Ports {
    let ctl = Arc::new(VmControl::new().unwrap());
    Ports(Arc::new(CpuHotplug::new(
        count,
        max,
        ctl,
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )))
}

fn check(p: &Ports) {
    let (present, requested, max) = p.0.counts();
    assert!((1..=max).contains(&present), "{present} of {max}");
    assert!((1..=max).contains(&requested), "{requested} of {max}");
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let max = input.u8() % 16 + 2;
    let count = input.u8() % max + 1;
    let mut p = controller(count, max);
    while !input.is_empty() {
        match input.u8() % 5 {
            0 => {
                let (offset, len) = (u64::from(input.u8() % 16), usize::from(input.u8() % 9));
                let mut buf = vec![0u8; len];
                p.read(offset, &mut buf);
            }
            1 => {
                let offset = u64::from(input.u8() % 16);
                let len = usize::from(input.u8() % 9);
                let bytes = input.bytes(len).to_vec();
                p.write(offset, &bytes);
            }
            2 => {
                let n = u32::from(input.u8());
                assert_eq!(p.0.check(n).is_ok(), (1..=u32::from(max)).contains(&n));
                let _ = p.0.resize(n);
            }
            3 => {
                // A snapshot's state (JSON) restored into a fresh controller.
                let len = usize::from(input.u16() % 512);
                let json = input.bytes(len);
                if let Ok(state) = serde_json::from_slice::<serde_json::Value>(json) {
                    let section = lifecycle::Section {
                        id: "cpu-hotplug".into(),
                        version: 1,
                        state,
                    };
                    let mut fresh = controller(count, max);
                    if lifecycle::Component::restore(&mut fresh, &section).is_ok() {
                        check(&fresh);
                        assert!(lifecycle::Component::save(&mut fresh, "cpu-hotplug").is_ok());
                    }
                }
            }
            _ => {
                let saved = lifecycle::Component::save(&mut p, "cpu-hotplug").unwrap().unwrap();
                let mut fresh = controller(count, max);
                lifecycle::Component::restore(&mut fresh, &saved).unwrap();
            }
        }
        check(&p);
    }
});
