//! Every component a VM registers round-trips its state: saved from one freshly built VM,
//! restored into another built from the same configuration, and saved again, it is the same.
//! The walk covers whatever is registered, so a new component is tested by being registered.

use std::time::Instant;

use lifecycle::Section;
use serde_json::Value;

use crate::builder::{build, Origin};
use crate::config::VmConfig;

/// A VM configuration with every kind of device tern has (a TAP only when this process may
/// create one), on `transport`.
pub(crate) fn config(dir: &std::path::Path, transport: &str, with_net: bool) -> VmConfig {
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut text = format!(
        "kernel = \"/unused\"\ncpus = 2\nmemory = \"64M\"\nserial = \"none\"\nrng = true\nconsole = \"none\"\ntransport = \"{transport}\"\n[[disks]]\npath = \"{}\"\nformat = \"raw\"\n",
        disk.display()
    );
    if with_net {
        text.push_str("[[nets]]\ntap = \"auto\"\n");
    }
    let c = VmConfig::from_file_text("roundtrip.toml", &text).unwrap();
    c.validate().unwrap();
    c
}

/// KVM, or None after a loud skip (a failure under CI=true): for every test of this crate
/// that needs `/dev/kvm`.
/// A scratch directory named for `tag`, made if missing.
pub(crate) fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A VM built from [`config`] (no NIC) in `dir` on `transport`, not started.
pub(crate) fn built_vm(dir: &std::path::Path, transport: &str) -> crate::vm::Vm {
    build(
        &config(dir, transport, false),
        Instant::now(),
        Origin::Snapshot,
        None,
    )
    .unwrap()
}

pub(crate) fn kvm_or_skip(test: &str) -> Option<kvm_ioctls::Kvm> {
    match kvm_ioctls::Kvm::new() {
        Ok(k) => Some(k),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("{test}: /dev/kvm is required under CI=true but cannot be opened: {e}")
        }
        Err(e) => {
            eprintln!(
                "\n*** SKIPPED {test}: /dev/kvm cannot be opened ({e}); this test needs KVM ***\n"
            );
            None
        }
    }
}

/// Whether this process can use `/dev/kvm` (see [`kvm_or_skip`]).
fn have_kvm(test: &str) -> bool {
    kvm_or_skip(test).is_some()
}

/// A section with what legitimately changes between two saves of the same state taken a
/// moment apart zeroed: the KVM clock, and each vCPU's time-stamp counter.
fn without_time(s: &Section) -> Section {
    let mut s = s.clone();
    if s.id == "kvm-vm" {
        s.state["clock"] = Value::Null;
        // Each PIT channel's count_load_time (bytes 16..24 of its 24) is a host time.
        if let Some(pit) = s.state["pit"].as_array_mut() {
            for c in 0..3 {
                for b in pit.iter_mut().skip(c * 24 + 16).take(8) {
                    *b = Value::from(0);
                }
            }
        }
    }
    if s.id.starts_with("vcpu") {
        if let Some(msrs) = s.state["msrs"].as_array_mut() {
            // A `kvm_msr_entry` is saved as its 16 bytes: index (4), reserved (4), data (8).
            // IA32_TSC (0x10) is a time.
            msrs.retain(|m| {
                let b: Vec<u64> = m.as_array().map_or(Vec::new(), |a| {
                    a.iter().take(4).filter_map(Value::as_u64).collect()
                });
                let index = b.iter().rev().fold(0u64, |acc, x| acc << 8 | x);
                index != 0x10
            });
        }
    }
    s
}

/// Where two JSON values first differ (a path like `/msrs/3/data`), if they do.
fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, format!("{at}/{i}"))),
        (Value::Object(x), Value::Object(y)) if x.len() == y.len() => {
            x.iter().find_map(|(k, v)| match y.get(k) {
                Some(w) => first_difference(v, w, format!("{at}/{k}")),
                None => Some(format!("{at}/{k}")),
            })
        }
        _ if a == b => None,
        _ => Some(format!("{at}: {a} then {b}")),
    }
}

