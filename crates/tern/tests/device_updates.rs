//! Disks and interfaces changed while the guest runs, on the host's `/dev/kvm`: ids given and
//! generated, `PATCH /v1/vm/disks/{id}` and `PATCH /v1/vm/nets/{id}` with their refusals
//! (nothing changes), a rate limit tightened and lifted under the probe's disk writes (its
//! `count_blk` ticks), raw and qcow2 images grown in place, another image put behind the
//! running disk (the probe's writes go on into it), `tern disk|net list|update`, and the new
//! limits kept by a snapshot. The nested rig's `tern-disk-resize` has Linux see a grown
//! disk and measures a changed rate.

mod common;

use std::time::{Duration, Instant};

use api::client::Client;
use common::*;

fn patch(c: &Client, path: &str, body: &str) -> (u16, String) {
    c.call("PATCH", path, Some(body)).unwrap()
}

/// The rate-limit waits of disk `id` so far.
fn throttled(c: &Client, id: &str) -> u64 {
    let counters = c.counters().unwrap();
    for d in counters.devices {
        if let api::DeviceCounters::Block {
            id: Some(i),
            throttled,
            ..
        } = d
        {
            if i == id {
                return throttled;
            }
        }
    }
    panic!("no counters for disk {id}");
}

fn tern_cmd(args: &[&str]) -> Run {
    run_with_timeout(&tern(), args, Duration::from_secs(20))
}

