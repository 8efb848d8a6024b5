//! Device hotplug through the API on the host's `/dev/kvm`, with the probe guest (which has no
//! ACPI hotplug driver: the nested rig's `tern-hotplug` has Linux's acpiphp take the devices
//! in and out). Plugging a disk and a NIC in answers their ids and PCI addresses and puts them
//! in the VM's configuration with their slots; refusals name the problem and change nothing;
//! an unplug request is accepted and the device stays until the guest ejects it; a snapshot
//! carries the plugged devices, and the restored VM has them at the same slots.

mod common;

use std::time::Duration;

use api::client::Client;
use common::*;

fn call(c: &Client, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    c.call(method, path, body).unwrap()
}

#[test]
fn disks_and_nics_are_plugged_in_refused_and_kept_by_a_snapshot() {
    let name = "disks_and_nics_are_plugged_in_refused_and_kept_by_a_snapshot";
    if !require_kvm(name) || !require_netns(name) {
        return;
    }
    let dir = Scratch::new("hotplug");
    let (sock, serial) = (dir.path("api.sock"), dir.path("serial.log"));
    let (a, b) = (dir.path("a.img"), dir.path("b.img"));
    std::fs::write(&a, vec![0u8; 4 << 20]).unwrap();
    std::fs::write(&b, vec![0u8; 4 << 20]).unwrap();
    let backend = format!("file:{}", s(&serial));
    let (t, c) = running_vm(
        &sock,
        &backend,
        "probe.run=count probe.count_ms=60000",
        &["--rng"],
    );

    // A disk without an id gets disk0, one with an id keeps it; both answer their address.
    let body = format!(r#"{{"path": "{}"}}"#, s(&a));
    let (st, got) = call(&c, "PUT", "/v1/vm/disks", Some(&body));
    assert_eq!(st, 200, "{got}");
    let plugged: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(plugged["id"], "disk0");
    let bdf = plugged["bdf"].as_str().unwrap().to_string();
    assert!(bdf.starts_with("0000:00:") && bdf.ends_with(".0"), "{bdf}");
    let r = run_with_timeout(
        &tern(),
        &["net", "add", "--api-socket", s(&sock), "tap=auto,id=uplink"],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains("uplink plugged in at PCI 0000:00:"),
        "{}",
        r.stdout
    );

    // Refusals, each naming the problem; nothing changes.
    for (method, path, body, status, why) in [
        (
            "PUT",
            "/v1/vm/disks",
            format!(r#"{{"path": "{}"}}"#, s(&a)),
            400,
            "in use by another process",
        ),
        (
            "PUT",
            "/v1/vm/disks",
            format!(r#"{{"path": "{}", "id": "uplink"}}"#, s(&b)),
            400,
            "has a device with that id",
        ),
        (
            "PUT",
            "/v1/vm/disks",
            format!(r#"{{"path": "{}", "id": "vcpu1"}}"#, s(&b)),
            400,
            "tern's own",
        ),
        (
            "PUT",
            "/v1/vm/disks",
            r#"{"path": "/nonexistent/x.img"}"#.to_string(),
            400,
            "/nonexistent/x.img",
        ),
        (
            "PUT",
            "/v1/vm/disks",
            r#"{"paht": "x"}"#.to_string(),
            400,
            "paht",
        ),
        ("DELETE", "/v1/vm/disks/nope", String::new(), 404, "disk0"),
        ("DELETE", "/v1/vm/nets/disk0", String::new(), 404, "uplink"),
    ] {
        let body = (!body.is_empty()).then_some(body.as_str());
        let (st, got) = call(&c, method, path, body);
        assert_eq!(st, status, "{method} {path} {body:?}: {got}");
        assert!(got.contains(why), "{method} {path} {body:?}: {got}");
    }
    let config = c.info().unwrap().config.unwrap();
    assert_eq!(config.disks.len(), 1);
    assert_eq!(config.nets.len(), 1);
    let slot = |id: &str| config.pci_slots.get(id).copied();
    let disk_slot = slot("disk0").expect("disk0's slot is recorded");
    assert_eq!(format!("0000:00:{disk_slot:02x}.0"), bdf);
    assert!(slot("uplink").is_some() && slot("virtio-rng").is_some());

    // The probe has no hotplug driver: an unplug request is accepted, the disk stays.
    let (st, got) = call(&c, "DELETE", "/v1/vm/disks/disk0", None);
    assert_eq!(st, 202, "{got}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.info().unwrap().config.unwrap().disks.len(), 1);

    // Not while paused; a snapshot carries both, and the restored VM has them where they were.
    let (st, _) = call(&c, "PUT", "/v1/vm/pause", None);
    assert_eq!(st, 204);
    let body = format!(r#"{{"path": "{}"}}"#, s(&b));
    let (st, got) = call(&c, "PUT", "/v1/vm/disks", Some(&body));
    assert_eq!(st, 409, "{got}");
    assert!(got.contains("paused"), "{got}");
    let snap = dir.path("snap");
    let (st, got) = call(
        &c,
        "PUT",
        "/v1/vm/snapshot",
        Some(&format!(r#"{{"dir":"{}"}}"#, s(&snap))),
    );
    assert_eq!(st, 204, "{got}");
    drop(t);
    let restored_sock = dir.path("restored.sock");
    let (_t2, c2) = restored(&snap, &restored_sock, &dir.path("restored.log"));
    let config = c2.info().unwrap().config.unwrap();
    assert_eq!(config.disks[0].id.as_deref(), Some("disk0"));
    assert_eq!(config.nets[0].id.as_deref(), Some("uplink"));
    assert_eq!(config.pci_slots.get("disk0"), Some(&disk_slot));
    // And the restored VM takes another disk.
    let (st, got) = call(&c2, "PUT", "/v1/vm/disks", Some(&body));
    assert_eq!(st, 200, "{got}");
    assert!(got.contains("\"disk1\""), "{got}");
}

#[test]
fn hotplug_needs_the_pci_transport() {
    if !require_kvm("hotplug_needs_the_pci_transport") {
        return;
    }
    let dir = Scratch::new("hotplug-mmio");
    let sock = dir.path("api.sock");
    let a = dir.path("a.img");
    std::fs::write(&a, vec![0u8; 1 << 20]).unwrap();
    let (_t, c) = running_vm(
        &sock,
        "none",
        "probe.run=count probe.count_ms=20000",
        &["--transport", "mmio"],
    );
    let (st, got) = call(
        &c,
        "PUT",
        "/v1/vm/disks",
        Some(&format!(r#"{{"path": "{}"}}"#, s(&a))),
    );
    assert_eq!(st, 400, "{got}");
    assert!(got.contains("needs the PCI transport"), "{got}");
    assert!(c.info().unwrap().config.unwrap().disks.is_empty());
}

/// A disk plugged in moves with a migrating VM: the destination builds it at its slot and
/// takes its lock at the switch-over.
#[test]
fn a_plugged_disk_migrates_with_the_vm() {
    if !require_kvm("a_plugged_disk_migrates_with_the_vm") {
        return;
    }
    let dir = Scratch::new("hotplug-mig");
    let (sock, dsock) = (dir.path("a.sock"), dir.path("b.sock"));
    let (a_log, b_log) = (dir.path("a.log"), dir.path("b.log"));
    let img = dir.path("hot.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let kernel = probe();
    let url = format!("unix:{}", s(&dir.path("m.sock")));
    let b_backend = format!("file:{}", s(&b_log));
    let _dst = listening(
        &url,
        &[
            "--serial",
            &b_backend,
            "--api-socket",
            s(&dsock),
            "--accept-dir",
            s(kernel.parent().unwrap()),
            "--accept-dir",
            s(&dir.0),
        ],
    );
    let a_backend = format!("file:{}", s(&a_log));
    let (src, c) = running_vm(
        &sock,
        &a_backend,
        "probe.run=count probe.count_ms=30000",
        &[],
    );
    let (st, got) = call(
        &c,
        "PUT",
        "/v1/vm/disks",
        Some(&format!(r#"{{"path": "{}", "id": "hot"}}"#, s(&img))),
    );
    assert_eq!(st, 200, "{got}");
    let slot = c.info().unwrap().config.unwrap().pci_slots["hot"];
    let r = run_with_timeout(
        &tern(),
        &["migrate", "--api-socket", s(&sock), "--to", &url],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let (code, err) = src.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "source: {err}");
    let d = Client::new(&dsock);
    wait_until("the destination's VM", Duration::from_secs(20), || {
        d.info().is_ok_and(|i| i.state.as_str() == "running")
    });
    let config = d.info().unwrap().config.unwrap();
    assert_eq!(config.disks[0].id.as_deref(), Some("hot"));
    assert_eq!(config.pci_slots.get("hot"), Some(&slot));
    // The destination holds the image's lock now.
    let other = Client::new(&dsock);
    let (st, got) = call(
        &other,
        "PUT",
        "/v1/vm/disks",
        Some(&format!(r#"{{"path": "{}"}}"#, s(&img))),
    );
    assert_eq!(st, 400, "{got}");
    assert!(got.contains("in use"), "{got}");
}
