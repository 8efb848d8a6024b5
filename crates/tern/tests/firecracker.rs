//! tern's Firecracker personality driven by a third-party client: pyrecracker (PyPI; `cargo
//! xtask test` installs it in a venv and names its Python in `TERN_PYRECRACKER_PYTHON`)
//! configures, boots, pauses, resumes, snapshots and loads a probe guest through `tern
//! firecracker` (and tern's own client swaps the file behind the running root drive, as Kata
//! does), and tern started through a link named `firecracker` boots a Firecracker
//! `--config-file` with its log and metrics going to FIFOs.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// The venv's Python with pyrecracker, or None (a loud skip; a failure under CI=true).
fn pyrecracker(test: &str) -> Option<PathBuf> {
    let python = std::env::var_os("TERN_PYRECRACKER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/venv-pyrecracker/bin/python")
        });
    let ok = Command::new(&python)
        .args(["-c", "import pyrecracker.client"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    assert!(
        !in_ci(),
        "{test}: pyrecracker is required under CI=true (cargo xtask test installs it)"
    );
    eprintln!(
        "\n*** SKIPPED {test}: pyrecracker is not installed (cargo xtask test installs it) ***\n"
    );
    None
}

/// What the client script does: `STEP SOCKET ARGS…` with pyrecracker's FirecrackerClient.
const CLIENT: &str = r#"
import sys
from requests.exceptions import HTTPError
from pyrecracker.client import FirecrackerClient
from pyrecracker.client_types import (ActionType, BootSource, Drive, InstanceActionInfo,
    MachineConfiguration, NetworkInterface, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType, VM, VMState)

step, sock, args = sys.argv[1], sys.argv[2], sys.argv[3:]
c = FirecrackerClient(sock)
if step == "boot":
    kernel, disk, tap = args
    c.put_machine_config(MachineConfiguration(mem_size_mib=64, vcpu_count=2))
    c.put_boot_source(BootSource(kernel_image_path=kernel,
        boot_args="console=ttyS0 probe.run=count probe.count_ms=60000 probe.count_blk=1"))
    c.put_drives(Drive(drive_id="rootfs", is_root_device=True, path_on_host=disk))
    c.put_network_interfaces(NetworkInterface(host_dev_name=tap, iface_id="eth0",
        guest_mac="06:00:ac:10:00:02"))
    c.put_actions(InstanceActionInfo(action_type=ActionType.INSTANCE_START))
elif step == "pause":
    c.patch_vm(VM(state=VMState.PAUSED))
elif step == "resume":
    c.patch_vm(VM(state=VMState.RESUMED))
elif step == "snapshot":
    c.put_snapshot_create(SnapshotCreateParams(snapshot_path=args[0], mem_file_path=args[1],
        snapshot_type=SnapshotType.FULL))
elif step == "load":
    c.put_snapshot_load(SnapshotLoadParams(snapshot_path=args[0], mem_file_path=args[1],
        resume_vm=True))
elif step == "refused":
    try:
        c.put_machine_config(MachineConfiguration(mem_size_mib=128, vcpu_count=1))
    except HTTPError as e:
        print(e.response.status_code, e.response.json()["fault_message"])
        sys.exit(0)
    sys.exit("a machine-config after InstanceStart was accepted")
print("ok")
"#;

fn client(python: &Path, step: &str, sock: &Path, args: &[&str]) -> String {
    let out = Command::new(python)
        .args(["-c", CLIENT, step, s(sock)])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pyrecracker {step}: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `tern firecracker --api-sock SOCK` with the guest's console (its standard output) in
/// `console`.
fn firecracker(sock: &Path, console: &Path, id: &str) -> Child {
    Command::new(tern())
        .args(["firecracker", "--api-sock", s(sock), "--id", id])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(console).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn last_tick(console: &Path) -> u64 {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("probe: count tick="))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// A TAP made for the test, removed when dropped.
struct Tap(String);

impl Tap {
    fn new(name: &str) -> Tap {
        let _ = Command::new("ip")
            .args(["link", "del", name])
            .stderr(Stdio::null())
            .status();
        let st = Command::new("ip")
            .args(["tuntap", "add", "dev", name, "mode", "tap"])
            .status()
            .unwrap();
        assert!(st.success(), "ip tuntap add {name}");
        Tap(name.into())
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

fn kill(mut c: Child) -> String {
    let _ = c.kill();
    let _ = c.wait();
    let mut err = String::new();
    if let Some(mut e) = c.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}

/// Firecracker's semantics a running instance must show: its vCPU thread is named
/// `fc_vcpu 0` (Kata finds vCPU threads by that name), and SIGTERM stops it at once instead of
/// pressing the guest's power button (which the probe guest would ignore for 20 s).
fn sigterm_stops_at_once(mut c: Child) -> String {
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", c.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim_end().to_string())
        .collect();
    assert!(names.iter().any(|n| n == "fc_vcpu 0"), "threads: {names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("tern-vcpu")),
        "{names:?}"
    );
    // SAFETY: kill(2) on the child's pid, which has not been waited for.
    assert_eq!(unsafe { libc::kill(c.id() as i32, libc::SIGTERM) }, 0);
    let sent = std::time::Instant::now();
    let status = loop {
        if let Some(st) = c.try_wait().unwrap() {
            break st;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "still running 3 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = c.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(!err.contains("power button"), "{err}");
    assert!(err.contains("signal 15"), "{status:?}: {err}");
    err
}

#[test]
fn pyrecracker_drives_the_firecracker_api() {
    let test = "pyrecracker_drives_the_firecracker_api";
    if !require_kvm(test) || !require_netns(test) {
        return;
    }
    let Some(python) = pyrecracker(test) else {
        return;
    };
    let dir = Scratch::new("pyrecracker");
    let tap = Tap::new(&format!("tfc{}", std::process::id() % 100000));
    let disk = dir.path("rootfs.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path("fc.sock");
    let console = dir.path("console.txt");
    let fc = firecracker(&sock, &console, "vm-a");
    wait_until("the API socket", Duration::from_secs(10), || sock.exists());
    let kernel = probe();
    // Metrics to a file (pyrecracker has no call for it: tern's own client sends it).
    let metrics = dir.path("metrics.json");
    let api = api::client::Client::new(&sock);
    let body = format!(r#"{{"metrics_path": "{}"}}"#, s(&metrics));
    let (st, b) = api.call("PUT", "/metrics", Some(&body)).unwrap();
    assert_eq!(st, 204, "{b}");
    client(&python, "boot", &sock, &[s(&kernel), s(&disk), &tap.0]);
    let info = api.info().unwrap();
    let c = info.config.unwrap();
    assert_eq!(info.vcpus, Some(2));
    assert_eq!(c.transport, api::config::Transport::Mmio);
    assert!(
        c.cmdline.as_deref().unwrap().ends_with(" root=/dev/vda rw"),
        "{:?}",
        c.cmdline
    );
    assert_eq!(c.disks[0].id.as_deref(), Some("rootfs"));
    assert_eq!(c.nets[0].tap, tap.0);
    wait_until("ticks", Duration::from_secs(20), || {
        last_tick(&console) >= 3
    });
    // The file behind the running root drive changes, as Kata swaps its placeholder drives:
    // the probe's writes go into the new one.
    let swapped = dir.path("rootfs2.img");
    std::fs::write(&swapped, vec![0u8; 1 << 20]).unwrap();
    let body = serde_json::json!({ "drive_id": "rootfs", "path_on_host": swapped });
    let (st, b) = api
        .call("PATCH", "/drives/rootfs", Some(&body.to_string()))
        .unwrap();
    assert_eq!(st, 204, "{b}");
    wait_until("writes in the new file", Duration::from_secs(10), || {
        std::fs::read(&swapped).unwrap()[..64 * 512]
            .iter()
            .any(|&b| b != 0)
    });
    let (_, b) = api.call("GET", "/vm/config", None).unwrap();
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["drives"][0]["path_on_host"], s(&swapped), "{v}");

    // Each FlushMetrics line holds what changed since the one before.
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    for _ in 0..2 {
        let (st, b) = api.call("PUT", "/actions", Some(flush)).unwrap();
        assert_eq!(st, 204, "{b}");
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let io = |l: &serde_json::Value| l["vcpu"]["exit_io"].as_u64().unwrap();
    assert!(
        io(&lines[0]) > 100 && io(&lines[1]) < io(&lines[0]),
        "{lines:?}"
    );
    assert!(lines[0]["block_rootfs"].is_object() && lines[0]["net_eth0"].is_object());
    assert!(lines[1]["utc_timestamp_ms"].as_u64().unwrap() > 1_700_000_000_000);
    let refused = client(&python, "refused", &sock, &[]);
    assert!(
        refused.starts_with("400 ") && refused.contains("after starting the microVM"),
        "{refused}"
    );

    client(&python, "pause", &sock, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let paused_at = last_tick(&console);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(last_tick(&console), paused_at, "ticks while paused");
    let snap = dir.path("snap");
    let mem = dir.path("mem.file");
    client(&python, "snapshot", &sock, &[s(&snap), s(&mem)]);
    assert!(snap.join("state.json").exists() && mem.exists());
    client(&python, "resume", &sock, &[]);
    wait_until("ticks after resume", Duration::from_secs(10), || {
        last_tick(&console) > paused_at + 1
    });
    let err = kill(fc);

    // A new instance loads the snapshot and runs on from where it was taken.
    let sock2 = dir.path("fc2.sock");
    let console2 = dir.path("console2.txt");
    let fc2 = firecracker(&sock2, &console2, "vm-b");
    wait_until("the second API socket", Duration::from_secs(10), || {
        sock2.exists()
    });
    client(&python, "load", &sock2, &[s(&snap), s(&mem)]);
    wait_until("ticks after the load", Duration::from_secs(20), || {
        last_tick(&console2) > paused_at + 1
    });
    let first = std::fs::read_to_string(&console2)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("probe: count tick="))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap();
    assert_eq!(
        first,
        paused_at + 1,
        "the loaded guest did not go on from the snapshot"
    );
    let err2 = sigterm_stops_at_once(fc2);
    assert!(
        !err.contains("panicked") && !err2.contains("panicked"),
        "{err}{err2}"
    );
}

#[test]
fn a_firecracker_link_boots_a_config_file_with_fifos() {
    let test = "a_firecracker_link_boots_a_config_file_with_fifos";
    if !require_kvm(test) {
        return;
    }
    let dir = Scratch::new("fc-config");
    let link = dir.path("firecracker");
    std::os::unix::fs::symlink(tern(), &link).unwrap();
    let out = Command::new(&link).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && v.starts_with("Firecracker v1.") && v.contains("tern"),
        "{v}"
    );

    // The log and metrics FIFOs, read as Kata reads them.
    let (log, metrics) = (dir.path("log.fifo"), dir.path("metrics.fifo"));
    for f in [&log, &metrics] {
        let c = std::ffi::CString::new(s(f)).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
    // Read until tern, the only writer, has closed them.
    let reader = |p: PathBuf| {
        std::thread::spawn(move || {
            let f = std::fs::File::open(p).unwrap();
            BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        })
    };
    let (log_lines, metric_lines) = (reader(log.clone()), reader(metrics.clone()));
    // Placeholder drives, as Kata gives them: empty files whose real images come later.
    let placeholder = dir.path("drive_0");
    std::fs::write(&placeholder, b"").unwrap();
    let config = dir.path("vm.json");
    let kernel = probe();
    // Kata's vsock to its agent, with the deprecated vsock_id it still sends.
    let hvsock = dir.path("kata.hvsock");
    std::fs::write(
        &config,
        serde_json::json!({
            "boot-source": {
                "kernel_image_path": kernel,
                "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=vrng,count probe.count_ms=300"
            },
            "entropy": {},
            "drives": [{"drive_id": "drive_0", "path_on_host": placeholder,
                        "is_root_device": false, "is_read_only": false}],
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "smt": false},
            "logger": {"log_path": log, "level": "info", "show_level": true,
                       "show_log_origin": true},
            "metrics": {"metrics_path": metrics},
            "vsock": {"vsock_id": "root", "guest_cid": 3, "uds_path": hvsock}
        })
        .to_string(),
    )
    .unwrap();
    let sock = dir.path("fc.sock");
    let mut out = Command::new(&link)
        .args([
            "--api-sock",
            s(&sock),
            "--config-file",
            s(&config),
            "--id",
            "kata",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The vsock's socket is there while the VM runs (made before the guest starts).
    let mut vsock_seen = false;
    while out.try_wait().unwrap().is_none() {
        vsock_seen |= hvsock.exists();
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = out.wait_with_output().unwrap();
    assert!(
        vsock_seen,
        "no vsock socket {} while the VM ran",
        hvsock.display()
    );
    assert!(!hvsock.exists(), "the vsock socket outlived tern");
    let console = String::from_utf8_lossy(&out.stdout);
    let log_lines = log_lines.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{console}{}{log_lines:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(console.contains("probe: count ok"), "{console}");
    // The entropy device: the guest read from it over virtio-mmio.
    assert!(
        console
            .lines()
            .any(|l| l.starts_with("probe: vrng ok") && l.contains("devices=1")),
        "{console}"
    );
    // Each line names its level and its origin, as firecracker-containerd asks.
    assert!(
        log_lines
            .iter()
            .any(|l| l.starts_with(" INFO crates/") && l.contains(".rs:")),
        "no Info line in the log FIFO: {log_lines:?} {console} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No FlushMetrics was asked for: the FIFO was open and stays empty.
    assert_eq!(metric_lines.join().unwrap(), Vec::<String>::new());

    // What tern cannot honour is refused by name, in one line.
    let refused = |extra: serde_json::Value, want: &str| {
        let mut c = serde_json::json!({ "boot-source": {"kernel_image_path": kernel} });
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        std::fs::write(&config, c.to_string()).unwrap();
        let out = Command::new(&link)
            .args(["--no-api", "--config-file", s(&config)])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want) && err.lines().count() == 1, "{err}");
    };
    refused(
        serde_json::json!({"vsock": {"guest_cid": 2, "uds_path": dir.path("v.sock")}}),
        "vsock cid",
    );
    refused(
        serde_json::json!({"entropy": {"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}}),
        "entropy rate_limiter",
    );
}

#[test]
fn the_firecracker_balloon_routes_drive_terns_balloon() {
    let test = "the_firecracker_balloon_routes_drive_terns_balloon";
    if !require_kvm(test) {
        return;
    }
    let dir = Scratch::new("fc-balloon");
    let sock = dir.path("fc.sock");
    let console = dir.path("console.txt");
    let fc = firecracker(&sock, &console, "balloon");
    wait_until("the API socket", Duration::from_secs(10), || sock.exists());
    let api = api::client::Client::new(&sock);
    let call = |method: &str, path: &str, body: Option<&str>| api.call(method, path, body).unwrap();
    let (st, b) = call("GET", "/balloon", None);
    assert!(st == 400 && b.contains("No balloon"), "{st} {b}");
    let put = r#"{"amount_mib": 16, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#;
    assert_eq!(call("PUT", "/balloon", Some(put)).0, 204);
    let (st, b) = call(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 0, "deflate_on_oom": true, "free_page_hinting": true}"#),
    );
    assert!(st == 400 && b.contains("hinting"), "{st} {b}");
    let kernel = probe();
    let boot = serde_json::json!({
        "kernel_image_path": kernel,
        "boot_args": "console=ttyS0 probe.run=vballoon probe.balloon_fill_mb=128 probe.balloon_ms=60000"
    });
    for (path, body) in [
        (
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 256}"#.to_string(),
        ),
        ("/boot-source", boot.to_string()),
        (
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_string(),
        ),
    ] {
        let (st, b) = call("PUT", path, Some(&body));
        assert_eq!(st, 204, "{path}: {b}");
    }
    let said = |what: &str| {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with(&format!("probe: vballoon {what}")))
    };
    // The amount given before the start is the size the VM starts with.
    wait_until("16 MiB held", Duration::from_secs(20), || {
        said("held=4096 ")
    });
    let (st, b) = call("PATCH", "/balloon", Some(r#"{"amount_mib": 64}"#));
    assert_eq!(st, 204, "{b}");
    wait_until("64 MiB held", Duration::from_secs(20), || {
        said("held=16384 ")
    });
    let get = |path: &str| -> serde_json::Value {
        let (st, b) = call("GET", path, None);
        assert_eq!(st, 200, "{path}: {b}");
        serde_json::from_str(&b).unwrap()
    };
    let b = get("/balloon");
    assert_eq!(b["amount_mib"], 64, "{b}");
    assert_eq!(b["stats_polling_interval_s"], 1, "{b}");
    wait_until("the statistics", Duration::from_secs(10), || {
        let s = get("/balloon/statistics");
        s["actual_mib"] == 64 && s["total_memory"].is_u64()
    });
    let (st, b) = call(
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 5}"#),
    );
    assert!(st == 400 && b.contains("PUT /balloon"), "{st} {b}");
    kill(fc);
}

#[test]
fn a_vsock_gets_its_socket_through_the_flag_and_both_apis() {
    let test = "a_vsock_gets_its_socket_through_the_flag_and_both_apis";
    if !require_kvm(test) {
        return;
    }
    use std::os::unix::fs::FileTypeExt;
    let dir = Scratch::new("vsock");
    let is_socket =
        |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket());
    // A reserved CID is refused on the command line.
    let kernel = probe();
    let r = tern_run(
        &[
            "--kernel",
            s(&kernel),
            "--vsock",
            "cid=2,socket=/tmp/x.sock",
        ],
        Duration::from_secs(10),
    );
    assert!(
        r.code == Some(2) && r.stderr.contains("reserved"),
        "{:?} {}",
        r.code,
        r.stderr
    );

    // tern's own flag: the socket is there while the VM runs, and gone after.
    let vsock = dir.path("v.sock");
    let arg = format!("cid=3,socket={}", s(&vsock));
    let sock = dir.path("api.sock");
    let (vm, c) = running_vm(
        &sock,
        "none",
        "probe.run=count probe.count_ms=20000",
        &["--vsock", &arg],
    );
    assert!(is_socket(&vsock));
    let v = c.info().unwrap().config.unwrap().vsock.unwrap();
    assert_eq!((v.cid, v.socket.as_path()), (3, vsock.as_path()));
    let (st, b) = c.call("PUT", "/v1/vm/shutdown?force=true", None).unwrap();
    assert_eq!(st, 202, "{b}");
    let (code, err) = vm.finish(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    assert!(!vsock.exists(), "the vsock socket was left behind");

    // Firecracker's PUT /vsock.
    let fsock = dir.path("fc.sock");
    let console = dir.path("console.txt");
    let fc = firecracker(&fsock, &console, "vsock");
    wait_until("the API socket", Duration::from_secs(10), || fsock.exists());
    let api = api::client::Client::new(&fsock);
    let uds = dir.path("fc-v.sock");
    let body = serde_json::json!({ "guest_cid": 5, "uds_path": uds });
    let (st, b) = api.call("PUT", "/vsock", Some(&body.to_string())).unwrap();
    assert_eq!(st, 204, "{b}");
    let bad = serde_json::json!({ "guest_cid": 1, "uds_path": uds });
    let (st, b) = api.call("PUT", "/vsock", Some(&bad.to_string())).unwrap();
    assert!(st == 400 && b.contains("reserved"), "{st} {b}");
    let boot = serde_json::json!({
        "kernel_image_path": kernel,
        "boot_args": "console=ttyS0 probe.run=count probe.count_ms=20000"
    });
    for (path, body) in [
        ("/boot-source", boot.to_string()),
        (
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_string(),
        ),
    ] {
        let (st, b) = api.call("PUT", path, Some(&body)).unwrap();
        assert_eq!(st, 204, "{path}: {b}");
    }
    assert!(is_socket(&uds));
    let v = api.info().unwrap().config.unwrap().vsock.unwrap();
    assert_eq!(v.cid, 5);
    kill(fc);
}

/// A snapshot's vsock socket is in use while its VM runs: a restore beside it is refused in
/// one line naming the socket, and `--vsock-socket` gives the restored VM its own.
#[test]
fn a_restored_vsock_takes_its_own_socket_with_vsock_socket() {
    let test = "a_restored_vsock_takes_its_own_socket_with_vsock_socket";
    if !require_kvm(test) {
        return;
    }
    use std::os::unix::fs::FileTypeExt;
    let dir = Scratch::new("vsock-restore");
    let is_socket =
        |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket());
    let vsock = dir.path("v.sock");
    let arg = format!("cid=3,socket={}", s(&vsock));
    let sock = dir.path("api.sock");
    let (vm, c) = running_vm(
        &sock,
        "none",
        "probe.run=count probe.count_ms=20000",
        &["--vsock", &arg],
    );
    let snap = dir.path("snap");
    pause_and_snapshot(&c, &snap);
    // The first VM still holds v.sock.
    let r = tern_run(
        &["--restore", s(&snap), "--serial", "none"],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("{} is in use", vsock.display()))
            && r.stderr.trim().lines().count() == 1,
        "{}",
        r.stderr
    );
    // Its own socket.
    let other = dir.path("clone.sock");
    let sock2 = dir.path("api2.sock");
    let clone = spawn(&[
        "--restore",
        s(&snap),
        "--serial",
        "none",
        "--api-socket",
        s(&sock2),
        "--vsock-socket",
        s(&other),
    ]);
    wait_until("the clone's vsock socket", Duration::from_secs(20), || {
        is_socket(&other)
    });
    let c2 = api::client::Client::new(&sock2);
    wait_until("the clone runs", Duration::from_secs(20), || {
        c2.info().is_ok_and(|i| i.state.as_str() == "running")
    });
    let v = c2.info().unwrap().config.unwrap().vsock.unwrap();
    assert_eq!(v.socket, other);
    assert!(is_socket(&vsock), "the first VM's socket went away");
    // A VM without a vsock has none to move.
    let plain = dir.path("plain");
    let sock3 = dir.path("api3.sock");
    let (vm3, c3) = counting_vm(&sock3);
    pause_and_snapshot(&c3, &plain);
    drop(vm3);
    let r = tern_run(
        &["--restore", s(&plain), "--vsock-socket", s(&other)],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("has no vsock"), "{}", r.stderr);
    drop(clone);
    drop(vm);
}
