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

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `comm` → (`Seccomp`, `NoNewPrivs`) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = e.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            comm.trim().to_string(),
            field("Seccomp:"),
            field("NoNewPrivs:"),
        ));
    }
    out
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
    let child = Command::new(tern())
        .args(["run", "--kernel", s(&probe), "--memory", "64M", "--rng"])
        .args([
            "--cmdline",
            "probe.run=vrng,vblkbench,count probe.vrng_bytes=1048576 probe.vblk_ms=1500 \
             probe.count_ms=30000",
        ])
        .args(["--console", &format!("file:{}", s(&console))])
        .args(["--serial", &format!("file:{}", s(&serial))])
        .args(["--disk", &format!("path={}", s(&disk))])
        .args(["--api-socket", s(&sock)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Killed(child);
    // Device workers live while the guest's driver uses the device: look at the threads
    // again and again until the counter (after the device scenarios) starts.
    // The filters are on before the API socket appears.
    wait_until("the API socket", Duration::from_secs(10), || sock.exists());
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    wait_until("the guest's first tick", Duration::from_secs(60), || {
        for (comm, seccomp, nnp) in threads(child.0.id()) {
            if comm.is_empty() {
                continue; // gone between listing and reading
            }
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
    let child = Command::new(tern())
        .args(["run", "--seccomp", "off", "--api-socket", s(&sock)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Killed(child);
    wait_until("the API socket", Duration::from_secs(10), || sock.exists());
    for (comm, seccomp, _) in threads(child.0.id()) {
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