#[test]
fn disks_and_interfaces_change_by_id_while_the_guest_runs() {
    let name = "disks_and_interfaces_change_by_id_while_the_guest_runs";
    if !require_kvm(name) || !require_netns(name) {
        return;
    }
    let dir = Scratch::new("devupd");
    let (sock, serial) = (dir.path("api.sock"), dir.path("serial.log"));
    let (raw, qcow) = (dir.path("data.img"), dir.path("second.qcow2"));
    std::fs::write(&raw, vec![0u8; 8 << 20]).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", s(&qcow), "4M"]);
    let kernel = probe();
    let backend = format!("file:{}", s(&serial));
    let d1 = format!("path={},id=data", s(&raw));
    let d2 = format!("path={},format=qcow2", s(&qcow));
    let t = spawn(&[
        "--kernel",
        s(&kernel),
        "--memory",
        "64M",
        "--serial",
        &backend,
        "--api-socket",
        s(&sock),
        "--disk",
        &d1,
        "--disk",
        &d2,
        "--net",
        "tap=auto",
        "--cmdline",
        "probe.run=count probe.count_ms=60000 probe.count_blk=1 probe.count_tick_ms=20",
    ]);
    let c = Client::new(&sock);
    wait_until("the probe's disk writes", Duration::from_secs(20), || {
        lines_after(&serial, "probe: count blk ").len() >= 5
    });

    // Ids: the given one, and generated ones for the others.
    let config = c.info().unwrap().config.unwrap();
    let ids: Vec<_> = config.disks.iter().map(|d| d.id.clone().unwrap()).collect();
    assert_eq!(ids, ["data", "disk0"]);
    assert_eq!(config.nets[0].id.as_deref(), Some("net0"));
    let list = tern_cmd(&["disk", "list", "--api-socket", s(&sock)]);
    assert!(
        list.stdout.contains("data\t") && list.stdout.contains("disk0\t"),
        "{}",
        list.stdout
    );

    // Refusals, each naming the problem; nothing changes.
    for (path, body, status, why) in [
        ("/v1/vm/disks/nope", r#"{"iops": 5}"#, 404, "data, disk0"),
        ("/v1/vm/nets/nope", r#"{"tx_bw": 5}"#, 404, "net0"),
        ("/v1/vm/disks/data", "{}", 400, "nothing to change"),
        (
            "/v1/vm/disks/data",
            r#"{"size": 4194304}"#,
            400,
            "shrinking",
        ),
        ("/v1/vm/disks/data", r#"{"size": 9000000}"#, 400, "512-byte"),
        ("/v1/vm/disks/data", r#"{"speed": 1}"#, 400, "speed"),
        ("/v1/vm/disks/data", r#"{"iops": -1}"#, 400, "iops"),
    ] {
        let (st, b) = patch(&c, path, body);
        assert_eq!(st, status, "{path} {body}: {b}");
        assert!(b.contains(why), "{path} {body}: {b}");
    }
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 8 << 20);
    assert_eq!(c.info().unwrap().config.unwrap().disks[0].iops, 0);

    // A limit tightened under the probe's writes: requests wait for it; lifted: none do.
    let before = throttled(&c, "data");
    let r = tern_cmd(&["disk", "update", "--api-socket", s(&sock), "data", "iops=4"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let t0 = Instant::now();
    let ticks0 = lines_after(&serial, "probe: count blk ").len();
    std::thread::sleep(Duration::from_secs(2));
    let slow = lines_after(&serial, "probe: count blk ").len() - ticks0;
    assert!(
        throttled(&c, "data") > before,
        "no request waited for the new limit"
    );
    // Each tick writes and reads a sector: at 4 ops/s about 2 ticks a second.
    assert!(
        slow <= (t0.elapsed().as_secs_f64() * 3.0) as usize + 2,
        "{slow} ticks in {:?} at 4 ops/s",
        t0.elapsed()
    );
    assert_eq!(c.info().unwrap().config.unwrap().disks[0].iops, 4);
    let (st, b) = patch(&c, "/v1/vm/disks/data", r#"{"iops": 0}"#);
    assert_eq!(st, 204, "{b}");
    std::thread::sleep(Duration::from_millis(500));
    let (waits, ticks1) = (
        throttled(&c, "data"),
        lines_after(&serial, "probe: count blk ").len(),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(throttled(&c, "data"), waits, "requests wait with no limit");
    let fast = lines_after(&serial, "probe: count blk ").len() - ticks1;
    assert!(fast >= 10, "only {fast} ticks in a second without a limit");

    // Grown in place: the raw file, and the qcow2 image's virtual size.
    let (st, b) = patch(&c, "/v1/vm/disks/data", r#"{"size": 16777216}"#);
    assert_eq!(st, 204, "{b}");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 16 << 20);
    let r = tern_cmd(&[
        "disk",
        "update",
        "--api-socket",
        s(&sock),
        "disk0",
        "size=12M",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);

    // Another image behind the running disk: the probe's writes go on, into the new file
    // only, and the counters and configuration name it.
    for (body, why) in [
        (
            r#"{"path": "/nonexistent/new.raw"}"#,
            "/nonexistent/new.raw",
        ),
        (r#"{"path": "/x", "size": 1048576}"#, "not both"),
    ] {
        let (st, b) = patch(&c, "/v1/vm/disks/data", body);
        assert!(st == 400 && b.contains(why), "{body}: {st} {b}");
    }
    let new = dir.path("new.raw");
    std::fs::write(&new, vec![0u8; 4 << 20]).unwrap();
    let ticks0 = lines_after(&serial, "probe: count blk ").len();
    let body = format!(r#"{{"path": "{}"}}"#, s(&new));
    let (st, b) = patch(&c, "/v1/vm/disks/data", &body);
    assert_eq!(st, 204, "{b}");
    let old_after = std::fs::read(&raw).unwrap();
    wait_until("writes in the new image", Duration::from_secs(10), || {
        std::fs::read(&new).unwrap()[..64 * 512]
            .iter()
            .any(|&b| b != 0)
    });
    wait_until("ticks on the new image", Duration::from_secs(10), || {
        lines_after(&serial, "probe: count blk ").len() >= ticks0 + 20
    });
    assert_eq!(
        std::fs::read(&raw).unwrap(),
        old_after,
        "the old image changed after the new one took its place"
    );
    let config = c.info().unwrap().config.unwrap();
    assert_eq!(config.disks[0].path, new);
    assert_eq!(
        config.disks[0].probed_format,
        Some(api::config::DiskFormat::Raw)
    );
    let counters = c.counters().unwrap();
    assert!(
        matches!(&counters.devices[0], api::DeviceCounters::Block { path, .. } if path == s(&new)),
        "{:?}",
        counters.devices[0]
    );
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(!text.contains("FAIL") && !text.contains("fail"), "{text}");

    // An interface's limits, and the limits a snapshot keeps.
    let r = tern_cmd(&[
        "net",
        "update",
        "--api-socket",
        s(&sock),
        "net0",
        "tx_bw=1M",
        "rx_ops=100",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let (st, b) = patch(&c, "/v1/vm/disks/data", r#"{"bw": 10485760}"#);
    assert_eq!(st, 204, "{b}");
    let snap = dir.path("snap");
    pause_and_snapshot(&c, &snap);
    drop(t);
    let state = std::fs::read_to_string(snap.join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let cfg = &state["config"];
    assert_eq!(cfg["disks"][0]["id"], "data");
    assert_eq!(cfg["disks"][0]["bw"], 10485760);
    assert_eq!(cfg["nets"][0]["tx_bw"], 1 << 20);
    assert_eq!(cfg["nets"][0]["rx_ops"], 100);
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", s(&qcow)])
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 12 << 20);
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-q", s(&qcow)])
        .status()
        .unwrap();
    assert!(check.success(), "qemu-img check");
}
