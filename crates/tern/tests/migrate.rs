//! Live migration on the host's `/dev/kvm`, between two tern processes: the probe's counter
//! (`count`) with a memory pattern, memory it keeps rewriting, and virtio-blk I/O at every
//! tick, moved over Unix sockets and TCP while it runs. The counter must go on at the next
//! tick on the destination, memory and disk must hold what the guest wrote, and every failure
//! (the destination or the source killed mid-copy, a guest that dirties memory faster than the
//! link allows, a destination that refuses the VM) must leave exactly one VM running, or none
//! when the source died.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A source running the counter with `params`, its serial port in `serial` and its API on
/// `sock`; waits for its first ticks.
fn source(sock: &Path, serial: &Path, memory: &str, params: &str, extra: &[&str]) -> Tern {
    let backend = format!("file:{}", s(serial));
    let cmdline = format!("probe.run=count {params}");
    let kernel = probe();
    let mut args = vec![
        "--kernel",
        s(&kernel),
        "--memory",
        memory,
        "--serial",
        &backend,
        "--cmdline",
        &cmdline,
        "--api-socket",
        s(sock),
    ];
    args.extend_from_slice(extra);
    let t = spawn(&args);
    wait_until("3 ticks", Duration::from_secs(20), || {
        ticks(serial).len() >= 3
    });
    t
}

/// A destination waiting on `url`, its serial port in `serial`, accepting the files the
/// source names in the probe's directory and `serial`'s (the test's scratch directory).
fn destination(url: &str, serial: &Path, extra: &[&str]) -> Tern {
    let backend = format!("file:{}", s(serial));
    let kernel = probe();
    let mut args = vec![
        "--serial",
        &backend,
        "--accept-dir",
        s(kernel.parent().unwrap()),
        "--accept-dir",
        s(serial.parent().unwrap()),
    ];
    args.extend_from_slice(extra);
    listening(url, &args)
}

fn migrate(sock: &Path, args: &[&str]) -> Run {
    let mut a = vec!["migrate", "--api-socket", s(sock)];
    a.extend_from_slice(args);
    run_with_timeout(&tern(), &a, Duration::from_secs(60))
}

/// Every complete tick line of the source's serial output followed by the destination's (the
/// migration may split a line between the two files).
fn all_ticks(a: &Path, b: &Path) -> Vec<(u64, u64)> {
    let dir = a.parent().unwrap();
    let joined = dir.join(format!(
        "{}+{}",
        a.file_name().unwrap().to_string_lossy(),
        b.file_name().unwrap().to_string_lossy()
    ));
    let mut text = std::fs::read(a).unwrap_or_default();
    text.extend(std::fs::read(b).unwrap_or_default());
    std::fs::write(&joined, text).unwrap();
    ticks(&joined)
}

/// The ticks are 1, 2, 3… with no gap and no repeat, and the value only grows.
fn assert_counter_continues(t: &[(u64, u64)]) {
    assert!(!t.is_empty());
    for (i, w) in t.windows(2).enumerate() {
        assert_eq!(w[1].0, w[0].0 + 1, "ticks not consecutive at {i}: {t:?}");
        assert!(w[1].1 > w[0].1, "the value went back at tick {}", w[1].0);
    }
    assert_eq!(t[0].0, 1);
}

/// The end of a migration that went through: the source exits 0 once the destination runs
/// the VM, the destination runs it to its end (exit 0), and the counter went on across (`a`,
/// the source's serial output, then `b`, the destination's). The destination's output.
fn handed_over(src: Tern, mut dst: Tern, a: &Path, b: &Path) -> String {
    let (code, err) = src.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "source: {err}");
    assert!(err.contains("the VM migrated to"), "{err}");
    assert!(dst.running(), "the destination is not running the VM");
    let (code, err) = dst.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "destination: {err}");
    assert_counter_continues(&all_ticks(a, b));
    std::fs::read_to_string(b).unwrap()
}

