//! Memory hotplug (virtio-mem) on the host's `/dev/kvm`, driven by the probe's own virtio-mem
//! driver (`probe.run=vmem`, which plugs and unplugs blocks to follow the requested size):
//! `tern resize --memory` within and beyond `--max-memory`, what `tern info` reports, plugged
//! memory reading as zeroes and unplugged memory leaving tern's resident memory, and the sizes
//! and the plugged memory's contents across a snapshot and a restore. The nested rig's
//! `tern-mem-hotplug` has Linux's own driver do the same.

mod common;

use std::path::Path;
use std::time::Duration;

use api::client::Client;
use common::*;

const MIB: u64 = 1 << 20;

fn resize(c: &Client, body: &str) -> (u16, String) {
    c.call("PUT", "/v1/vm/resize", Some(body)).unwrap()
}

/// Waits until the probe says it holds `bytes` plugged, with zeroes where it plugged and its
/// pattern kept where it unplugged.
fn wait_plugged(serial: &Path, bytes: u64) {
    let want = format!("plugged={bytes} zero=ok kept=ok");
    wait_until(&want, Duration::from_secs(30), || {
        let said = lines_after(serial, "probe: vmem ");
        assert!(
            !said.iter().any(|l| l.contains("=bad")),
            "the probe found plugged memory wrong: {said:?}"
        );
        said.last().is_some_and(|l| *l == want)
    });
}

/// (now, asked for, most) bytes of memory, as `GET /v1/vm` reports them.
fn sizes(c: &Client) -> (u64, u64, u64) {
    let i = c.info().unwrap();
    (
        i.memory_bytes.unwrap(),
        i.memory_requested_bytes.unwrap(),
        i.memory_max_bytes.unwrap(),
    )
}

/// A 64 MiB probe guest with 256 MiB of hotpluggable memory, its driver following the
/// requested size for two minutes, its API on `dir`/api.sock; returns it once the driver
/// started, with a client and its serial log.
fn guest(dir: &Scratch, extra: &[&str]) -> (Tern, Client, std::path::PathBuf) {
    let (sock, serial) = (dir.path("api.sock"), dir.path("serial.log"));
    let kernel = probe();
    let backend = format!("file:{}", s(&serial));
    let mut args = vec![
        "--kernel",
        s(&kernel),
        "--memory",
        "64M",
        "--max-memory",
        "320M",
        "--serial",
        &backend,
        "--api-socket",
        s(&sock),
        "--cmdline",
        "probe.run=vmem probe.vmem_ms=120000",
    ];
    args.extend_from_slice(extra);
    let t = spawn(&args);
    wait_until("the probe's driver", Duration::from_secs(20), || {
        lines_after(&serial, "probe: vmem ")
            .iter()
            .any(|l| l.starts_with("ready "))
    });
    (t, Client::new(&sock), serial)
}

#[test]
fn memory_is_plugged_up_to_the_maximum_given_back_when_unplugged_and_kept_across_a_restore() {
    if !require_kvm(
        "memory_is_plugged_up_to_the_maximum_given_back_when_unplugged_and_kept_across_a_restore",
    ) {
        return;
    }
    plug_unplug_restore("memhp", &[]);
}

/// The same with guest memory in a shared memory file (`--memory-shared`), where unplugged
/// memory is punched out of the file.
#[test]
fn shared_memory_is_plugged_and_given_back_too() {
    if !require_kvm("shared_memory_is_plugged_and_given_back_too") {
        return;
    }
    plug_unplug_restore("memhp-shared", &["--memory-shared"]);
}

