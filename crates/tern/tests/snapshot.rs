//! Snapshots on the host's `/dev/kvm`: the probe's ring-3 counter (`count`) is paused,
//! snapshotted, its tern killed, and a new tern restores it; the counter must go on from the
//! next tick. Damaged snapshots must be refused with a clear message.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn client(args: &[&str]) -> Run {
    run_with_timeout(&tern(), args, Duration::from_secs(20))
}

fn client_ok(args: &[&str]) {
    let r = client(args);
    assert_eq!(r.code, Some(0), "tern {args:?}: {}{}", r.stdout, r.stderr);
}

fn wait_socket(sock: &Path) {
    wait_until("the API socket", Duration::from_secs(10), || sock.exists());
}

/// Boots `count` with an API socket, pauses it after a few ticks and snapshots it to `snap`;
/// returns the last tick before the snapshot.
fn counting_vm_snapshot(dir: &Scratch, cpus: &str, snap: &Path) -> (u64, u64) {
    counting_vm_snapshot_with(dir, cpus, snap, &[], "")
}

/// [`counting_vm_snapshot`] with more `tern run` arguments and probe parameters.
fn counting_vm_snapshot_with(
    dir: &Scratch,
    cpus: &str,
    snap: &Path,
    extra: &[&str],
    params: &str,
) -> (u64, u64) {
    let sock = dir.path("a.sock");
    let serial = dir.path("a.log");
    let backend = format!("file:{}", s(&serial));
    let cmdline = format!("probe.run=count probe.count_ms=5000 {params}");
    let kernel = probe();
    let mut args = vec![
        "--kernel",
        s(&kernel),
        "--memory",
        "64M",
        "--cpus",
        cpus,
        "--serial",
        &backend,
        "--cmdline",
        &cmdline,
        "--api-socket",
        s(&sock),
    ];
    args.extend_from_slice(extra);
    let mut vm = spawn(&args);
    wait_socket(&sock);
    wait_until("3 ticks", Duration::from_secs(20), || {
        ticks(&serial).len() >= 3
    });
    client_ok(&["pause", "--api-socket", s(&sock)]);
    // Running → snapshot refused; paused → written.
    let last = *ticks(&serial).last().unwrap();
    client_ok(&[
        "snapshot",
        "create",
        "--dir",
        s(snap),
        "--api-socket",
        s(&sock),
    ]);
    let again = client(&[
        "snapshot",
        "create",
        "--dir",
        s(snap),
        "--api-socket",
        s(&sock),
    ]);
    assert_ne!(again.code, Some(0));
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    // The original dies hard: the snapshot must stand on its own.
    let _ = vm.0.kill();
    let _ = vm.0.wait();
    assert!(snap.join("state.json").exists() && snap.join("memory.bin").exists());
    last
}

fn restore_and_check(dir: &Scratch, snap: &Path, last: (u64, u64), mode: &str) {
    let serial = dir.path(&format!("b-{mode}.log"));
    let backend = format!("file:{}", s(&serial));
    let r = run_with_timeout(
        &tern(),
        &[
            "run",
            "--restore",
            s(snap),
            "--restore-mode",
            mode,
            "--serial",
            &backend,
        ],
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(0), "restore: {}", r.stderr);
    let t = ticks(&serial);
    assert!(!t.is_empty(), "no tick after the restore");
    assert_eq!(
        t[0].0,
        last.0 + 1,
        "the counter did not resume at the next tick: {t:?}"
    );
    assert!(
        t[0].1 > last.1,
        "the value went back: {last:?} then {:?}",
        t[0]
    );
    for w in t.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "gap: {w:?}");
        assert!(w[1].1 > w[0].1);
    }
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.contains("probe: count ok"), "{text}");
}

#[test]
fn a_counting_guest_survives_snapshot_kill_and_restore() {
    if !require_kvm("a_counting_guest_survives_snapshot_kill_and_restore") {
        return;
    }
    let dir = Scratch::new("survive");
    let snap = dir.path("snap");
    let last = counting_vm_snapshot(&dir, "1", &snap);
    restore_and_check(&dir, &snap, last, "eager");
    // The same snapshot restores again (clones start from the same point), here with the
    // memory file mapped copy-on-write; the file itself must not change.
    let before = std::fs::read(snap.join("memory.bin")).unwrap();
    restore_and_check(&dir, &snap, last, "lazy");
    assert!(
        std::fs::read(snap.join("memory.bin")).unwrap() == before,
        "a lazy restore wrote to the snapshot's memory file"
    );
}

#[test]
fn a_two_vcpu_guest_survives_too() {
    if !require_kvm("a_two_vcpu_guest_survives_too") {
        return;
    }
    let dir = Scratch::new("smp");
    let snap = dir.path("snap");
    let last = counting_vm_snapshot(&dir, "2", &snap);
    restore_and_check(&dir, &snap, last, "lazy");
}

#[test]
fn restore_paused_then_resume() {
    if !require_kvm("restore_paused_then_resume") {
        return;
    }
    let dir = Scratch::new("paused");
    let snap = dir.path("snap");
    let last = counting_vm_snapshot(&dir, "1", &snap);
    let sock = dir.path("b.sock");
    let serial = dir.path("b.log");
    let backend = format!("file:{}", s(&serial));
    let _vm = spawn(&[
        "--restore",
        s(&snap),
        "--paused",
        "--serial",
        &backend,
        "--api-socket",
        s(&sock),
    ]);
    wait_socket(&sock);
    let info = client(&["info", "--api-socket", s(&sock)]);
    assert!(info.stdout.contains("state: paused"), "{}", info.stdout);
    std::thread::sleep(Duration::from_millis(500));
    assert!(ticks(&serial).is_empty(), "ticks while paused");
    client_ok(&["resume", "--api-socket", s(&sock)]);
    wait_until("a tick after resume", Duration::from_secs(10), || {
        !ticks(&serial).is_empty()
    });
    assert_eq!(ticks(&serial)[0].0, last.0 + 1);
}