/// Migrates `src` (API `sock`, serial `a`) to a new destination on `url` (serial `c`), which
/// must go through; the destination's serial output.
fn migrate_again(sock: &Path, url: &str, src: Tern, a: &Path, c: &Path) -> String {
    let dst = destination(url, c, &[]);
    let r = migrate(sock, &["--to", url]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    handed_over(src, dst, a, c)
}

/// The source still counts: its migration failed and left it running.
fn still_running_at(src: &mut Tern, a: &Path) {
    assert!(src.running(), "the source stopped");
    let n = ticks(a).len();
    wait_until("more ticks at the source", Duration::from_secs(5), || {
        ticks(a).len() > n + 2
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_counting_guest_moves_over_a_unix_socket_and_goes_on_at_the_next_tick() {
    if !require_kvm("a_counting_guest_moves_over_a_unix_socket_and_goes_on_at_the_next_tick") {
        return;
    }
    let dir = Scratch::new("mig-unix");
    let (sock, a, b) = (dir.path("a.sock"), dir.path("a.log"), dir.path("b.log"));
    let url = format!("unix:{}", s(&dir.path("m.sock")));
    let dst = destination(&url, &b, &[]);
    let src = source(
        &sock,
        &a,
        "128M",
        "probe.count_ms=4000 probe.count_mem_mb=32 probe.count_gen=1",
        &[],
    );
    let gen_before = lines_after(&a, "probe: count generation=");
    let r = migrate(&sock, &["--to", &url, "--json"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let st: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    assert!(st["downtime_ms"].as_f64().unwrap() > 0.0, "{st}");
    // Memory the guest never touched is neither read nor sent: 128 MiB is 32768 pages, the
    // pattern 8192.
    let read = st["pages_sent"].as_u64().unwrap() + st["zero_pages"].as_u64().unwrap();
    assert!(st["pages_sent"].as_u64().unwrap() >= 8192, "{st}");
    assert!(read < 16384, "{read} pages read: {st}");
    // The source exits 0 once the destination runs the VM.
    let text = handed_over(src, dst, &a, &b);
    assert!(
        text.contains("mem=ok") && text.contains("gen_changes=0"),
        "memory or the generation ID did not survive: {text}"
    );
    // The same VM, not a clone: its generation ID did not change.
    assert_eq!(gen_before.len(), 1);
}

/// Over TCP, two vCPUs, a disk written at every tick and memory rewritten all the time: the disk
/// lock moves with the VM (both terns name the same image), and the image ends up holding
/// what the guest's log says it wrote last to each sector.
#[test]
fn a_guest_writing_its_disk_and_memory_moves_over_tcp() {
    if !require_kvm("a_guest_writing_its_disk_and_memory_moves_over_tcp") {
        return;
    }
    let dir = Scratch::new("mig-tcp");
    let (sock, a, b) = (dir.path("a.sock"), dir.path("a.log"), dir.path("b.log"));
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disk_arg = format!("path={},format=raw", s(&disk));
    let url = format!("tcp:127.0.0.1:{}", free_port());
    let dst = destination(&url, &b, &[]);
    let src = source(
        &sock,
        &a,
        "128M",
        "probe.count_ms=5000 probe.count_blk=1 probe.count_dirty_mb=16",
        &["--disk", &disk_arg, "--cpus", "2"],
    );
    let r = migrate(&sock, &["--to", &url]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .starts_with(&format!("migrated to {url}: downtime ")),
        "{}",
        r.stdout
    );
    let text = handed_over(src, dst, &a, &b);
    assert!(
        text.contains("dirty=ok") && text.contains("devlog=ok"),
        "rewritten memory or the device's log did not survive: {text}"
    );
    // What the guest wrote last to each sector is on the image.
    let mut log = std::fs::read_to_string(&a).unwrap();
    log.push_str(&text);
    let mut last = [0u64; 64];
    for l in log.lines() {
        if let Some(rest) = l.strip_prefix("probe: count blk tick=") {
            let t: u64 = rest.split(' ').next().unwrap().parse().unwrap();
            last[(t % 64) as usize] = last[(t % 64) as usize].max(t);
        }
    }
    let img = std::fs::read(&disk).unwrap();
    let mut checked = 0;
    for (sector, &t) in last.iter().enumerate().filter(|(_, t)| **t > 0) {
        let head = &img[sector * 512..sector * 512 + 16];
        let mut want = (sector as u64).to_le_bytes().to_vec();
        want.extend_from_slice(&t.to_le_bytes());
        assert_eq!(head, &want[..], "sector {sector} does not hold tick {t}");
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} sectors written");
}

/// A guest that dirties memory faster than a bandwidth-limited link carries it does not
/// converge: at the timeout the migration is cancelled, the VM runs on at the source, the
/// destination discards what it got and says why, and a second migration (no limit) succeeds.
#[test]
fn a_migration_that_does_not_converge_is_cancelled_and_a_second_one_succeeds() {
    if !require_kvm("a_migration_that_does_not_converge_is_cancelled_and_a_second_one_succeeds") {
        return;
    }
    let dir = Scratch::new("mig-cancel");
    let (sock, a, b, c) = (
        dir.path("a.sock"),
        dir.path("a.log"),
        dir.path("b.log"),
        dir.path("c.log"),
    );
    let url = format!("unix:{}", s(&dir.path("m.sock")));
    let dst = destination(&url, &b, &[]);
    let mut src = source(
        &sock,
        &a,
        "128M",
        "probe.count_ms=9000 probe.count_dirty_mb=32",
        &[],
    );
    let r = migrate(
        &sock,
        &[
            "--to",
            &url,
            "--max-bandwidth",
            "16M",
            "--downtime-ms",
            "5",
            "--timeout-s",
            "3",
            "--on-timeout",
            "cancel",
        ],
    );
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("did not converge within 3 s")
            && r.stderr.contains("the VM keeps running on the source"),
        "{}",
        r.stderr
    );
    let (code, err) = dst.finish(Duration::from_secs(10));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the source cancelled it") && err.contains("no VM runs here"),
        "{err}"
    );
    still_running_at(&mut src, &a);
    let st = migrate(&sock, &["--status", "--json"]);
    assert!(st.stdout.contains("\"state\":\"failed\""), "{}", st.stdout);

    assert!(migrate_again(&sock, &url, src, &a, &c).contains("dirty=ok"));
}

/// The destination killed while memory is being copied: the source keeps running and a second
/// migration, to a new destination, succeeds.
#[test]
fn the_destination_killed_mid_copy_leaves_the_vm_running_at_the_source() {
    if !require_kvm("the_destination_killed_mid_copy_leaves_the_vm_running_at_the_source") {
        return;
    }
    let dir = Scratch::new("mig-kill-dst");
    let (sock, a, b, c) = (
        dir.path("a.sock"),
        dir.path("a.log"),
        dir.path("b.log"),
        dir.path("c.log"),
    );
    let url = format!("unix:{}", s(&dir.path("m.sock")));
    let mut dst = destination(&url, &b, &[]);
    let mut src = source(
        &sock,
        &a,
        "128M",
        "probe.count_ms=8000 probe.count_mem_mb=64",
        &[],
    );
    // 64 MiB at 8 MiB/s: the copy takes about 8 s; the destination dies during it.
    let start = run_with_timeout(
        &tern(),
        &[
            "migrate",
            "--api-socket",
            s(&sock),
            "--to",
            &url,
            "--max-bandwidth",
            "8M",
            "--detach",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(start.code, Some(0), "{}", start.stderr);
    std::thread::sleep(Duration::from_millis(1000));
    let _ = dst.0.kill();
    let _ = dst.0.wait();
    wait_until("the migration to fail", Duration::from_secs(40), || {
        migrate(&sock, &["--status", "--json"])
            .stdout
            .contains("\"state\":\"failed\"")
    });
    still_running_at(&mut src, &a);
    assert!(migrate_again(&sock, &url, src, &a, &c).contains("mem=ok"));
}

/// The source killed while memory is being copied: the destination exits with one line
/// saying so, and runs nothing.
#[test]
fn the_source_killed_mid_copy_leaves_no_vm_at_the_destination() {
    if !require_kvm("the_source_killed_mid_copy_leaves_no_vm_at_the_destination") {
        return;
    }
    let dir = Scratch::new("mig-kill-src");
    let (sock, a, b) = (dir.path("a.sock"), dir.path("a.log"), dir.path("b.log"));
    let url = format!("unix:{}", s(&dir.path("m.sock")));
    let dst = destination(&url, &b, &[]);
    let mut src = source(
        &sock,
        &a,
        "128M",
        "probe.count_ms=8000 probe.count_mem_mb=64",
        &[],
    );
    let start = migrate(&sock, &["--to", &url, "--max-bandwidth", "8M", "--detach"]);
    assert_eq!(start.code, Some(0), "{}", start.stderr);
    std::thread::sleep(Duration::from_millis(1000));
    let _ = src.0.kill();
    let _ = src.0.wait();
    let (code, err) = dst.finish(Duration::from_secs(10));
    assert_eq!(code, Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("tern: migration: the source went away mid-migration")
            && last.ends_with("no VM runs here"),
        "{err}"
    );
    assert!(!b.exists() || !std::fs::read_to_string(&b).unwrap().contains("probe:"));
}

/// A destination that cannot take the VM says why before any memory moves; the source keeps
/// running it. Nothing listening is a clear error too.
#[test]
fn a_refused_or_unreachable_destination_leaves_the_vm_running() {
    if !require_kvm("a_refused_or_unreachable_destination_leaves_the_vm_running") {
        return;
    }
    let dir = Scratch::new("mig-refuse");
    let (sock, a, b) = (dir.path("a.sock"), dir.path("a.log"), dir.path("b.log"));
    let url = format!("unix:{}", s(&dir.path("m.sock")));
    let mut src = source(&sock, &a, "64M", "probe.count_ms=6000", &[]);
    let r = migrate(&sock, &["--to", &url]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("cannot connect to"), "{}", r.stderr);
    // A TAP remap for a TAP the VM does not have: refused, named.
    let dst = destination(&url, &b, &["--tap-remap", "tap-x=tap-y"]);
    let r = migrate(&sock, &["--to", &url]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(
        r.stderr
            .contains("the destination refused the VM: migration refused: TAP remap: the migrating VM has no TAP tap-x"),
        "{}",
        r.stderr
    );
    let (code, err) = dst.finish(Duration::from_secs(10));
    assert_eq!(code, Some(1));
    assert!(err.contains("TAP remap"), "{err}");
    assert!(src.running());
    // The source does not choose this host's files: a destination that accepts none refuses
    // the kernel the source names, and one accepting only the kernel's directory refuses the
    // source's serial log elsewhere. The VM runs on at the source.
    let kernel = probe();
    let log = format!("file:{}", s(&b));
    for (args, refused) in [
        (vec!["--serial", log.as_str()], "the kernel"),
        (
            vec!["--accept-dir", s(kernel.parent().unwrap())],
            "the serial port's file",
        ),
    ] {
        let dst = listening(&url, &args);
        let r = migrate(&sock, &["--to", &url]);
        assert_eq!(r.code, Some(1), "{}", r.stdout);
        let want = format!("migration refused: the source names {refused} ");
        assert!(r.stderr.contains(&want), "{want}: {}", r.stderr);
        assert!(r.stderr.contains("--accept-dir DIR"), "{}", r.stderr);
        let (code, err) = dst.finish(Duration::from_secs(10));
        assert_eq!(code, Some(1));
        assert!(err.contains(&want), "{err}");
        assert!(src.running());
    }
    assert!(!b.exists(), "a refused destination wrote the serial file");
    // Bad requests: 400s naming the field.
    let r = migrate(&sock, &["--to", &url, "--downtime-ms", "0"]);
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("downtime_ms 0"), "{}", r.stderr);
    let r = migrate(&sock, &["--to", "ftp://x"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    let r = migrate(&sock, &["--cancel"]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("no migration is in progress"),
        "{}",
        r.stderr
    );
}

/// After the switch-over the destination announces the guest's MAC on its TAP (a gratuitous
/// RARP from that MAC), so that a bridge or switch learns at once where the guest is now.
#[test]
fn the_destination_announces_the_guest_on_its_tap() {
    if !require_kvm("the_destination_announces_the_guest_on_its_tap")
        || !require_netns("the_destination_announces_the_guest_on_its_tap")
    {
        return;
    }
    let ns = netpeer::NetNs::new().expect("network namespace");
    ns.exec(&["ip", "tuntap", "add", "dev", "tap1", "mode", "tap"])
        .unwrap();
    ns.exec(&["ip", "link", "set", "tap1", "up"]).unwrap();
    let dir = Scratch::new("mig-announce");
    let (sock, a, b) = (dir.path("a.sock"), dir.path("a.log"), dir.path("b.log"));
    let url = format!("unix:{}", s(&dir.path("m.sock")));
    let in_ns = |args: Vec<String>| {
        let mut a = vec!["run".to_string()];
        a.extend(args);
        Tern(
            Command::new("ip")
                .args(ns.exec_args(s(&tern()), &a))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start tern"),
        )
    };
    let owned = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let kernel = probe();
    let dst = in_ns(owned(&[
        "--incoming",
        &url,
        "--tap-remap",
        "tap0=tap1",
        "--serial",
        &format!("file:{}", s(&b)),
        "--accept-dir",
        s(kernel.parent().unwrap()),
    ]));
    let src = in_ns(owned(&[
        "--kernel",
        s(&kernel),
        "--memory",
        "64M",
        "--net",
        "tap=tap0,mac=52:54:00:ab:cd:ef",
        "--serial",
        &format!("file:{}", s(&a)),
        "--cmdline",
        "probe.run=count probe.count_ms=4000",
        "--api-socket",
        s(&sock),
    ]));
    wait_until("3 ticks", Duration::from_secs(20), || ticks(&a).len() >= 3);
    let capture = netpeer::capture(&ns, "tap1", 0x8035, 1, Duration::from_secs(30));
    let r = migrate(&sock, &["--to", &url]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let frames = capture.join().unwrap().expect("capture on tap1");
    let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    let rarp: Vec<&Vec<u8>> = frames
        .iter()
        .filter(|f| f[6..12] == mac && f[..6] == [0xff; 6] && f.len() >= 42 && f[22..28] == mac)
        .collect();
    assert!(
        !rarp.is_empty(),
        "no RARP announcement from the guest's MAC on tap1: {frames:?}"
    );
    handed_over(src, dst, &a, &b);
}

/// A live upgrade on one host: guest memory (shared) is handed to the new tern as a file
/// descriptor, so nothing of it is copied whatever the guest's size; a VM without shared
/// memory cannot go that way, and the VM runs on.
#[test]
fn a_local_migration_hands_shared_memory_over_without_copying_it() {
    if !require_kvm("a_local_migration_hands_shared_memory_over_without_copying_it") {
        return;
    }
    let dir = Scratch::new("mig-local");
    let (sock, a, b) = (dir.path("a.sock"), dir.path("a.log"), dir.path("b.log"));
    let url = format!("unix:{}", s(&dir.path("m.sock")));
    // Private memory: refused, the VM keeps running.
    let plain = dir.path("plain.sock");
    let plain_log = dir.path("plain.log");
    let mut src = source(&plain, &plain_log, "64M", "probe.count_ms=3000", &[]);
    let dst = destination(&url, &b, &[]);
    let r = migrate(&plain, &["--to", &url, "--local"]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stderr.contains("needs shared memory"), "{}", r.stderr);
    assert!(src.running());
    let (code, _) = dst.finish(Duration::from_secs(10));
    assert_eq!(code, Some(1));
    let r = migrate(&plain, &["--to", "tcp:127.0.0.1:1", "--local"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    drop(src);

    let dst = destination(&url, &b, &[]);
    let src = source(
        &sock,
        &a,
        "1G",
        "probe.count_ms=4000 probe.count_mem_mb=64",
        &["--memory-shared"],
    );
    let r = migrate(&sock, &["--to", &url, "--local", "--json"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let st: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(st["state"], "completed");
    assert_eq!(st["pages_sent"], 0, "{st}");
    // The description and state, no memory.
    assert!(st["bytes_sent"].as_u64().unwrap() < 256 << 10, "{st}");
    assert!(handed_over(src, dst, &a, &b).contains("mem=ok"));
}

/// The same through the REST API: an empty tern told to receive (`PUT
/// /v1/vm/migrate/receive`), the send answered 202 and followed with `GET /v1/vm/migrate`,
/// requests that would disturb it refused with 409 while it runs, and `DELETE` cancelling it.
#[test]
fn a_migration_driven_through_the_api_reports_its_progress_and_can_be_cancelled() {
    if !require_kvm("a_migration_driven_through_the_api_reports_its_progress_and_can_be_cancelled")
    {
        return;
    }
    use api::client::Client;
    let dir = Scratch::new("mig-api");
    let (sock, a) = (dir.path("a.sock"), dir.path("a.log"));
    let m = dir.path("m.sock");
    let url = format!("unix:{}", s(&m));
    let empty = |name: &str| {
        let d = dir.path(name);
        let t = spawn(&["--api-socket", s(&d)]);
        wait_until("the API socket", Duration::from_secs(10), || d.exists());
        (t, Client::new(d))
    };
    let (d1, dc) = empty("d1.sock");
    let none: serde_json::Value = dc.get("/v1/vm/migrate").unwrap();
    assert_eq!(none["state"], "none");
    let body = format!(
        r#"{{"url":"{url}","serial":"file:{}","accept_dirs":["{}"]}}"#,
        s(&dir.path("b.log")),
        s(probe().parent().unwrap())
    );
    let (st, _) = dc
        .call("PUT", "/v1/vm/migrate/receive", Some(&body))
        .unwrap();
    assert_eq!(st, 202);
    wait_until("the migration socket", Duration::from_secs(10), || {
        m.exists()
    });

    let mut src = source(
        &sock,
        &a,
        "256M",
        "probe.count_ms=12000 probe.count_mem_mb=128",
        &[],
    );
    let sc = Client::new(&sock);
    let (st, b) = sc
        .call("PUT", "/v1/vm/migrate/send", Some(r#"{"url":"ftp:x"}"#))
        .unwrap();
    assert_eq!(st, 400, "{b}");
    let send = format!(r#"{{"url":"{url}","max_bandwidth":8388608}}"#);
    let (st, b) = sc.call("PUT", "/v1/vm/migrate/send", Some(&send)).unwrap();
    assert_eq!(st, 202, "{b}");
    wait_until("pages on their way", Duration::from_secs(10), || {
        let s: serde_json::Value = sc.get("/v1/vm/migrate").unwrap();
        s["state"] == "active" && s["bytes_sent"].as_u64().unwrap() > 0
    });
    let (st, b) = sc.call("PUT", "/v1/vm/pause", None).unwrap();
    assert_eq!(st, 409, "{b}");
    assert!(b.contains("a migration is in progress"), "{b}");
    // The destination answers too while the VM arrives.
    let arriving: serde_json::Value = dc.get("/v1/vm/migrate").unwrap();
    assert_eq!(arriving["state"], "active", "{arriving}");
    assert_eq!(dc.info().unwrap().state.as_str(), "created");
    let (st, b) = dc.call("PUT", "/v1/vm/boot", None).unwrap();
    assert_eq!(st, 409, "{b}");
    let (st, b) = sc.call("PUT", "/v1/vm/migrate/send", Some(&send)).unwrap();
    assert_eq!(st, 409, "{b}");
    let (st, b) = sc.call("DELETE", "/v1/vm/migrate", None).unwrap();
    assert_eq!(st, 202, "{b}");
    wait_until("the cancel", Duration::from_secs(10), || {
        let s: serde_json::Value = sc.get("/v1/vm/migrate").unwrap();
        s["state"] == "cancelled"
    });
    let (code, err) = d1.finish(Duration::from_secs(10));
    assert_eq!(code, Some(1));
    assert!(err.contains("the source cancelled it"), "{err}");
    assert!(src.running());

    // Again, to completion.
    let (d2, dc) = empty("d2.sock");
    let body = format!(
        r#"{{"url":"{url}","serial":"file:{}","accept_dirs":["{}"]}}"#,
        s(&dir.path("c.log")),
        s(probe().parent().unwrap())
    );
    let (st, _) = dc
        .call("PUT", "/v1/vm/migrate/receive", Some(&body))
        .unwrap();
    assert_eq!(st, 202);
    wait_until("the migration socket", Duration::from_secs(10), || {
        m.exists()
    });
    let (st, b) = sc
        .call(
            "PUT",
            "/v1/vm/migrate/send",
            Some(&format!(r#"{{"url":"{url}"}}"#)),
        )
        .unwrap();
    assert_eq!(st, 202, "{b}");
    let (code, err) = src.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    let info = dc.info().unwrap();
    assert_eq!(info.state.as_str(), "running");
    let (code, err) = d2.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    assert_counter_continues(&all_ticks(&a, &dir.path("c.log")));
}

/// Auto-converge parks the vCPUs of a guest that writes memory faster than the link carries
/// it for a growing share of every 100 ms: a migration that cannot converge without it (and
/// is cancelled at its timeout) completes with it, and the memory the guest kept rewriting
/// arrives intact.
#[test]
fn auto_converge_lets_a_guest_that_dirties_memory_too_fast_move() {
    if !require_kvm("auto_converge_lets_a_guest_that_dirties_memory_too_fast_move") {
        return;
    }
    let dir = Scratch::new("mig-converge");
    let (sock, a, b, c) = (
        dir.path("a.sock"),
        dir.path("a.log"),
        dir.path("b.log"),
        dir.path("c.log"),
    );
    let url = format!("unix:{}", s(&dir.path("m.sock")));
    let mut src = source(
        &sock,
        &a,
        "128M",
        "probe.count_ms=25000 probe.count_dirty_mb=8",
        &[],
    );
    let slow = [
        "--to",
        &url,
        "--max-bandwidth",
        "16M",
        "--downtime-ms",
        "50",
        "--timeout-s",
        "5",
        "--json",
    ];
    let dst = destination(&url, &b, &[]);
    let r = migrate(&sock, &slow);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("did not converge"), "{}", r.stdout);
    let (code, _) = dst.finish(Duration::from_secs(10));
    assert_eq!(code, Some(1));
    still_running_at(&mut src, &a);

    let dst = destination(&url, &c, &[]);
    // Parked vCPUs write less: the same limits, with time for the throttle to grow.
    let mut with = slow.to_vec();
    with[7] = "30";
    with.push("--auto-converge");
    let r = migrate(&sock, &with);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let st: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert!(st["throttle_percent"].as_u64().unwrap() > 0, "{st}");
    assert!(handed_over(src, dst, &a, &c).contains("dirty=ok"));
}

/// Shared guest memory migrated by copy (TCP): only the parts of its file that hold data are
/// read (reading the rest would allocate it on the source), and the guest's memory arrives.
#[test]
fn shared_memory_migrates_by_copy_reading_only_its_data() {
    if !require_kvm("shared_memory_migrates_by_copy_reading_only_its_data") {
        return;
    }
    let dir = Scratch::new("mig-shared-tcp");
    let (sock, a, b) = (dir.path("a.sock"), dir.path("a.log"), dir.path("b.log"));
    let url = format!("tcp:127.0.0.1:{}", free_port());
    let dst = destination(&url, &b, &[]);
    let src = source(
        &sock,
        &a,
        "1G",
        "probe.count_ms=4000 probe.count_mem_mb=64",
        &["--memory-shared"],
    );
    let r = migrate(&sock, &["--to", &url, "--json"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let st: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let read = st["pages_sent"].as_u64().unwrap() + st["zero_pages"].as_u64().unwrap();
    // 64 MiB of pattern and the guest's own pages, far from 1 GiB's 262144 pages.
    assert!(read < 65536, "{read} pages read: {st}");
    assert!(st["pages_sent"].as_u64().unwrap() >= 16384, "{st}");
    assert!(handed_over(src, dst, &a, &b).contains("mem=ok"));
}

/// A destination played by the test itself, speaking the protocol's framing
/// (crates/vmm/src/migration/protocol.rs): it takes the VM, then does `at_state` once the
/// source sent its final state.
fn fake_destination(
    path: &Path,
    at_state: impl FnOnce(&mut std::os::unix::net::UnixStream) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut pre = [0u8; 12];
        c.read_exact(&mut pre).unwrap();
        assert_eq!(&pre[..8], b"TERNMIG\n");
        loop {
            let mut h = [0u8; 8];
            c.read_exact(&mut h).unwrap();
            let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; len];
            c.read_exact(&mut payload).unwrap();
            match h[0] {
                // Hello: take it.
                1 => c.write_all(&[2, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
                // Sync: everything so far is in.
                13 => c.write_all(&[14, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
                // State: the hand-over starts.
                6 => break,
                _ => {}
            }
        }
        at_state(&mut c);
    })
}

/// Every point of the hand-over where the destination can fail: after the final state (it
/// hangs up), after Go (it says it could not start the VM: the source takes its disk back and
/// resumes), and after Go without a word (the source cannot know whether the VM runs there,
/// so it stops without resuming it, exit status 1).
#[test]
fn a_destination_failing_during_the_hand_over_leaves_exactly_one_vm_or_none() {
    if !require_kvm("a_destination_failing_during_the_hand_over_leaves_exactly_one_vm_or_none") {
        return;
    }
    use std::io::{Read, Write};
    let dir = Scratch::new("mig-handover");
    let (sock, a) = (dir.path("a.sock"), dir.path("a.log"));
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disk_arg = format!("path={},format=raw", s(&disk));
    let mut src = source(
        &sock,
        &a,
        "64M",
        "probe.count_ms=20000 probe.count_blk=1",
        &["--disk", &disk_arg],
    );
    let locked = || {
        // flock(1): fails at once while the source holds the image's lock.
        !Command::new("flock")
            .args(["-n", "-x", s(&disk), "true"])
            .status()
            .unwrap()
            .success()
    };
    assert!(locked());
    // 1. Hangs up after the state.
    let m1 = dir.path("m1.sock");
    let f = fake_destination(&m1, |c| drop(c.shutdown(std::net::Shutdown::Both)));
    let r = migrate(&sock, &["--to", &format!("unix:{}", s(&m1))]);
    f.join().unwrap();
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(
        r.stderr.contains("the destination closed the connection"),
        "{}",
        r.stderr
    );
    still_running_at(&mut src, &a);
    assert!(locked());
    // 2. Ready, Go, then Failed: the source resumes with its disk locked again.
    let m2 = dir.path("m2.sock");
    let f = fake_destination(&m2, |c| {
        c.write_all(&[7, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        let mut go = [0u8; 8];
        c.read_exact(&mut go).unwrap();
        assert_eq!(go[0], 8, "expected Go");
        let why = b"cannot lock the disk";
        c.write_all(&[10, 0, 0, 0, why.len() as u8, 0, 0, 0])
            .unwrap();
        c.write_all(why).unwrap();
    });
    let r = migrate(&sock, &["--to", &format!("unix:{}", s(&m2))]);
    f.join().unwrap();
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(
        r.stderr
            .contains("the destination could not start the VM: cannot lock the disk"),
        "{}",
        r.stderr
    );
    still_running_at(&mut src, &a);
    assert!(locked(), "the source did not take its disk's lock back");
    // 3. Ready, Go, then silence: the source stops without running the VM again.
    let m3 = dir.path("m3.sock");
    let f = fake_destination(&m3, |c| {
        c.write_all(&[7, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        let mut go = [0u8; 8];
        c.read_exact(&mut go).unwrap();
        assert_eq!(go[0], 8, "expected Go");
    });
    let r = migrate(&sock, &["--to", &format!("unix:{}", s(&m3))]);
    f.join().unwrap();
    assert_ne!(r.code, Some(0), "{}", r.stdout);
    let (code, err) = src.finish(Duration::from_secs(10));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("it may run there, so this tern stops without running it again"),
        "{err}"
    );
    // Nothing runs the guest: its disk is free.
    assert!(!locked());
}

/// A source (played by the test) whose VM uses CPU features this host lacks, or that speaks
/// another protocol version, is refused before any memory moves, with the reason sent back
/// and printed.
#[test]
fn a_destination_refuses_a_vm_its_cpu_cannot_run_and_another_protocol_version() {
    if !require_kvm("a_destination_refuses_a_vm_its_cpu_cannot_run_and_another_protocol_version") {
        return;
    }
    use std::io::{Read, Write};
    let dir = Scratch::new("mig-cpu");
    let talk = |m: &Path, version: u32, hello: Option<&serde_json::Value>| -> (u8, String) {
        let mut c = std::os::unix::net::UnixStream::connect(m).unwrap();
        let mut pre = b"TERNMIG\n".to_vec();
        pre.extend_from_slice(&version.to_le_bytes());
        c.write_all(&pre).unwrap();
        if let Some(h) = hello {
            let text = serde_json::to_vec(h).unwrap();
            c.write_all(&[1, 0, 0, 0]).unwrap();
            c.write_all(&(text.len() as u32).to_le_bytes()).unwrap();
            c.write_all(&text).unwrap();
        }
        let mut h = [0u8; 8];
        c.read_exact(&mut h).unwrap();
        let mut why = vec![0u8; u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize];
        c.read_exact(&mut why).unwrap();
        (h[0], String::from_utf8_lossy(&why).into_owned())
    };
    // CPUID leaf 1 with every feature bit set: no host has them all.
    let mut entry = vec![1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    entry.extend([0xff; 8]);
    entry.extend([0u8; 12]);
    let config = api::VmConfig {
        // Never opened (the VM is refused first), but accepted: in the scratch directory.
        kernel: Some(dir.path("vmlinux")),
        memory: api::config::MemSize(64 << 20),
        ..api::VmConfig::default()
    };
    let hello = serde_json::json!({
        "tern": "test",
        "config": config,
        "cpuid": [entry],
        "memory": [[0, 64u64 << 20]],
    });
    for (name, version, hello, want) in [
        ("cpu", 1, Some(&hello), "features this host lacks"),
        (
            "version",
            9,
            None,
            "protocol version 9; this tern speaks version 1",
        ),
    ] {
        let m = dir.path(&format!("{name}.sock"));
        let url = format!("unix:{}", s(&m));
        let dst = destination(&url, &dir.path(&format!("{name}.log")), &[]);
        let (kind, why) = talk(&m, version, hello);
        assert_eq!(kind, 3, "not a Refuse: {why}");
        assert!(why.contains(want), "{why}");
        let (code, err) = dst.finish(Duration::from_secs(10));
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(want), "{err}");
    }
}

/// A VM restored lazily from a snapshot (its memory a copy-on-write mapping of the snapshot's
/// file, most pages not yet read) migrates with all of its memory: pages the host has not
/// faulted in hold the file's contents there, not zeroes, and are sent.
#[test]
fn a_lazily_restored_vm_migrates_with_its_memory() {
    if !require_kvm("a_lazily_restored_vm_migrates_with_its_memory") {
        return;
    }
    let dir = Scratch::new("mig-lazy");
    let (s0, a0) = (dir.path("s0.sock"), dir.path("a0.log"));
    let snap = dir.path("snap");
    let first = source(
        &s0,
        &a0,
        "128M",
        "probe.count_ms=6000 probe.count_mem_mb=32",
        &[],
    );
    for cmd in [vec!["pause"], vec!["snapshot", "create", "--dir", s(&snap)]] {
        let mut args = cmd.clone();
        args.extend(["--api-socket", s(&s0)]);
        let r = run_with_timeout(&tern(), &args, Duration::from_secs(20));
        assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
    }
    drop(first);
    // The restored VM's serial output goes on in the same file.
    let (sock, a, b) = (dir.path("a.sock"), a0.clone(), dir.path("b.log"));
    let src = spawn(&[
        "--restore",
        s(&snap),
        "--restore-mode",
        "lazy",
        "--serial",
        &format!("file:{}", s(&a)),
        "--api-socket",
        s(&sock),
    ]);
    let before = ticks(&a).len();
    wait_until("ticks after the restore", Duration::from_secs(20), || {
        ticks(&a).len() >= before + 2
    });
    let url = format!("unix:{}", s(&dir.path("m.sock")));
    let dst = destination(&url, &b, &[]);
    let r = migrate(&sock, &["--to", &url, "--json"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let st: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert!(st["pages_sent"].as_u64().unwrap() >= 8192, "{st}");
    let text = handed_over(src, dst, &a, &b);
    assert!(text.contains("mem=ok"), "{text}");
}
