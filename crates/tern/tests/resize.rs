//! CPU hotplug as the VMM sees it, on the host's `/dev/kvm` with the probe guest (which does
//! not use ACPI, so it neither onlines added vCPUs nor ejects removed ones; the nested rig's
//! `tern-cpu-hotplug` has Linux do that): `tern resize` within and beyond `--max-cpus`, what
//! `tern info` reports, and the vCPUs present across a snapshot and a restore.

mod common;

use std::time::Duration;

use api::client::Client;
use common::*;

fn info(c: &Client) -> api::VmInfo {
    c.info().unwrap()
}

fn resize(c: &Client, body: &str) -> (u16, String) {
    c.call("PUT", "/v1/vm/resize", Some(body)).unwrap()
}

#[test]
fn resize_adds_vcpus_up_to_the_maximum_and_refuses_the_rest() {
    if !require_kvm("resize_adds_vcpus_up_to_the_maximum_and_refuses_the_rest") {
        return;
    }
    let dir = Scratch::new("resize");
    let (sock, serial) = (dir.path("api.sock"), dir.path("serial.log"));
    let kernel = probe();
    let backend = format!("file:{}", s(&serial));
    let t = spawn(&[
        "--kernel",
        s(&kernel),
        "--memory",
        "64M",
        "--cpus",
        "2",
        "--max-cpus",
        "4",
        "--serial",
        &backend,
        "--api-socket",
        s(&sock),
        "--cmdline",
        "probe.run=smp,count probe.count_ms=20000",
    ]);
    wait_until("3 ticks", Duration::from_secs(20), || {
        ticks(&serial).len() >= 3
    });
    let c = Client::new(&sock);
    let i = info(&c);
    assert_eq!(
        (i.vcpus, i.vcpus_requested, i.vcpus_max),
        (Some(2), Some(2), Some(4))
    );
    // The probe started the two vCPUs the MP table lists.
    let smp = lines_after(&serial, "probe: smp ");
    assert!(smp.iter().any(|l| l.starts_with("ok cpus=2 ")), "{smp:?}");
    // Bad requests change nothing.
    for (body, why) in [
        (
            r#"{"cpus":0}"#,
            "must be between 1 and the VM's max_cpus (4)",
        ),
        (
            r#"{"cpus":5}"#,
            "must be between 1 and the VM's max_cpus (4)",
        ),
        (r#"{}"#, "nothing to resize"),
        (r#"{"cpus":"two"}"#, "cpus"),
        (r#"{"cpus":2,"memory":"1G"}"#, "memory"),
    ] {
        let (st, e) = resize(&c, body);
        assert_eq!(st, 400, "{body}: {e}");
        assert!(e.contains(why), "{body}: {e}");
    }
    assert_eq!(info(&c).vcpus, Some(2));
    // Up to 4: plugged in at once (the guest would online them).
    let r = run_with_timeout(
        &tern(),
        &["resize", "--api-socket", s(&sock), "--cpus", "4"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let i = info(&c);
    assert_eq!((i.vcpus, i.vcpus_requested), (Some(4), Some(4)));
    let shown = tern_info(&sock);
    assert!(
        shown.contains("vcpus: 4 (asked for 4, at most 4)") || shown.contains("vcpus: 4\n"),
        "{shown}"
    );
    // Down to 1: asked for, but the vCPUs stay until the guest ejects them (the probe does not).
    assert_eq!(resize(&c, r#"{"cpus":1}"#).0, 204);
    let i = info(&c);
    assert_eq!((i.vcpus, i.vcpus_requested), (Some(4), Some(1)));
    // Across a snapshot and a restore: four vCPUs present, the guest counting on.
    assert_eq!(resize(&c, r#"{"cpus":4}"#).0, 204);
    let snap = dir.path("snap");
    pause_and_snapshot(&c, &snap);
    drop(t);
    let serial2 = dir.path("serial2.log");
    let (_r, c2) = restored(&snap, &dir.path("api2.sock"), &serial2);
    let i = info(&c2);
    assert_eq!((i.vcpus, i.vcpus_max), (Some(4), Some(4)));
    wait_until("ticks after the restore", Duration::from_secs(20), || {
        !ticks(&serial2).is_empty()
    });
}

/// A VM started without --max-cpus has no CPU hotplug and says how to get it.
#[test]
fn resize_without_max_cpus_is_refused_by_name() {
    if !require_kvm("resize_without_max_cpus_is_refused_by_name") {
        return;
    }
    let dir = Scratch::new("resize-none");
    let sock = dir.path("api.sock");
    let (_t, c) = counting_vm(&sock);
    let kernel = probe();
    let (st, e) = resize(&c, r#"{"cpus":2}"#);
    assert_eq!(st, 400);
    assert!(e.contains("start it with --max-cpus N"), "{e}");
    // A bad --max-cpus is one line naming it.
    let r = tern_run(
        &["--kernel", s(&kernel), "--cpus", "2", "--max-cpus", "1"],
        Duration::from_secs(10),
    );
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr
            .contains("invalid max_cpus '1': must be between cpus (2) and 254"),
        "{}",
        r.stderr
    );
}

/// The guest ejecting a vCPU (the probe writes the controller's eject bit, as a guest's
/// `_EJ0` does): tern pulls it out, the VM runs on, pauses and resumes with it parked, and a
/// resize plugs it in again.
#[test]
fn a_vcpu_the_guest_ejects_is_pulled_out_and_can_come_back() {
    if !require_kvm("a_vcpu_the_guest_ejects_is_pulled_out_and_can_come_back") {
        return;
    }
    let dir = Scratch::new("resize-eject");
    let (sock, serial) = (dir.path("api.sock"), dir.path("serial.log"));
    let kernel = probe();
    let backend = format!("file:{}", s(&serial));
    let _t = spawn(&[
        "--kernel",
        s(&kernel),
        "--memory",
        "64M",
        "--cpus",
        "2",
        "--max-cpus",
        "3",
        "--serial",
        &backend,
        "--api-socket",
        s(&sock),
        "--cmdline",
        "probe.run=cpueject,count probe.cpueject_ms=200 probe.count_ms=20000",
    ]);
    wait_until("the eject", Duration::from_secs(20), || {
        !lines_after(&serial, "probe: cpueject ok ").is_empty()
    });
    let said = lines_after(&serial, "probe: cpueject ok ");
    assert_eq!(said[0], "id=1 before=1 after=0", "{said:?}");
    let c = Client::new(&sock);
    let i = info(&c);
    assert_eq!(
        (i.vcpus, i.vcpus_requested, i.vcpus_max),
        (Some(1), Some(2), Some(3))
    );
    // The VM goes on, and pauses and resumes with the vCPU parked.
    let before = ticks(&serial).len();
    wait_until("more ticks", Duration::from_secs(10), || {
        ticks(&serial).len() > before + 2
    });
    assert_eq!(c.call("PUT", "/v1/vm/pause", None).unwrap().0, 204);
    assert_eq!(c.call("PUT", "/v1/vm/resume", None).unwrap().0, 204);
    let before = ticks(&serial).len();
    wait_until("ticks after resume", Duration::from_secs(10), || {
        ticks(&serial).len() > before + 2
    });
    // Back in.
    assert_eq!(resize(&c, r#"{"cpus":3}"#).0, 204);
    assert_eq!(info(&c).vcpus, Some(3));
}