/// A resume sent the moment the API answers, before any vCPU of the paused restore parked:
/// the device workers the restore paused must run again (the guest's next disk request is
/// answered and its scenario ends well).
#[test]
fn a_resume_right_after_a_paused_restore_resumes_the_devices() {
    if !require_kvm("a_resume_right_after_a_paused_restore_resumes_the_devices") {
        return;
    }
    use api::client::call;
    let dir = Scratch::new("paused-resume");
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", s(&disk));
    let snap = dir.path("snap");
    let last = counting_vm_snapshot_with(
        &dir,
        "1",
        &snap,
        &["--disk", &disk_arg, "--transport", "mmio"],
        "probe.count_blk=1 probe.count_ms=2000",
    );
    for round in 0..6 {
        let sock = dir.path(&format!("r{round}.sock"));
        let serial = dir.path(&format!("r{round}.log"));
        let backend = format!("file:{}", s(&serial));
        let mut vm = spawn(&[
            "--restore",
            s(&snap),
            "--paused",
            "--serial",
            &backend,
            "--api-socket",
            s(&sock),
        ]);
        // Queued while tern still restores: handled in the VM's first main-loop turn.
        wait_until("the resume to be taken", Duration::from_secs(10), || {
            matches!(call(&sock, "PUT", "/v1/vm/resume", None), Ok((204, _)))
        });
        let (done, stderr) = wait_child(&mut vm.0, Duration::from_secs(30));
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        assert!(done, "round {round}: tern did not end: {stderr}\n{text}");
        assert!(
            text.contains("probe: count ok") && text.contains("probe: done status=0"),
            "round {round}: the guest's disk stalled after the resume: {stderr}\n{text}"
        );
        assert_eq!(ticks(&serial)[0].0, last.0 + 1, "round {round}");
    }
}