fn round_trip(transport: &str) {
    let test = format!("every_component_round_trips_its_state ({transport})");
    if !have_kvm(&test) {
        return;
    }
    let dir =
        std::env::temp_dir().join(format!("tern-roundtrip-{transport}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("\n*** {test}: not root, so no TAP: virtio-net is left out ***\n");
    }
    let c = config(&dir, transport, root);
    let a = build(&c, Instant::now(), Origin::Snapshot, None).unwrap();
    let saved = a.components.save().unwrap();
    let ids: Vec<&str> = saved.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        a.components.ids(),
        "every registered component has a state"
    );
    let mut want = vec!["kvm-vm", "vcpu0", "vcpu1", "com1", "rtc"];
    if transport == "pci" {
        want.push("pci-root");
    }
    want.extend(["virtio-rng", "virtio-console", "disk0"]);
    if root {
        want.push("net0");
    }
    if transport == "pci" {
        want.push("pci-hotplug");
    }
    assert_eq!(ids, want);
    drop(a);

    let b = build(&c, Instant::now(), Origin::Snapshot, None).unwrap();
    b.components.restore(&saved).unwrap();
    let again = b.components.save().unwrap();
    assert_eq!(again.len(), saved.len());
    for (x, y) in saved.iter().zip(&again) {
        let (x, y) = (without_time(x), without_time(y));
        assert_eq!((&x.id, x.version), (&y.id, y.version));
        if let Some(at) = first_difference(&x.state, &y.state, String::new()) {
            panic!("{} changed on its way through a snapshot, at {at}", x.id);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_component_round_trips_its_state_on_pci() {
    round_trip("pci");
}

#[test]
fn every_component_round_trips_its_state_on_mmio() {
    round_trip("mmio");
}

/// The dirty log goes on and off at runtime: a write tern makes while it is on is in the next
/// take, and off there is nothing to take.
#[test]
fn the_dirty_log_switches_on_and_off_at_runtime() {
    if !have_kvm("the_dirty_log_switches_on_and_off_at_runtime") {
        return;
    }
    let dir = scratch_dir("dirty");
    let vm = built_vm(&dir, "pci");
    assert!(!vm.ram.logging());
    assert_eq!(vm.ram.take_dirty().unwrap(), None);
    vm.ram.start_dirty_log(false).unwrap();
    assert!(vm.ram.logging());
    let clean = vm.ram.take_dirty().unwrap().unwrap();
    assert!(clean.iter().all(|w| *w == 0), "a fresh log is clean");
    vm.ram.mark(5 * 4096, 1);
    let bits = vm.ram.take_dirty().unwrap().unwrap();
    assert_eq!(bits[0], 1 << 5);
    vm.ram.stop_dirty_log().unwrap();
    assert!(!vm.ram.logging());
    assert_eq!(vm.ram.take_dirty().unwrap(), None);
    std::fs::remove_dir_all(&dir).ok();
}

fn has(dsdt: &[u8], what: &[u8]) -> bool {
    dsdt.windows(what.len()).any(|w| w == what)
}

/// Every device is owned by the device manager under its id, with the ranges it answers on;
/// the DSDT is made of the devices' own descriptions: COM1, the RTC, the power button and its
/// GED, the VM generation ID and its GED, then the virtio-mmio devices or the PCI host bridge.
#[test]
fn devices_have_owners_ranges_and_describe_themselves() {
    if !have_kvm("devices_have_owners_ranges_and_describe_themselves") {
        return;
    }
    use crate::device_manager::Range;
    let dir = scratch_dir("devices");
    for transport in ["pci", "mmio"] {
        let vm = built_vm(&dir, transport);
        let dm = vm.devices();
        let ids: Vec<&str> = dm.entries().iter().map(|e| e.id.as_str()).collect();
        let mut want = vec![
            "com1",
            "rtc",
            "acpi-pm",
            "vmgenid",
            "i8042",
            "debug-exit",
            "debug-port",
        ];
        if transport == "pci" {
            want.push("pci-root");
        }
        want.extend(["virtio-rng", "virtio-console", "disk0"]);
        if transport == "pci" {
            want.push("pci-hotplug");
        }
        assert_eq!(ids, want, "{transport}");
        assert_eq!(
            dm.get("com1").unwrap().ranges,
            vec![Range::Pio {
                base: 0x3f8,
                len: 8
            }]
        );
        // On PCI the disk's BARs answer in the root's window (they move with the guest's
        // placement); on virtio-mmio its registers are its own range.
        let disk = &dm.get("disk0").unwrap().ranges;
        if transport == "pci" {
            assert!(disk.is_empty());
            assert!(dm.get("pci-root").unwrap().ranges.contains(&Range::Mmio {
                base: arch::layout::PCI_MMIO32_START,
                len: arch::layout::PCI_MMIO32_END - arch::layout::PCI_MMIO32_START,
            }));
        } else {
            assert!(!disk.is_empty() && disk.iter().all(|r| matches!(r, Range::Mmio { .. })));
        }
        let d = dm.dsdt();
        for name in [
            &b"COM1"[..],
            b"RTC_",
            b"PWRB",
            b"GED_",
            b"_EVT",
            b"VGEN",
            b"ADDR",
            b"GED1",
        ] {
            assert!(
                has(&d, name),
                "{transport}: no {}",
                String::from_utf8_lossy(name)
            );
        }
        assert!(has(&d, b"VMGENCTR\0") && has(&d, b"VM_Gen_Counter\0"));
        // ADDR returns Package { the ID's address, 0 }.
        let mut addr_pkg = vec![0xa4, 0x12, 0x08, 0x02, 0x0c];
        addr_pkg.extend_from_slice(&(arch::layout::VMGENID_ADDR as u32).to_le_bytes());
        addr_pkg.push(0x00);
        assert!(has(&d, &addr_pkg));
        let mmio = transport == "mmio";
        assert_eq!(
            has(&d, b"V000") && has(&d, b"V002") && has(&d, b"LNRO0005"),
            mmio
        );
        assert_eq!(has(&d, b"PCI0") && has(&d, b"_PRT"), !mmio);
    }
    std::fs::remove_dir_all(&dir).ok();
}
