//! The memory balloon on the host's `/dev/kvm`, driven by the probe's own virtio-balloon
//! driver (`probe.run=vballoon`): inflating gives the guest's pages back to the host (tern's
//! resident memory drops), deflating gives them to the guest again as zeroes, free page
//! reports free memory too, statistics arrive, and the balloon's size survives a snapshot and
//! a restore, after which freeing lazily restored memory still gives zeroes. Private and
//! shared guest memory, PCI and MMIO.

mod common;

use std::path::Path;
use std::time::Duration;

use api::client::Client;
use common::*;

const MIB: u64 = 1 << 20;

/// The probe's `vballoon` lines so far.
fn said(serial: &Path) -> Vec<String> {
    lines_after(serial, "probe: vballoon ")
}

fn wait_said(serial: &Path, what: &str, secs: u64) {
    wait_until(what, Duration::from_secs(secs), || {
        said(serial)
            .iter()
            .any(|l| l == what || l.starts_with(&format!("{what} ")))
    });
}

fn balloon(c: &Client) -> serde_json::Value {
    c.get("/v1/vm/balloon").unwrap()
}

fn set(c: &Client, size: &str) -> (u16, String) {
    c.call(
        "PUT",
        "/v1/vm/balloon",
        Some(&format!(r#"{{"size":"{size}"}}"#)),
    )
    .unwrap()
}

/// A 256 MiB guest filling 128 MiB, with `extra` flags; its API client and serial file.
fn guest(dir: &Scratch, extra: &[&str], report: bool) -> (Tern, Client, std::path::PathBuf) {
    let (sock, serial) = (dir.path("api.sock"), dir.path("serial.log"));
    let kernel = probe();
    let backend = format!("file:{}", s(&serial));
    let mut cmdline =
        "probe.run=vballoon probe.balloon_fill_mb=128 probe.balloon_ms=60000".to_string();
    if report {
        cmdline.push_str(" probe.balloon_report_mb=32 probe.balloon_report_ms=1500");
    }
    let mut args = vec![
        "--kernel",
        s(&kernel),
        "--memory",
        "256M",
        "--serial",
        &backend,
        "--api-socket",
        s(&sock),
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    let t = spawn(&args);
    wait_said(&serial, "ready", 20);
    (t, Client::new(&sock), serial)
}

/// Inflate to 96 MiB, (report 32 MiB free,) deflate to 0: tern's resident memory follows.
fn takes_memory_back_and_gives_it_again(name: &str, extra: &[&str]) {
    let dir = Scratch::new(name);
    let mut args = vec!["--balloon", "free_page_reporting=on,stats_s=1"];
    args.extend_from_slice(extra);
    let (t, c, serial) = guest(&dir, &args, true);
    let full = t.rss();
    assert!(
        full > 128 * MIB,
        "the guest's 128 MiB are not resident: {full}"
    );
    let (st, b) = set(&c, "96M");
    assert_eq!(st, 204, "{b}");
    wait_said(&serial, "held=24576 zero=ok", 20);
    wait_until("the balloon's actual size", Duration::from_secs(5), || {
        balloon(&c)["actual_bytes"] == 96 * MIB
    });
    let ballooned = t.rss();
    assert!(
        ballooned + 80 * MIB < full,
        "inflating 96 MiB took tern's RSS from {} to {} MiB only",
        full / MIB,
        ballooned / MIB
    );
    // Free page reporting: 32 MiB more.
    wait_said(&serial, "reported_mb=32 zero=ok", 20);
    wait_until("the report", Duration::from_secs(5), || {
        balloon(&c)["reported_bytes"] == 32 * MIB
    });
    let reported = t.rss();
    assert!(
        reported + 24 * MIB < ballooned,
        "reporting 32 MiB free took tern's RSS from {} to {} MiB only",
        ballooned / MIB,
        reported / MIB
    );
    // Statistics: what the probe sends, refreshed every second.
    let b = balloon(&c);
    assert_eq!(b["driver"]["stats"], true, "{b}");
    assert_eq!(b["driver"]["free_page_reporting"], true, "{b}");
    assert_eq!(b["stats"]["values"]["total_memory"], 0x1234_5000u64, "{b}");
    let sent = |b: &serde_json::Value| b["stats"]["values"]["minor_faults"].as_u64().unwrap();
    let first = sent(&b);
    wait_until("fresh statistics", Duration::from_secs(5), || {
        sent(&balloon(&c)) > first
    });
    // Bad requests change nothing.
    let (st, e) = set(&c, "1G");
    assert_eq!(st, 400);
    assert!(
        e.contains("larger than the guest's memory (256 MiB)"),
        "{e}"
    );
    let (st, e) = c
        .call("PUT", "/v1/vm/balloon", Some(r#"{"size":"lots"}"#))
        .unwrap();
    assert_eq!(st, 400, "{e}");
    assert_eq!(balloon(&c)["target_bytes"], 96 * MIB);
    // All back: the guest finds zeroes and fills them again.
    let (st, b) = set(&c, "0");
    assert_eq!(st, 204, "{b}");
    wait_said(&serial, "held=0 zero=ok", 20);
    wait_until("the guest's memory back", Duration::from_secs(10), || {
        t.rss() > reported + 80 * MIB
    });
    let b = balloon(&c);
    assert_eq!(b["deflated_bytes"], 96 * MIB, "{b}");
    assert_eq!(b["invalid_pages"], 0, "{b}");
}

#[test]
fn a_balloon_takes_private_memory_back_and_gives_it_again_over_pci() {
    if !require_kvm("a_balloon_takes_private_memory_back_and_gives_it_again_over_pci") {
        return;
    }
    takes_memory_back_and_gives_it_again("balloon-private", &[]);
}

#[test]
fn a_balloon_takes_shared_memory_back_and_gives_it_again_over_mmio() {
    if !require_kvm("a_balloon_takes_shared_memory_back_and_gives_it_again_over_mmio") {
        return;
    }
    takes_memory_back_and_gives_it_again(
        "balloon-shared",
        &["--memory-shared", "--transport", "mmio"],
    );
}

/// A ballooned VM snapshotted and restored (lazily: its memory is the snapshot file, mapped
/// copy-on-write) keeps its balloon; inflating further frees that mapping's pages, and what
/// the guest takes back reads as zeroes, not the file's contents.
#[test]
fn a_ballooned_vm_keeps_its_balloon_across_a_snapshot_and_frees_restored_memory() {
    if !require_kvm("a_ballooned_vm_keeps_its_balloon_across_a_snapshot_and_frees_restored_memory")
    {
        return;
    }
    let dir = Scratch::new("balloon-snap");
    let (t, c, serial) = guest(&dir, &["--balloon", ""], false);
    assert_eq!(set(&c, "64M").0, 204);
    wait_said(&serial, "held=16384 zero=ok", 20);
    wait_until("the balloon's actual size", Duration::from_secs(5), || {
        balloon(&c)["actual_bytes"] == 64 * MIB
    });
    let snap = dir.path("snap");
    pause_and_snapshot(&c, &snap);
    drop(t);

    let serial2 = dir.path("serial2.log");
    let (_r, c) = restored(&snap, &dir.path("api2.sock"), &serial2);
    let b = balloon(&c);
    assert_eq!(
        (b["target_bytes"].as_u64(), b["actual_bytes"].as_u64()),
        (Some(64 * MIB), Some(64 * MIB)),
        "{b}"
    );
    assert_eq!(
        c.info().unwrap().config.unwrap().balloon,
        Some(Default::default())
    );
    // Further, from the file-mapped memory, then all back: zeroes each time.
    assert_eq!(set(&c, "96M").0, 204);
    wait_said(&serial2, "held=24576 zero=ok", 20);
    assert_eq!(set(&c, "0").0, 204);
    wait_said(&serial2, "held=0 zero=ok", 20);
    assert!(!said(&serial2).iter().any(|l| l.contains("zero=bad")));
}

/// A VM without a balloon says so; before boot the balloon is not there to use.
#[test]
fn balloon_requests_without_a_balloon_are_refused_by_name() {
    if !require_kvm("balloon_requests_without_a_balloon_are_refused_by_name") {
        return;
    }
    let dir = Scratch::new("balloon-none");
    let sock = dir.path("api.sock");
    let (_t, c) = counting_vm(&sock);
    let kernel = probe();
    let (st, e) = c.call("GET", "/v1/vm/balloon", None).unwrap();
    assert_eq!(st, 400);
    assert!(
        e.contains("the VM has no balloon (start it with --balloon"),
        "{e}"
    );
    let r = run_with_timeout(
        &tern(),
        &["balloon", "--api-socket", s(&sock), "--size", "8M"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("the VM has no balloon"), "{}", r.stderr);
    // A bad --balloon setting is one line naming it.
    let r = tern_run(
        &["--kernel", s(&kernel), "--balloon", "stats_s=often"],
        Duration::from_secs(10),
    );
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr.contains("invalid balloon stats_s 'often'"),
        "{}",
        r.stderr
    );
}

/// A ballooned VM migrates with its balloon: the destination knows its size, the guest goes on
/// taking pages back there (as zeroes), and setting the size while the migration runs is a
/// 409 (the migration is cancelled and done again at full speed).
#[test]
fn a_ballooned_vm_migrates_with_its_balloon() {
    if !require_kvm("a_ballooned_vm_migrates_with_its_balloon") {
        return;
    }
    let dir = Scratch::new("balloon-mig");
    let (t, c, serial) = guest(&dir, &["--balloon", ""], false);
    assert_eq!(set(&c, "64M").0, 204);
    wait_said(&serial, "held=16384 zero=ok", 20);
    wait_until("the balloon's actual size", Duration::from_secs(5), || {
        balloon(&c)["actual_bytes"] == 64 * MIB
    });
    let m = dir.path("m.sock");
    let url = format!("unix:{}", s(&m));
    let (dsock, serial2) = (dir.path("dst.sock"), dir.path("serial2.log"));
    let backend = format!("file:{}", s(&serial2));
    let kernel = probe();
    let destination = || {
        listening(
            &url,
            &[
                "--serial",
                &backend,
                "--api-socket",
                s(&dsock),
                "--accept-dir",
                s(kernel.parent().unwrap()),
                "--accept-dir",
                s(&dir.0),
            ],
        )
    };
    let dst = destination();
    // Slowly first: the balloon cannot change meanwhile.
    let slow = format!(r#"{{"url":"{url}","max_bandwidth":4194304}}"#);
    let (st, b) = c.call("PUT", "/v1/vm/migrate/send", Some(&slow)).unwrap();
    assert_eq!(st, 202, "{b}");
    let (st, b) = set(&c, "32M");
    assert_eq!(st, 409, "{b}");
    assert!(b.contains("a migration is in progress"), "{b}");
    assert_eq!(c.call("DELETE", "/v1/vm/migrate", None).unwrap().0, 202);
    let mut dst = dst;
    let (code, _) = {
        wait_until("the cancel", Duration::from_secs(10), || !dst.running());
        dst.finish(Duration::from_secs(5))
    };
    assert_eq!(code, Some(1));
    // Again, at full speed, to a new destination.
    let dst = destination();
    let r = run_with_timeout(
        &tern(),
        &[
            "migrate",
            "--api-socket",
            s(&dir.path("api.sock")),
            "--to",
            &url,
        ],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let (code, err) = t.finish(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{err}");
    let dc = Client::new(&dsock);
    let b = balloon(&dc);
    assert_eq!(
        (b["target_bytes"].as_u64(), b["actual_bytes"].as_u64()),
        (Some(64 * MIB), Some(64 * MIB)),
        "{b}"
    );
    assert_eq!(set(&dc, "0").0, 204);
    wait_said(&serial2, "held=0 zero=ok", 20);
    drop(dst);
}

/// `--balloon size=`: the VM starts with its balloon at that size (the guest's driver inflates
/// it as it comes up); a size past the guest's memory is one line naming it.
#[test]
fn a_balloon_given_a_size_starts_inflated() {
    if !require_kvm("a_balloon_given_a_size_starts_inflated") {
        return;
    }
    let dir = Scratch::new("balloon-size");
    let (t, c, _serial) = guest(&dir, &["--balloon", "size=64M"], false);
    wait_until("a 64 MiB balloon", Duration::from_secs(20), || {
        balloon(&c)["actual_bytes"] == 64u64 << 20
    });
    let b = balloon(&c);
    assert_eq!(b["target_bytes"], 64u64 << 20, "{b}");
    assert_eq!(b["config"]["size"], "64M", "{b}");
    drop(t);
    let kernel = probe();
    let r = tern_run(
        &[
            "--kernel",
            s(&kernel),
            "--memory",
            "128M",
            "--balloon",
            "size=1G",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("balloon size") && r.stderr.contains("must leave the guest some"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
}