#[test]
fn damaged_snapshots_are_refused() {
    if !require_kvm("damaged_snapshots_are_refused") {
        return;
    }
    let dir = Scratch::new("damaged");
    let snap = dir.path("snap");
    counting_vm_snapshot(&dir, "1", &snap);
    let restore = |what: &str| {
        let r = run_with_timeout(
            &tern(),
            &[
                "run",
                "--restore",
                s(&snap),
                "--restore-mode",
                "eager",
                "--serial",
                "none",
            ],
            Duration::from_secs(30),
        );
        assert_eq!(r.code, Some(1), "{what}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{what}: {}", r.stderr);
        r.stderr
    };
    let mem = snap.join("memory.bin");
    let state = snap.join("state.json");
    let good_mem = std::fs::read(&mem).unwrap();
    let good_state = std::fs::read(&state).unwrap();

    let mut bad = good_mem.clone();
    bad[12345] ^= 0x40;
    std::fs::write(&mem, &bad).unwrap();
    assert!(restore("flipped memory bit").contains("memory.bin is corrupted"));

    std::fs::write(&mem, &good_mem[..good_mem.len() / 2]).unwrap();
    assert!(restore("truncated memory").contains("is truncated"));
    let lazy = run_with_timeout(
        &tern(),
        &[
            "run",
            "--restore",
            s(&snap),
            "--restore-mode",
            "lazy",
            "--serial",
            "none",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(lazy.code, Some(1), "lazy, truncated: {}", lazy.stderr);
    assert!(lazy.stderr.contains("it is truncated"), "{}", lazy.stderr);
    std::fs::write(&mem, &good_mem).unwrap();

    let text = String::from_utf8(good_state.clone()).unwrap();
    assert!(text.contains("\"cpus\":1"));
    std::fs::write(&state, text.replacen("\"cpus\":1", "\"cpus\":2", 1)).unwrap();
    let e = restore("edited state");
    assert!(e.contains("state.json is corrupted"), "{e}");
    std::fs::write(&state, &good_state[..good_state.len() / 3]).unwrap();
    assert!(restore("truncated state").contains("is not a tern snapshot"));
    std::fs::write(&state, text.replacen("\"version\":3", "\"version\":99", 1)).unwrap();
    assert!(restore("other version").contains("this tern reads format 3"));
    std::fs::remove_file(&state).unwrap();
    assert!(restore("missing state").contains("cannot read"));
}

#[test]
fn snapshots_need_a_paused_vm() {
    if !require_kvm("snapshots_need_a_paused_vm") {
        return;
    }
    let dir = Scratch::new("rules");
    let sock = dir.path("a.sock");
    let _vm = spawn(&[
        "--kernel",
        s(&probe()),
        "--memory",
        "64M",
        "--serial",
        "none",
        "--cmdline",
        "probe.run=count probe.count_ms=20000",
        "--api-socket",
        s(&sock),
    ]);
    wait_socket(&sock);
    let snap = dir.path("snap");
    let r = client(&[
        "snapshot",
        "create",
        "--dir",
        s(&snap),
        "--api-socket",
        s(&sock),
    ]);
    assert!(
        r.stderr.contains("pause it first") && r.stderr.contains("409"),
        "{}",
        r.stderr
    );
    assert!(!snap.exists());
}

/// The probe writes and reads back a sector of its virtio-blk disk at every tick and keeps a
/// 16 MiB memory pattern; both go on across snapshot, kill -9 and restore, on `transport`.
fn blk_guest_survives(name: &str, transport: &str) {
    let dir = Scratch::new(name);
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", s(&disk));
    let snap = dir.path("snap");
    let last = counting_vm_snapshot_with(
        &dir,
        "1",
        &snap,
        &["--disk", &disk_arg, "--transport", transport],
        "probe.count_blk=1 probe.count_mem_mb=16",
    );
    restore_and_check(&dir, &snap, last, "lazy");
    let text = std::fs::read_to_string(dir.path("b-lazy.log")).unwrap();
    let blk: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("probe: count blk tick="))
        .collect();
    // The snapshot may fall between a tick's line and its disk line.
    assert!(
        blk.first().is_some_and(|l| {
            l.starts_with(&format!("probe: count blk tick={} ", last.0))
                || l.starts_with(&format!("probe: count blk tick={} ", last.0 + 1))
        }),
        "no disk I/O right after the restore: {text}"
    );
    assert!(
        text.contains("mem=ok") && text.contains("blk_ok="),
        "{text}"
    );
    // The last tick's sector is on the host's disk image.
    let n: u64 = blk.last().unwrap()["probe: count blk tick=".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let sector = (n % 64) as usize;
    let img = std::fs::read(&disk).unwrap();
    let got = &img[sector * 512..sector * 512 + 16];
    let mut want = (sector as u64).to_le_bytes().to_vec();
    want.extend_from_slice(&n.to_le_bytes());
    assert_eq!(got, &want[..], "sector {sector} does not hold tick {n}");
}

#[test]
fn a_guest_using_virtio_blk_over_pci_survives() {
    if !require_kvm("a_guest_using_virtio_blk_over_pci_survives") {
        return;
    }
    blk_guest_survives("blk-pci", "pci");
}

#[test]
fn a_restored_disk_keeps_the_format_probed_at_boot() {
    if !require_kvm("a_restored_disk_keeps_the_format_probed_at_boot") {
        return;
    }
    // A raw disk given without a format is probed at boot; the snapshot keeps the answer. A
    // qcow2 header (naming a host file as its backing file) written over the disk's start
    // afterwards must not make the restored VM open the disk as qcow2.
    let dir = Scratch::new("blk-probed");
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let snap = dir.path("snap");
    let last = counting_vm_snapshot_with(
        &dir,
        "1",
        &snap,
        &["--disk", &format!("path={}", s(&disk))],
        "probe.count_blk=1",
    );
    let state = std::fs::read_to_string(snap.join("state.json")).unwrap();
    assert!(state.contains(r#""probed_format":"raw""#), "{state}");
    let secret = dir.path("secret");
    std::fs::write(&secret, vec![0x77u8; 1 << 20]).unwrap();
    let header = dir.path("header.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&secret),
        "-F",
        "raw",
        s(&header),
    ]);
    let header = std::fs::read(&header).unwrap();
    let mut img = std::fs::read(&disk).unwrap();
    img[..header.len()].copy_from_slice(&header);
    std::fs::write(&disk, &img).unwrap();
    let serial = dir.path("b.log");
    let r = run_with_timeout(
        &tern(),
        &[
            "run",
            "--restore",
            s(&snap),
            "--serial",
            &format!("file:{}", s(&serial)),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(0), "restore: {}", r.stderr);
    assert!(r.stderr.contains("it stays raw"), "{}", r.stderr);
    assert_eq!(ticks(&serial)[0].0, last.0 + 1);
}

#[test]
fn a_guest_using_virtio_blk_over_mmio_survives() {
    if !require_kvm("a_guest_using_virtio_blk_over_mmio_survives") {
        return;
    }
    blk_guest_survives("blk-mmio", "mmio");
}

#[test]
fn restore_through_the_api_of_an_empty_tern() {
    if !require_kvm("restore_through_the_api_of_an_empty_tern") {
        return;
    }
    use api::client::call;
    let dir = Scratch::new("api-restore");
    let snap = dir.path("snap");
    let last = counting_vm_snapshot(&dir, "1", &snap);
    let sock = dir.path("b.sock");
    let mut vm = spawn(&["--api-socket", s(&sock)]);
    wait_socket(&sock);
    let serial = dir.path("b.log");
    let put = |body: String| call(&sock, "PUT", "/v1/vm/restore", Some(&body)).unwrap();
    // Bad requests leave tern empty and serving.
    let (st, body) = put(r#"{"dir": "/nonexistent/snap"}"#.into());
    assert_eq!(st, 400, "{body}");
    assert!(
        body.contains("cannot read /nonexistent/snap/state.json"),
        "{body}"
    );
    let (st, body) = put(format!(r#"{{"dir": "{}", "mode": "fast"}}"#, s(&snap)));
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("mode"), "{body}");
    let (st, body) = put(format!(
        r#"{{"dir": "{}", "disk_remap": {{"/no/such.img": "/x.img"}}}}"#,
        s(&snap)
    ));
    assert_eq!(st, 400, "{body}");
    assert!(
        body.contains("the snapshot has no disk /no/such.img"),
        "{body}"
    );
    let (st, body) = call(&sock, "GET", "/v1/vm", None).unwrap();
    assert_eq!(st, 200);
    assert!(body.contains(r#""state":"created""#), "{body}");
    // A good one: 204 once the VM runs.
    let (st, body) = put(format!(
        r#"{{"dir": "{}", "serial": "file:{}"}}"#,
        s(&snap),
        s(&serial)
    ));
    assert_eq!(st, 204, "{body}");
    let (_, body) = call(&sock, "GET", "/v1/vm", None).unwrap();
    assert!(body.contains(r#""state":"running""#), "{body}");
    wait_until("a tick after the restore", Duration::from_secs(10), || {
        !ticks(&serial).is_empty()
    });
    assert_eq!(ticks(&serial)[0].0, last.0 + 1);
    // One VM per tern.
    let (st, body) = put(format!(r#"{{"dir": "{}"}}"#, s(&snap)));
    assert_eq!(st, 409, "{body}");
    let status = vm.0.wait().unwrap();
    assert!(status.success(), "tern exited with {status}");
    assert!(std::fs::read_to_string(&serial)
        .unwrap()
        .contains("probe: count ok"));
}

/// Eight clones restored at once from one snapshot of a guest doing disk I/O, each with its
/// own copy of the disk (`--disk-remap`): each goes on from the snapshot, writes only its own
/// copy and sees a VM generation ID of its own; the original image stays as it was.
#[test]
fn eight_clones_run_from_one_snapshot() {
    if !require_kvm("eight_clones_run_from_one_snapshot") {
        return;
    }
    let dir = Scratch::new("clones");
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", s(&disk));
    let snap = dir.path("snap");
    let last = counting_vm_snapshot_with(
        &dir,
        "1",
        &snap,
        &["--disk", &disk_arg],
        "probe.count_blk=1 probe.count_mem_mb=8 probe.count_gen=1",
    );
    let original = std::fs::read(&disk).unwrap();
    let mut generations = std::collections::BTreeSet::new();
    let clones: Vec<_> = (0..8)
        .map(|i| {
            let copy = dir.path(&format!("clone{i}.raw"));
            std::fs::copy(&disk, &copy).unwrap();
            let log = dir.path(&format!("clone{i}.log"));
            let remap = format!("{}={}", s(&disk), s(&copy));
            let serial = format!("file:{}", s(&log));
            let child = Command::new(tern())
                .args([
                    "run",
                    "--restore",
                    s(&snap),
                    "--disk-remap",
                    &remap,
                    "--serial",
                    &serial,
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start tern");
            (Tern(child), copy, log)
        })
        .collect();
    for (i, (mut t, copy, log)) in clones.into_iter().enumerate() {
        let out = wait_child(&mut t.0, Duration::from_secs(60));
        assert!(out.0, "clone {i} did not exit 0: {}", out.1);
        let text = std::fs::read_to_string(&log).unwrap();
        let t = ticks(&log);
        assert_eq!(
            t.first().map(|t| t.0),
            Some(last.0 + 1),
            "clone {i}: {text}"
        );
        assert!(
            text.contains("probe: count ok") && text.contains("mem=ok"),
            "clone {i}: {text}"
        );
        assert_ne!(
            std::fs::read(&copy).unwrap(),
            original,
            "clone {i} did not write its own disk"
        );
        let generation = text
            .lines()
            .rfind(|l| l.starts_with("probe: count generation="))
            .unwrap_or_else(|| panic!("clone {i} printed no generation ID: {text}"))
            .to_string();
        generations.insert(generation);
    }
    assert!(
        std::fs::read(&disk).unwrap() == original,
        "a clone wrote the original disk image"
    );
    assert_eq!(
        generations.len(),
        8,
        "clones share a generation ID: {generations:?}"
    );
}

/// The IDs of every complete `probe: count generation=<hex>` line of a serial file.
fn generations(serial: &Path) -> Vec<String> {
    lines_after(serial, "probe: count generation=")
}

/// A VM restored from a snapshot gets a new VM generation ID: the probe reads it where the
/// DSDT says it is, and `GET /v1/vm` reports the same. Two clones of one snapshot have IDs
/// different from the original's and from each other's.
#[test]
fn each_restore_gets_a_new_generation_id() {
    if !require_kvm("each_restore_gets_a_new_generation_id") {
        return;
    }
    use api::client::call;
    let dir = Scratch::new("vmgenid");
    let snap = dir.path("snap");
    let last = counting_vm_snapshot_with(&dir, "1", &snap, &[], "probe.count_gen=1");
    let original = generations(&dir.path("a.log"));
    assert_eq!(
        original.len(),
        1,
        "the original VM's ID changed while it ran: {original:?}"
    );
    let is_id = |g: &str| g.len() == 32 && g.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(is_id(&original[0]), "{original:?}");
    let mut seen = original;
    for i in 0..2 {
        let sock = dir.path(&format!("clone{i}.sock"));
        let log = dir.path(&format!("clone{i}.log"));
        let backend = format!("file:{}", s(&log));
        let mut vm = spawn(&[
            "--restore",
            s(&snap),
            "--serial",
            &backend,
            "--api-socket",
            s(&sock),
        ]);
        wait_socket(&sock);
        wait_until(
            "the clone to see its generation ID",
            Duration::from_secs(10),
            || !generations(&log).is_empty(),
        );
        let id = generations(&log).remove(0);
        assert!(is_id(&id), "clone {i}: {id}");
        let (st, body) = call(&sock, "GET", "/v1/vm", None).unwrap();
        assert_eq!(st, 200, "{body}");
        assert!(
            body.contains(&format!(r#""generation_id":"{id}""#)),
            "clone {i}: the guest read {id}, the API says {body}"
        );
        let (ok, stderr) = wait_child(&mut vm.0, Duration::from_secs(30));
        assert!(ok, "clone {i} did not exit 0: {stderr}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            ticks(&log).first().map(|t| t.0),
            Some(last.0 + 1),
            "clone {i}: {text}"
        );
        assert!(
            text.contains("probe: count ok") && text.contains("gen_changes=1"),
            "clone {i}: {text}"
        );
        assert_eq!(generations(&log).len(), 1, "clone {i}: {text}");
        assert!(
            !seen.contains(&id),
            "clone {i} has generation ID {id}, as an earlier VM: {seen:?}"
        );
        seen.push(id);
    }
}

/// Waits for `child` (killed after `timeout`); (exited 0, its stderr).
fn wait_child(child: &mut Child, timeout: Duration) -> (bool, String) {
    use std::io::Read;
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status.is_some_and(|s| s.success()), err)
}

/// tern killed with SIGKILL while writing a snapshot leaves no snapshot (only a temporary
/// directory, which the next snapshot to that name removes); the next snapshot is whole.
#[test]
fn kill_9_during_a_snapshot_leaves_no_snapshot() {
    if !require_kvm("kill_9_during_a_snapshot_leaves_no_snapshot") {
        return;
    }
    let dir = Scratch::new("kill9");
    let boot = |name: &str| {
        let sock = dir.path(&format!("{name}.sock"));
        let vm = spawn(&[
            "--kernel",
            s(&probe()),
            "--memory",
            "1G",
            "--serial",
            "none",
            "--cmdline",
            "probe.run=count probe.count_ms=60000",
            "--api-socket",
            s(&sock),
        ]);
        wait_socket(&sock);
        client_ok(&["pause", "--api-socket", s(&sock)]);
        (vm, sock)
    };
    let snap = dir.path("snap");
    let (mut vm, sock) = boot("a");
    let pid = vm.0.id();
    let tmp = dir.path(&format!(".snap.tmp-{pid}"));
    let writer = {
        let (sock, snap) = (sock.clone(), snap.clone());
        std::thread::spawn(move || {
            client(&[
                "snapshot",
                "create",
                "--dir",
                s(&snap),
                "--api-socket",
                s(&sock),
            ])
        })
    };
    // The memory file exists only while the snapshot is written: tens of milliseconds for a
    // guest that is mostly holes, so it is looked for every millisecond.
    let t0 = std::time::Instant::now();
    while !std::fs::metadata(tmp.join("memory.bin")).is_ok_and(|m| m.len() > 0) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "timed out waiting for the snapshot's memory file"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.0.kill().unwrap();
    let _ = vm.0.wait();
    let r = writer.join().unwrap();
    assert_ne!(
        r.code,
        Some(0),
        "the snapshot request succeeded: {}",
        r.stdout
    );
    assert!(
        !snap.exists(),
        "a snapshot appeared although tern was killed"
    );
    let refused = run_with_timeout(
        &tern(),
        &["run", "--restore", s(&snap), "--serial", "none"],
        Duration::from_secs(20),
    );
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    // A new tern writes the snapshot whole and clears the dead one's leftovers.
    let (_vm2, sock2) = boot("b");
    client_ok(&[
        "snapshot",
        "create",
        "--dir",
        s(&snap),
        "--api-socket",
        s(&sock2),
    ]);
    assert!(
        !tmp.exists(),
        "the killed tern's temporary directory is still there"
    );
    assert_eq!(
        std::fs::metadata(snap.join("memory.bin")).unwrap().len(),
        1 << 30
    );
}

/// Allocated bytes of a file (holes excluded).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Diff snapshots: a full snapshot, then two diffs (each over the previous one) of a guest
/// that keeps a 16 MiB memory pattern, logs every tick in memory and does virtio-blk I/O at
/// every tick (so the device's writes to guest memory must be in the diffs too). Each diff holds a small
/// part of the memory; restoring the newest layers all three (lazy and eager) and the guest
/// finds every tick it logged, across all three snapshots; restoring the middle one goes on
/// from its own point. A diff whose parent is gone is refused.
#[test]
fn diff_snapshots_layer_over_their_parents() {
    if !require_kvm("diff_snapshots_layer_over_their_parents") {
        return;
    }
    let dir = Scratch::new("diff");
    let sock = dir.path("a.sock");
    let serial = dir.path("a.log");
    let backend = format!("file:{}", s(&serial));
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", s(&disk));
    let mut vm = spawn(&[
        "--kernel",
        s(&probe()),
        "--memory",
        "64M",
        "--serial",
        &backend,
        "--cmdline",
        "probe.run=count probe.count_ms=6000 probe.count_mem_mb=16 probe.count_blk=1",
        "--disk",
        &disk_arg,
        "--track-dirty-pages",
        "--api-socket",
        s(&sock),
    ]);
    wait_socket(&sock);
    let snap = |name: &str, diff: bool, min_ticks: usize| {
        wait_until("ticks", Duration::from_secs(20), || {
            ticks(&serial).len() >= min_ticks
        });
        client_ok(&["pause", "--api-socket", s(&sock)]);
        let last = *ticks(&serial).last().unwrap();
        let d = dir.path(name);
        let mut args = vec![
            "snapshot",
            "create",
            "--dir",
            s(&d),
            "--api-socket",
            s(&sock),
        ];
        if diff {
            args.push("--diff");
        }
        client_ok(&args);
        client_ok(&["resume", "--api-socket", s(&sock)]);
        (d, last)
    };
    let (full, _) = snap("full", false, 3);
    let (d1, last1) = snap("diff1", true, 6);
    let (d2, last2) = snap("diff2", true, 9);
    let _ = vm.0.kill();
    let _ = vm.0.wait();
    let full_size = allocated(&full.join("memory.bin"));
    for d in [&d1, &d2] {
        let diff_size = allocated(&d.join("memory.bin"));
        assert!(
            diff_size * 8 < full_size,
            "{}: a diff snapshot holds {diff_size} bytes of memory, the full one {full_size}",
            d.display()
        );
        assert_eq!(
            std::fs::metadata(d.join("memory.bin")).unwrap().len(),
            64 << 20
        );
    }
    restore_and_check(&dir, &d2, last2, "lazy");
    restore_and_check(&dir, &d2, last2, "eager");
    let text = std::fs::read_to_string(dir.path("b-eager.log")).unwrap();
    assert!(
        text.contains("mem=ok") && text.contains("devlog=ok"),
        "{text}"
    );
    std::fs::rename(dir.path("b-lazy.log"), dir.path("b-lazy-2.log")).unwrap();
    restore_and_check(&dir, &d1, last1, "lazy");
    // Without its parent, a diff cannot be restored.
    std::fs::rename(&full, dir.path("moved")).unwrap();
    let r = run_with_timeout(
        &tern(),
        &["run", "--restore", s(&d2), "--serial", "none"],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("parent snapshot"), "{}", r.stderr);
}

#[test]
fn diff_snapshots_need_tracking_and_an_earlier_snapshot() {
    if !require_kvm("diff_snapshots_need_tracking_and_an_earlier_snapshot") {
        return;
    }
    let dir = Scratch::new("diff-rules");
    for (tracking, want) in [
        (false, "needs a VM that tracks dirty pages"),
        (true, "take a full snapshot first"),
    ] {
        let sock = dir.path("a.sock");
        let kernel = probe();
        let mut args = vec![
            "--kernel",
            s(&kernel),
            "--memory",
            "64M",
            "--serial",
            "none",
            "--cmdline",
            "probe.run=count probe.count_ms=20000",
            "--api-socket",
            s(&sock),
        ];
        if tracking {
            args.push("--track-dirty-pages");
        }
        let mut vm = spawn(&args);
        wait_socket(&sock);
        client_ok(&["pause", "--api-socket", s(&sock)]);
        let snap = dir.path("snap");
        let r = client(&[
            "snapshot",
            "create",
            "--diff",
            "--dir",
            s(&snap),
            "--api-socket",
            s(&sock),
        ]);
        assert!(r.stderr.contains(want), "{}", r.stderr);
        assert!(!snap.exists());
        let _ = vm.0.kill();
        let _ = vm.0.wait();
        let _ = std::fs::remove_file(&sock);
    }
}

/// A clone gets the TAP `--tap-remap` names instead of the snapshot's, and keeps the MAC the
/// guest had; a remap of a TAP the snapshot does not have is refused, naming the ones it has.
#[test]
fn a_clone_gets_its_own_tap() {
    if !require_kvm("a_clone_gets_its_own_tap") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            !in_ci(),
            "a_clone_gets_its_own_tap needs root (TAP devices) under CI=true"
        );
        eprintln!("\n*** SKIPPED a_clone_gets_its_own_tap: needs root to create TAP devices ***\n");
        return;
    }
    let dir = Scratch::new("tap-remap");
    let snap = dir.path("snap");
    let tap_a = format!("tsa{}", std::process::id() % 100_000);
    let tap_b = format!("tsb{}", std::process::id() % 100_000);
    let net = format!("tap={tap_a}");
    counting_vm_snapshot_with(&dir, "1", &snap, &["--net", &net], "");
    let info = |extra: &[&str]| {
        let sock = dir.path("b.sock");
        let _ = std::fs::remove_file(&sock);
        let mut args = vec!["--restore", s(&snap), "--serial", "none", "--paused"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--api-socket", s(&sock)]);
        let _vm = spawn(&args);
        wait_socket(&sock);
        let (st, body) = api::client::call(&sock, "GET", "/v1/vm", None).unwrap();
        assert_eq!(st, 200, "{body}");
        body
    };
    let original = info(&[]);
    let remap = format!("{tap_a}={tap_b}");
    let clone = info(&["--tap-remap", &remap]);
    assert!(clone.contains(&format!(r#""taps":["{tap_b}"]"#)), "{clone}");
    let mac = |body: &str| {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["config"]["nets"][0]["mac"].clone()
    };
    assert!(
        original.contains(&format!(r#""taps":["{tap_a}"]"#)),
        "{original}"
    );
    assert!(!mac(&clone).is_null(), "{clone}");
    let r = run_with_timeout(
        &tern(),
        &[
            "run",
            "--restore",
            s(&snap),
            "--tap-remap",
            "nope=x",
            "--serial",
            "none",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("the snapshot has no TAP nope (it has: {tap_a})")),
        "{}",
        r.stderr
    );
}

/// FNV-1a over 64-bit little-endian words, then the remaining bytes (the snapshot's
/// checksum).
fn fnv(data: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut words = data.chunks_exact(8);
    let mut h = words.by_ref().fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
        (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(PRIME)
    });
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    h
}

/// `state.json` text with its checksum (the last field) recomputed after an edit, the way
/// someone who crafts a snapshot would.
fn resign(text: &str) -> String {
    let i = text.rfind("\"state_fnv\":").expect("state_fnv");
    let unsigned = format!("{}\"state_fnv\":0}}", &text[..i]);
    format!("{}\"state_fnv\":{}}}", &text[..i], fnv(unsigned.as_bytes()))
}

/// `text` with the number after the first `key` replaced by `f(number)`.
fn edit_number(text: &str, key: &str, f: impl Fn(u64) -> u64) -> String {
    let i = text
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in state.json"))
        + key.len();
    let end = i + text[i..].find(|c: char| !c.is_ascii_digit()).unwrap();
    let n: u64 = text[i..end].parse().unwrap();
    format!("{}{}{}", &text[..i], f(n), &text[end..])
}

/// Snapshot files, and the serial and console logs tern creates, are readable by their
/// owner only whatever the umask.
#[test]
fn snapshot_files_and_logs_are_private() {
    if !require_kvm("snapshot_files_and_logs_are_private") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: umask only sets this process's file-creation mask (inherited by the tern it
    // starts); 022 is the usual one, under which files used to be world-readable.
    unsafe { libc::umask(0o022) };
    let dir = Scratch::new("private");
    let snap = dir.path("snap");
    let console = dir.path("c.log");
    let console_arg = format!("file:{}", s(&console));
    counting_vm_snapshot_with(&dir, "1", &snap, &["--console", &console_arg], "");
    for f in [
        dir.path("a.log"),
        console,
        snap.join("state.json"),
        snap.join("memory.bin"),
    ] {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", f.display());
    }
    let mode = std::fs::metadata(&snap).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the snapshot directory has mode {mode:o}");
}

/// A snapshot whose state.json was crafted (its checksum recomputed) is refused in one line
/// when its configuration is invalid (`tern run --restore` and `PUT /v1/vm/restore` alike),
/// when a device's accepted features are not offered, or when the RTC's index is out of range.
#[test]
fn crafted_snapshots_are_refused() {
    if !require_kvm("crafted_snapshots_are_refused") {
        return;
    }
    use api::client::call;
    let dir = Scratch::new("crafted");
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", s(&disk));
    let snap = dir.path("snap");
    counting_vm_snapshot_with(
        &dir,
        "1",
        &snap,
        &["--disk", &disk_arg],
        "probe.count_blk=1",
    );
    let state = snap.join("state.json");
    let good = std::fs::read_to_string(&state).unwrap();
    assert_eq!(
        resign(&good),
        good,
        "the test's checksum differs from tern's"
    );
    // Every case is tried; the problems are reported together.
    let mut problems: Vec<String> = Vec::new();
    let mut restore = |what: &str, want: &str| {
        let r = run_with_timeout(
            &tern(),
            &["run", "--restore", s(&snap), "--serial", "none"],
            Duration::from_secs(30),
        );
        if r.code != Some(1) || r.stderr.trim().lines().count() != 1 || !r.stderr.contains(want) {
            problems.push(format!(
                "{what}: exit {:?}, wanted 1 and one line with '{want}': {}",
                r.code, r.stderr
            ));
        }
    };

    let huge = resign(&edit_number(&good, "\"shutdown_timeout\":", |_| u64::MAX));
    std::fs::write(&state, &huge).unwrap();
    restore(
        "shutdown_timeout",
        "state.json: the snapshot's configuration is invalid: invalid shutdown_timeout '18446744073709551615'",
    );

    let features = resign(&edit_number(&good, "\"driver_features\":", |f| {
        assert_ne!(f, 0, "the probe's driver accepted no features");
        f | 1 << 50
    }));
    std::fs::write(&state, &features).unwrap();
    restore(
        "driver features",
        "include bits 0x4000000000000 the device does not offer",
    );

    let rtc = resign(&edit_number(
        &good,
        "\"id\":\"rtc\",\"version\":1,\"state\":{\"index\":",
        |_| 0xff,
    ));
    std::fs::write(&state, &rtc).unwrap();
    restore("RTC index", "RTC: saved CMOS index 0xff is out of range");

    // PCI slots out of range, or two devices in one slot.
    let slots_at = good
        .find("\"pci_slots\":{")
        .expect("pci_slots in state.json");
    let (head, tail) = good.split_at(slots_at);
    let disk_slot = |v: u64| resign(&format!("{head}{}", edit_number(tail, "\"disk0\":", |_| v)));
    std::fs::write(&state, disk_slot(0)).unwrap();
    restore(
        "PCI slot 0",
        "state.json: the snapshot's configuration is invalid: invalid pci_slots 'disk0=0': PCI \
         slots for devices are 1 to 31",
    );
    std::fs::write(&state, disk_slot(40)).unwrap();
    restore("PCI slot 40", "invalid pci_slots 'disk0=40'");
    let key = tail.find("\"disk0\":").expect("disk0's PCI slot") + "\"disk0\":".len();
    let slot: u64 = tail[key..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a slot number");
    let shared = tail.replacen(
        "\"pci_slots\":{",
        &format!("\"pci_slots\":{{\"aaa\":{slot},"),
        1,
    );
    std::fs::write(&state, resign(&format!("{head}{shared}"))).unwrap();
    restore(
        "two devices in a PCI slot",
        &format!("invalid pci_slots 'disk0={slot}': aaa is in that slot"),
    );

    // Over 16 MiB: refused before it is read whole.
    std::fs::write(&state, &good).unwrap();
    let f = std::fs::File::options().write(true).open(&state).unwrap();
    f.set_len(64 << 20).unwrap();
    restore("huge state.json", "state.json is larger than 16 MiB");

    // The invalid configuration through the API of an empty tern, which stays empty and
    // serving.
    std::fs::write(&state, &huge).unwrap();
    let sock = dir.path("b.sock");
    let mut vm = spawn(&["--api-socket", s(&sock)]);
    wait_socket(&sock);
    let body = format!(r#"{{"dir": "{}", "serial": "none"}}"#, s(&snap));
    let (st, answer) = call(&sock, "PUT", "/v1/vm/restore", Some(&body)).unwrap();
    if st != 400 || !answer.contains("invalid shutdown_timeout") {
        problems.push(format!("API restore: HTTP {st}: {answer}"));
    } else {
        let (st, answer) = call(&sock, "GET", "/v1/vm", None).unwrap();
        assert!(
            st == 200 && answer.contains(r#""state":"created""#),
            "{answer}"
        );
    }
    let _ = vm.0.kill();
    let _ = vm.0.wait();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The memory file under a lazily restored VM is truncated: the guest touching memory it
/// lost, or tern reading it (a snapshot), ends tern with one line naming the file instead
/// of a silent death by SIGBUS.
#[test]
fn a_memory_file_truncated_under_a_lazy_restore_is_named() {
    if !require_kvm("a_memory_file_truncated_under_a_lazy_restore_is_named") {
        return;
    }
    use api::client::call;
    let dir = Scratch::new("truncated");
    let good = dir.path("good");
    counting_vm_snapshot_with(&dir, "1", &good, &[], "probe.count_mem_mb=16");
    for (i, how) in ["the guest runs", "a snapshot reads it"].iter().enumerate() {
        let snap = dir.path(&format!("snap{i}"));
        std::fs::create_dir(&snap).unwrap();
        for f in ["state.json", "memory.bin"] {
            std::fs::copy(good.join(f), snap.join(f)).unwrap();
        }
        let sock = dir.path(&format!("t{i}.sock"));
        let serial = format!("file:{}", s(&dir.path(&format!("t{i}.log"))));
        let mut vm = spawn(&[
            "--restore",
            s(&snap),
            "--restore-mode",
            "lazy",
            "--paused",
            "--serial",
            &serial,
            "--api-socket",
            s(&sock),
        ]);
        wait_socket(&sock);
        wait_until("the restored VM", Duration::from_secs(20), || {
            call(&sock, "GET", "/v1/vm", None).is_ok_and(|(_, b)| b.contains(r#""state":"paused""#))
        });
        let mem = snap.join("memory.bin");
        std::fs::File::options()
            .write(true)
            .open(&mem)
            .unwrap()
            .set_len(0)
            .unwrap();
        // The answer may not make it: tern can stop before its API thread writes it.
        if i == 0 {
            let _ = call(&sock, "PUT", "/v1/vm/resume", None);
        } else {
            let body = format!(r#"{{"dir": "{}"}}"#, s(&dir.path("again")));
            let _ = call(&sock, "PUT", "/v1/vm/snapshot", Some(&body));
        }
        let t0 = std::time::Instant::now();
        let status = loop {
            if let Some(st) = vm.0.try_wait().unwrap() {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{how}: tern did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut vm.0.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "{how}: {status}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{how}: {stderr}");
        assert!(
            stderr.contains(&format!("guest memory mapped from {} ", mem.display()))
                && stderr.contains("truncated or shrunk"),
            "{how}: {stderr}"
        );
    }
}

/// tern stopping on a truncated memory file (from its SIGBUS handler) puts a terminal it set
/// to raw mode back as it was.
#[test]
fn a_truncated_memory_file_leaves_the_terminal_as_it_was() {
    if !require_kvm("a_truncated_memory_file_leaves_the_terminal_as_it_was") {
        return;
    }
    use api::client::call;
    use std::os::fd::{FromRawFd, OwnedFd};
    let dir = Scratch::new("truncated-tty");
    let snap = dir.path("snap");
    counting_vm_snapshot(&dir, "1", &snap);
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given integers; the other arguments may
    // be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and ours.
    let (_master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let canonical = |fd: &OwnedFd| {
        use std::os::fd::AsRawFd;
        // SAFETY: termios is plain data that tcgetattr fills.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and termios.
        assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
        t.c_lflag & libc::ICANON != 0
    };
    assert!(canonical(&slave));
    let sock = dir.path("t.sock");
    let mut vm = Tern(
        Command::new(tern())
            .args([
                "run",
                "--restore",
                s(&snap),
                "--paused",
                "--serial",
                "stdio",
                "--api-socket",
                s(&sock),
            ])
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tern"),
    );
    wait_socket(&sock);
    wait_until("the restored VM", Duration::from_secs(20), || {
        call(&sock, "GET", "/v1/vm", None).is_ok_and(|(_, b)| b.contains(r#""state":"paused""#))
    });
    assert!(
        !canonical(&slave),
        "tern did not put the terminal in raw mode"
    );
    std::fs::File::options()
        .write(true)
        .open(snap.join("memory.bin"))
        .unwrap()
        .set_len(0)
        .unwrap();
    // A snapshot reads every page of guest memory. It is asked again each second until tern
    // stops (a loaded host may answer the first before the restored vCPUs have parked).
    let t0 = std::time::Instant::now();
    let mut answers = Vec::new();
    let status = loop {
        if let Some(st) = vm.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "tern did not stop; snapshot answers: {answers:?}"
        );
        if answers.len() as u64 <= t0.elapsed().as_secs() {
            let again = dir.path(&format!("again-{}", answers.len()));
            let body = format!(r#"{{"dir": "{}"}}"#, s(&again));
            answers.push(call(&sock, "PUT", "/v1/vm/snapshot", Some(&body)));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(canonical(&slave), "tern left the terminal in raw mode");
}

/// A snapshot written by the last tern that wrote snapshot format 2 (commit 7190234; see the
/// README inside `tests/fixtures/snapshot-format2.tar.gz`) still restores, with both memory
/// modes, and its guest runs on: its counter resumes at the next tick, the memory it filled,
/// the sectors it wrote and the pages only its disk wrote are intact, and it gets a new VM
/// generation ID. A snapshot restores only on a CPU of the vendor it was taken on, so there
/// is one fixture per vendor (AMD: `snapshot-format2.tar.gz`; Intel:
/// `snapshot-format2-intel.tar.gz`), taken the same way.
#[test]
fn a_format_2_snapshot_still_restores_and_runs_on() {
    if !require_kvm("a_format_2_snapshot_still_restores_and_runs_on") {
        return;
    }
    let dir = Scratch::new("format2");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = if cpuinfo.contains("GenuineIntel") {
        "snapshot-format2-intel.tar.gz"
    } else {
        assert!(
            cpuinfo.contains("AuthenticAMD"),
            "no format-2 fixture for this host's CPU vendor"
        );
        "snapshot-format2.tar.gz"
    };
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let out = Command::new("tar")
        .args(["-xzf", s(&fixture), "-C", s(&dir.path(""))])
        .output()
        .expect("run tar");
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = dir.path("snapshot-format2");
    let snap = root.join("snap");
    let before = ticks(&root.join("serial-before.log"));
    let last = *before.last().expect("ticks before the snapshot");
    for mode in ["eager", "lazy"] {
        let disk = dir.path(&format!("disk-{mode}.raw"));
        std::fs::copy(root.join("disk.raw"), &disk).unwrap();
        let remap = format!("/tmp/fx/disk.raw={}", s(&disk));
        let serial = dir.path(&format!("serial-{mode}.log"));
        let backend = format!("file:{}", s(&serial));
        let console = format!("file:{}", s(&dir.path(&format!("console-{mode}.log"))));
        let r = run_with_timeout(
            &tern(),
            &[
                "run",
                "--restore",
                s(&snap),
                "--restore-mode",
                mode,
                "--disk-remap",
                &remap,
                "--serial",
                &backend,
                "--console",
                &console,
            ],
            Duration::from_secs(60),
        );
        assert_eq!(r.code, Some(0), "restore ({mode}): {}", r.stderr);
        let t = ticks(&serial);
        assert_eq!(
            t.first().map(|t| t.0),
            Some(last.0 + 1),
            "({mode}) the counter did not resume at the next tick: {t:?}"
        );
        let text = std::fs::read_to_string(&serial).unwrap();
        let ok = text
            .lines()
            .find(|l| l.starts_with("probe: count ok"))
            .unwrap_or_else(|| panic!("({mode}) no final line: {text}"));
        for want in ["mem=ok", "devlog=ok", "gen_changes=1"] {
            assert!(ok.contains(want), "({mode}) {want} missing: {ok}");
        }
        assert!(text.contains("probe: done status=0"), "({mode}) {text}");
    }
}
