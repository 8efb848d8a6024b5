//! tern's sandbox seen from the outside: a running tern (probe guest with a disk and an entropy
//! device, both started by the guest's drivers, and the API) has a seccomp filter and
//! `no_new_privs` on every one of its threads, each thread named after its work;
//! `--seccomp off` leaves them off, and a wrong mode is a one-line error.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// Kills the child when dropped.
struct Killed(Child);

/// Starts `tern run ARGS` in the background, its output discarded.
fn start(args: &[&str]) -> Killed {
    Killed(
        Command::new(tern())
            .arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start tern"),
    )
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (`comm`, `Seccomp`, `NoNewPrivs`) of every thread of `pid` (one that ends meanwhile is
/// left out).
fn filters(pid: u32) -> Vec<(String, String, String)> {
    threads(pid)
        .into_iter()
        .filter_map(|(tid, comm)| {
            let status = format!("/proc/{pid}/task/{tid}/status");
            let seccomp = status_field(&status, "Seccomp")?;
            Some((comm, seccomp, status_field(&status, "NoNewPrivs")?))
        })
        .collect()
}

#[test]
fn every_thread_of_a_running_tern_is_filtered() {
    if !require_kvm("every_thread_of_a_running_tern_is_filtered") {
        return;
    }
    let dir = Scratch::new("sandbox-threads");
    let (serial, console, disk, sock) = (
        dir.path("serial.txt"),
        dir.path("console.txt"),
        dir.path("disk.raw"),
        dir.path("api.sock"),
    );
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let probe = probe();
    let child = start(&[
        "--kernel",
        s(&probe),
        "--memory",
        "64M",
        "--rng",
        "--cmdline",
        "probe.run=vrng,vblkbench,count probe.vrng_bytes=1048576 probe.vblk_ms=1500 \
             probe.count_ms=30000",
        "--console",
        &format!("file:{}", s(&console)),
        "--serial",
        &format!("file:{}", s(&serial)),
        "--disk",
        &format!("path={}", s(&disk)),
        "--api-socket",
        s(&sock),
    ]);
    // Device workers live while the guest's driver uses the device: look at the threads
    // again and again until the counter (after the device scenarios) starts.
    // The filters are on before the API is served (its socket is made a little earlier).
    wait_until("the API", Duration::from_secs(60), || api_ready(&sock));
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    wait_until("the guest's first tick", Duration::from_secs(60), || {
        for (comm, seccomp, nnp) in filters(child.0.id()) {
            assert_eq!(seccomp, "2", "thread {comm} has no seccomp filter");
            assert_eq!(nnp, "1", "thread {comm} lacks no_new_privs");
            *by_name.entry(comm).or_default() += 1;
        }
        !ticks(&serial).is_empty()
    });
    let threads = by_name.keys().collect::<Vec<_>>();
    for name in [
        "tern",
        "tern-spawner",
        "tern-api",
        "tern-vcpu0",
        "virtio-rng",
        "virtio-blk-q0",
    ] {
        assert!(by_name.contains_key(name), "no thread {name}: {threads:?}");
    }
}

#[test]
fn seccomp_off_leaves_threads_unfiltered_and_a_wrong_mode_is_refused() {
    let dir = Scratch::new("sandbox-off");
    let sock = dir.path("api.sock");
    let child = start(&["--seccomp", "off", "--api-socket", s(&sock)]);
    wait_until("the API", Duration::from_secs(60), || api_ready(&sock));
    for (comm, seccomp, _) in filters(child.0.id()) {
        assert_eq!(seccomp, "0", "thread {comm} is filtered with --seccomp off");
    }

    let r = tern_run(&["--seccomp", "strict"], Duration::from_secs(10));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("seccomp mode \"strict\": expected on, log or off"),
        "{}",
        r.stderr
    );
}

/// `GET /ping` answers (the API is being served).
fn api_ready(sock: &std::path::Path) -> bool {
    matches!(api::client::call(sock, "GET", "/ping", None), Ok((200, _)))
}

#[test]
fn landlock_refuses_a_snapshot_outside_the_allowed_directories_and_takes_one_inside() {
    if !require_kvm("landlock_refuses_a_snapshot_outside_the_allowed_directories") {
        return;
    }
    let dir = Scratch::new("landlock-snapshot");
    let allowed = dir.path("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let (serial, disk, sock) = (
        dir.path("serial.txt"),
        dir.path("disk.raw"),
        dir.path("api.sock"),
    );
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let probe = probe();
    let child = start(&[
        "--landlock",
        "--allow-path",
        s(&allowed),
        "--kernel",
        s(&probe),
        "--memory",
        "64M",
        "--cmdline",
        "probe.run=vblk,count probe.count_ms=30000",
        "--serial",
        &format!("file:{}", s(&serial)),
        "--disk",
        &format!("path={}", s(&disk)),
        "--api-socket",
        s(&sock),
    ]);
    wait_until("the API", Duration::from_secs(60), || api_ready(&sock));
    // The disk named in the configuration works under the sandbox.
    wait_until("the guest's first tick", Duration::from_secs(60), || {
        !ticks(&serial).is_empty()
    });
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.contains("probe: vblk ok"), "{text}");

    let client = |args: &[&str]| run_with_timeout(&tern(), args, Duration::from_secs(30));
    let r = client(&["pause", "--api-socket", s(&sock)]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let outside = dir.path("outside-snap");
    let r = client(&[
        "snapshot",
        "create",
        "--api-socket",
        s(&sock),
        "--dir",
        s(&outside),
    ]);
    assert_ne!(r.code, Some(0), "{}", r.stdout);
    assert!(
        r.stderr.contains(&format!(
            "{} is outside tern's sandbox (--landlock)",
            s(&outside)
        )),
        "{}",
        r.stderr
    );
    assert!(!outside.exists());
    let inside = allowed.join("snap");
    let r = client(&[
        "snapshot",
        "create",
        "--api-socket",
        s(&sock),
        "--dir",
        s(&inside),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(inside.join("state.json").exists());

    // The snapshot restores under the sandbox too (its directory, the disk and the serial file
    // it names are reached; lazily restored memory is mapped from the snapshot's file).
    drop(child);
    let before = ticks(&serial).len();
    let _restored = start(&[
        "--landlock",
        "--restore",
        s(&inside),
        "--serial",
        &format!("file:{}", s(&serial)),
    ]);
    wait_until("ticks after the restore", Duration::from_secs(60), || {
        ticks(&serial).len() >= before + 2
    });
}

#[test]
fn landlock_refuses_an_api_configured_path_outside_the_sandbox() {
    if !require_kvm("landlock_refuses_an_api_configured_path_outside_the_sandbox") {
        return;
    }
    let dir = Scratch::new("landlock-api");
    let allowed = dir.path("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let sock = dir.path("api.sock");
    let probe = probe();
    let probe_dir = probe.parent().unwrap().to_path_buf();
    let mut child = start(&[
        "--landlock",
        "--api-socket",
        s(&sock),
        "--allow-path",
        s(&allowed),
        "--allow-path",
        &format!("{}:ro", s(&probe_dir)),
    ]);
    wait_until("the API", Duration::from_secs(60), || api_ready(&sock));
    let config = |serial: &std::path::Path| {
        format!(
            r#"{{"kernel": "{}", "cmdline": "probe.run=hello", "memory": 64, "serial": "file:{}"}}"#,
            s(&probe),
            s(serial)
        )
    };
    let call = |method: &str, path: &str, body: Option<&str>| {
        api::client::call(&sock, method, path, body).unwrap()
    };
    let outside = dir.path("serial.txt");
    assert_eq!(call("PUT", "/v1/vm", Some(&config(&outside))).0, 204);
    let (st, body) = call("PUT", "/v1/vm/boot", None);
    assert_eq!(st, 400, "{body}");
    assert!(
        body.contains(&format!("{} is outside tern's sandbox", s(&outside))),
        "{body}"
    );
    assert!(!outside.exists());
    let inside = allowed.join("serial.txt");
    assert_eq!(call("PUT", "/v1/vm", Some(&config(&inside))).0, 204);
    let (st, body) = call("PUT", "/v1/vm/boot", None);
    assert_eq!(st, 204, "{body}");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&inside).unwrap();
    assert!(text.contains("probe: hello ok"), "{text}");
}