fn plug_unplug_restore(name: &str, extra: &[&str]) {
    let dir = Scratch::new(name);
    let sock = dir.path("api.sock");
    let (t, c, serial) = guest(&dir, extra);
    assert_eq!(sizes(&c), (64 * MIB, 64 * MIB, 320 * MIB));
    // Bad sizes change nothing, each refused with its reason.
    for (body, why) in [
        (
            r#"{"memory":"400M"}"#,
            "must be between the VM's memory (64 MiB) and its max_memory (320 MiB)",
        ),
        (
            r#"{"memory":"32M"}"#,
            "must be between the VM's memory (64 MiB)",
        ),
        (
            r#"{"memory":"65M"}"#,
            "multiple of the block size, 2048 KiB",
        ),
        (r#"{"memory":"lots"}"#, "memory"),
        (r#"{"memory":"1G","cpus":2}"#, "no CPU hotplug"),
    ] {
        let (st, e) = resize(&c, body);
        assert_eq!(st, 400, "{body}: {e}");
        assert!(e.contains(why), "{body}: {e}");
    }
    assert_eq!(sizes(&c), (64 * MIB, 64 * MIB, 320 * MIB));
    let before = t.rss();
    // All of it, through the CLI: the probe plugs 256 MiB and fills it.
    let r = run_with_timeout(
        &tern(),
        &["resize", "--api-socket", s(&sock), "--memory", "320M"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("320 MiB of memory"), "{}", r.stdout);
    wait_plugged(&serial, 256 * MIB);
    assert_eq!(sizes(&c), (320 * MIB, 320 * MIB, 320 * MIB));
    let full = t.rss();
    assert!(full > before + 240 * MIB, "RSS {before} -> {full}");
    let shown = tern_info(&sock);
    assert!(shown.contains("memory: 320 MiB\n"), "{shown}");
    // Back to the boot memory: the unplugged blocks leave tern.
    assert_eq!(resize(&c, r#"{"memory":"64M"}"#).0, 204);
    wait_plugged(&serial, 0);
    let back = t.rss();
    assert!(back + 240 * MIB < full, "RSS {full} -> {back}");
    let shown = tern_info(&sock);
    assert!(
        shown.contains("memory: 64 MiB (asked for 64 MiB, at most 320 MiB)"),
        "{shown}"
    );
    // Plugged again: zeroes, not what the guest wrote there before.
    assert_eq!(resize(&c, r#"{"memory":"192M"}"#).0, 204);
    wait_plugged(&serial, 128 * MIB);
    // Across a snapshot and a restore: the sizes, and what the guest wrote in plugged memory
    // (the probe checks its pattern when it unplugs).
    let snap = dir.path("snap");
    pause_and_snapshot(&c, &snap);
    drop(t);
    let serial2 = dir.path("serial2.log");
    let (r, c2) = restored(&snap, &dir.path("api2.sock"), &serial2);
    assert_eq!(sizes(&c2), (192 * MIB, 192 * MIB, 320 * MIB));
    assert_eq!(resize(&c2, r#"{"memory":"128M"}"#).0, 204);
    wait_plugged(&serial2, 64 * MIB);
    assert_eq!(resize(&c2, r#"{"memory":"320M"}"#).0, 204);
    wait_plugged(&serial2, 256 * MIB);
    assert_eq!(sizes(&c2), (320 * MIB, 320 * MIB, 320 * MIB));
    drop(r);
}

/// A VM started without --max-memory has no memory hotplug and says how to get it; a bad
/// --max-memory is one line naming it.
#[test]
fn memory_resize_without_max_memory_and_bad_maximums_are_refused_by_name() {
    if !require_kvm("memory_resize_without_max_memory_and_bad_maximums_are_refused_by_name") {
        return;
    }
    let dir = Scratch::new("memhp-none");
    let sock = dir.path("api.sock");
    let (_t, c) = counting_vm(&sock);
    let (st, e) = resize(&c, r#"{"memory":"128M"}"#);
    assert_eq!(st, 400);
    assert!(e.contains("start it with --max-memory SIZE"), "{e}");
    assert_eq!(sizes(&c), (64 * MIB, 64 * MIB, 64 * MIB));
    let kernel = probe();
    for (max, why) in [
        (
            "32M",
            "invalid max_memory '32M': must be at least memory (64M)",
        ),
        (
            "100M",
            "invalid max_memory '100M': must exceed memory (64M) by a multiple of 128M",
        ),
        ("2T", "invalid max_memory '2048G': must be at most 1T"),
    ] {
        let r = tern_run(
            &[
                "--kernel",
                s(&kernel),
                "--memory",
                "64M",
                "--max-memory",
                max,
            ],
            Duration::from_secs(10),
        );
        assert_ne!(r.code, Some(0));
        assert!(r.stderr.contains(why), "{max}: {}", r.stderr);
    }
}

/// A VM with plugged memory migrates with it: a resize while the migration runs is a 409, and
/// on the destination the sizes are the same and what the guest wrote in plugged memory is
/// still there (the probe checks its pattern when it unplugs).
#[test]
fn a_vm_with_hotplugged_memory_migrates_with_it() {
    if !require_kvm("a_vm_with_hotplugged_memory_migrates_with_it") {
        return;
    }
    let dir = Scratch::new("memhp-mig");
    let (t, c, _serial) = guest(&dir, &[]);
    assert_eq!(resize(&c, r#"{"memory":"192M"}"#).0, 204);
    wait_plugged(&dir.path("serial.log"), 128 * MIB);
    let m = dir.path("m.sock");
    let url = format!("unix:{}", s(&m));
    let (dsock, serial2) = (dir.path("dst.sock"), dir.path("serial2.log"));
    let backend = format!("file:{}", s(&serial2));
    let kernel = probe();
    let dst = listening(
        &url,
        &[
            "--serial",
            &backend,
            "--api-socket",
            s(&dsock),
            "--accept-dir",
            s(kernel.parent().unwrap()),
        ],
    );
    // At 32 MiB/s (128 MiB of plugged data to send): a resize cannot come in meanwhile.
    let slow = format!(r#"{{"url":"{url}","max_bandwidth":33554432}}"#);
    let (st, b) = c.call("PUT", "/v1/vm/migrate/send", Some(&slow)).unwrap();
    assert_eq!(st, 202, "{b}");
    let (st, b) = resize(&c, r#"{"memory":"64M"}"#);
    assert_eq!(st, 409, "{b}");
    assert!(b.contains("a migration is in progress"), "{b}");
    let (code, err) = t.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}");
    let dc = Client::new(&dsock);
    assert_eq!(sizes(&dc), (192 * MIB, 192 * MIB, 320 * MIB));
    assert_eq!(resize(&dc, r#"{"memory":"64M"}"#).0, 204);
    wait_plugged(&serial2, 0);
    assert_eq!(sizes(&dc).0, 64 * MIB);
    drop(dst);
}
