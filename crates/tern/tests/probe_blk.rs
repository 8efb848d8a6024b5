//! tern's virtio-blk against the probe's ring-3 driver (guests/probe, scenarios `vblk` and
//! `vblkhostile`) on both transports, raw and qcow2 images, read-only disks, `cache=none` and
//! synchronous I/O; the host checks every sector the guest wrote. The same scenarios run under
//! QEMU once, so the driver is known to be right on another VMM too.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Seed the probe mixes into every sector (`probe.vblk_seed`'s default, "tern").
const SEED: u64 = 0x7465_726e;
const DISK_SIZE: u64 = 16 << 20;

fn num(fields: &HashMap<String, String>, key: &str) -> u64 {
    let v = fields
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {fields:?}"));
    v.parse()
        .unwrap_or_else(|_| panic!("{key}={v} is not a number"))
}

/// The 512 bytes `vblk` writes to sector `s` (see guests/probe/README.md).
fn pattern(s: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..8].copy_from_slice(&s.to_le_bytes());
    b[8..16].copy_from_slice(&SEED.to_le_bytes());
    for (i, x) in b.iter_mut().enumerate().skip(16) {
        *x = (s as u8) ^ (i as u8);
    }
    b
}

/// Fails unless every sector of `data` carries the probe's pattern.
fn check_pattern(data: &[u8]) {
    assert_eq!(data.len() as u64 % 512, 0);
    let bad: Vec<usize> = data
        .chunks(512)
        .enumerate()
        .filter(|(s, c)| *c != pattern(*s as u64))
        .map(|(s, _)| s)
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} sectors differ from the pattern, first {:?}",
        bad.len(),
        data.len() / 512,
        &bad[..bad.len().min(8)]
    );
}

/// Files of one test, removed when dropped.
struct Scratch(Vec<PathBuf>);

impl Scratch {
    fn new() -> Self {
        Scratch(Vec::new())
    }

    fn path(&mut self, name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tern-blk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        self.0.push(p.clone());
        p
    }

    /// A raw image of `size` bytes filled with `byte`.
    fn raw(&mut self, name: &str, size: u64, byte: u8) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, vec![byte; size as usize]).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn assert_ok(r: &Run) {
    assert!(!r.timed_out, "timed out\n{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("probe: done status=0") && r.code == Some(0),
        "exit {:?}\n{}\n{}",
        r.code,
        r.stdout,
        r.stderr
    );
}

/// A loop device over `file`, detached when dropped.
struct Loop(String);

impl Loop {
    /// Attaches `file`; None (after failing under CI=true, or saying so loudly) when this
    /// machine cannot (not root, no losetup or loop driver).
    fn attach(test: &str, file: &Path) -> Option<Loop> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let out = root.then(|| {
            std::process::Command::new("losetup")
                .args(["--find", "--show", s(file)])
                .output()
        });
        let why = match out {
            Some(Ok(o)) if o.status.success() => {
                return Some(Loop(String::from_utf8_lossy(&o.stdout).trim().to_string()))
            }
            None => "not root".to_string(),
            Some(Ok(o)) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Some(Err(e)) => format!("losetup: {e}"),
        };
        assert!(
            !in_ci(),
            "{test}: cannot make a loop device under CI=true: {why}"
        );
        eprintln!("\n*** SKIPPED {test}: cannot make a loop device ({why}) ***\n");
        None
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// Runs `vblk` on a fresh raw disk with `opts` and checks the report and the file.
fn integrity(transport: &str, opts: &str, extra: &[&str]) {
    integrity_on(transport, opts, extra, false);
}

/// [`integrity`], with the disk given to tern as a loop device over the file when `on_loop`.
fn integrity_on(transport: &str, opts: &str, extra: &[&str], on_loop: bool) {
    let mut tmp = Scratch::new();
    let img = tmp.raw(
        &format!("{transport}{}.raw", opts.replace([',', '='], "-")),
        DISK_SIZE,
        0xee,
    );
    let dev = if on_loop {
        match Loop::attach("blk_integrity_on_a_loop_device", &img) {
            Some(l) => Some(l),
            None => return,
        }
    } else {
        None
    };
    let path = dev.as_ref().map_or(s(&img), |l| l.0.as_str());
    let disk = format!("path={path},serial=probe-disk-1{opts}");
    let mut flags = vec![
        "--memory",
        "128M",
        "--transport",
        transport,
        "--disk",
        &disk,
    ];
    flags.extend_from_slice(extra);
    let r = probe_run("vblk", "", &flags);
    assert_ok(&r);
    let g = r.scenario("vblk");
    assert_eq!(num(&g, "devices"), 1, "{g:?}");
    assert_eq!(num(&g, "capacity"), DISK_SIZE / 512, "{g:?}");
    assert_eq!(g["serial"], "probe-disk-1", "{g:?}");
    assert_eq!(num(&g, "ro"), 0, "{g:?}");
    assert_eq!(num(&g, "sectors_written"), DISK_SIZE / 512, "{g:?}");
    assert_eq!(num(&g, "sectors_verified"), DISK_SIZE / 512, "{g:?}");
    assert_eq!(num(&g, "mismatches"), 0, "{g:?}");
    assert_eq!(g["write_zeroes"], "ok", "{g:?}");
    assert_eq!(g["discard"], "ok", "{g:?}");
    check_pattern(&std::fs::read(&img).unwrap());
}

#[test]
fn blk_integrity_over_mmio() {
    if !require_kvm("blk_integrity_over_mmio") {
        return;
    }
    integrity("mmio", "", &[]);
}

#[test]
fn blk_integrity_over_pci() {
    if !require_kvm("blk_integrity_over_pci") {
        return;
    }
    integrity("pci", "", &[]);
}

#[test]
fn blk_integrity_with_cache_none_and_synchronous_io() {
    if !require_kvm("blk_integrity_with_cache_none_and_synchronous_io") {
        return;
    }
    integrity("pci", ",cache=none,io=sync", &[]);
    integrity("mmio", ",cache=none", &[]);
}

/// A host block device (a loop device over the image) as the disk: its size from the
/// device, discard and write-zeroes through its ioctls, with and without the page cache.
#[test]
fn blk_integrity_on_a_loop_device() {
    if !require_kvm("blk_integrity_on_a_loop_device") {
        return;
    }
    integrity_on("pci", ",format=raw", &[], true);
    integrity_on("pci", ",format=raw,cache=none", &[], true);
}

#[test]
fn blk_multiqueue_device_with_one_queue_in_use() {
    if !require_kvm("blk_multiqueue_device_with_one_queue_in_use") {
        return;
    }
    // The probe drives queue 0 only; the device must run with the queues the driver enabled.
    integrity("pci", ",queues=4", &["--cpus", "2"]);
}

#[test]
fn blk_qcow2_overlay_keeps_its_base() {
    if !require_kvm("blk_qcow2_overlay_keeps_its_base") {
        return;
    }
    let mut tmp = Scratch::new();
    let base = tmp.raw("base.raw", DISK_SIZE, 0x5a);
    let overlay = tmp.path("overlay.qcow2");
    let flat = tmp.path("flat.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&overlay),
    ]);
    let disk = format!("path={},format=qcow2,serial=probe-disk-1", s(&overlay));
    let r = probe_run(
        "vblk",
        "probe.vblk_chunk=262144",
        &["--memory", "128M", "--transport", "mmio", "--disk", &disk],
    );
    assert_ok(&r);
    let g = r.scenario("vblk");
    assert_eq!(num(&g, "mismatches"), 0, "{g:?}");
    assert_eq!(num(&g, "sectors_verified"), DISK_SIZE / 512, "{g:?}");
    assert_eq!(
        std::fs::read(&base).unwrap(),
        vec![0x5a; DISK_SIZE as usize],
        "the base image changed"
    );
    qemu_img(&["check", "-q", s(&overlay)]);
    qemu_img(&["convert", "-O", "raw", s(&overlay), s(&flat)]);
    check_pattern(&std::fs::read(&flat).unwrap());
}

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn blk_read_only_disk_refuses_writes() {
    if !require_kvm("blk_read_only_disk_refuses_writes") {
        return;
    }
    let mut tmp = Scratch::new();
    let img = tmp.path("ro.raw");
    let content: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&img, &content).unwrap();
    let disk = format!("path={},readonly=on", s(&img));
    let r = probe_run("vblk", "", &["--memory", "64M", "--disk", &disk]);
    assert_ok(&r);
    let g = r.scenario("vblk");
    assert_eq!(num(&g, "ro"), 1, "{g:?}");
    assert_ne!(num(&g, "ro_write_status"), 0, "{g:?}");
    assert_eq!(
        g["sector0_crc"],
        format!("{:#018x}", fnv1a64(&content[..512])),
        "{g:?}"
    );
    assert_eq!(std::fs::read(&img).unwrap(), content, "the image changed");
}

fn hostile(transport: &str) {
    let mut tmp = Scratch::new();
    let img = tmp.raw(&format!("hostile-{transport}.raw"), 1 << 20, 0);
    let disk = format!("path={}", s(&img));
    let r = probe_run(
        "vblkhostile",
        "",
        &[
            "--memory",
            "128M",
            "--transport",
            transport,
            "--disk",
            &disk,
        ],
    );
    assert_ok(&r);
    let h = r.scenario("vblkhostile");
    let cases = num(&h, "cases");
    assert!(cases >= 8, "{h:?}");
    assert_eq!(num(&h, "errors"), cases, "{h:?}");
    assert_eq!(num(&h, "recovered"), cases, "{h:?}");
    // A head made available again while in flight: the device stops (and says why) rather
    // than serving it twice.
    assert_eq!(num(&h, "reposted"), num(&h, "devices"), "{h:?}");
    for line in r.stderr.lines().filter(|l| l.contains("needs a reset")) {
        assert!(
            line.contains("was made available again while still in use"),
            "a hostile request broke the device: {}",
            r.stderr
        );
    }
    assert!(r.stderr.contains("made available again"), "{}", r.stderr);
}

#[test]
fn blk_hostile_requests_over_mmio() {
    if !require_kvm("blk_hostile_requests_over_mmio") {
        return;
    }
    hostile("mmio");
}

#[test]
fn blk_hostile_requests_over_pci() {
    if !require_kvm("blk_hostile_requests_over_pci") {
        return;
    }
    hostile("pci");
}

#[test]
fn blk_probe_driver_under_qemu() {
    if !require_kvm("blk_probe_driver_under_qemu") {
        return;
    }
    let Some(qemu) = qemu("blk_probe_driver_under_qemu") else {
        return;
    };
    let mut tmp = Scratch::new();
    let img = tmp.raw("qemu.raw", DISK_SIZE, 0xee);
    let drive = format!(
        "if=none,id=d0,file={},format=raw,aio=io_uring,cache=none",
        s(&img)
    );
    let r = qemu_probe_run(
        qemu,
        "pc",
        "1",
        "probe.run=vblk",
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,serial=probe-disk-1",
        ],
    );
    assert!(
        r.stdout.contains("probe: done status=0"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let g = r.scenario("vblk");
    assert_eq!(num(&g, "mismatches"), 0, "{g:?}");
    assert_eq!(g["serial"], "probe-disk-1", "{g:?}");
    check_pattern(&std::fs::read(&img).unwrap());
}

#[test]
fn blk_bad_disks_are_one_line_errors() {
    let mut tmp = Scratch::new();
    let img = tmp.raw("locked.raw", 1 << 20, 0);
    let kernel = probe();
    let k = s(&kernel);
    let run = |disk: &str| {
        tern_run(
            &["--kernel", k, "--disk", disk],
            std::time::Duration::from_secs(20),
        )
    };

    let r = run("path=/nonexistent/disk.img");
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("cannot open disk image /nonexistent/disk.img: No such file or directory"),
        "{}",
        r.stderr
    );
    for (spec, want) in [
        ("format=raw", "missing disk path"),
        (
            &format!("path={},cache=maybe", s(&img)) as &str,
            "invalid disk cache 'maybe'",
        ),
        (
            &format!("path={},bogus=1", s(&img)),
            "invalid disk 'bogus=1'",
        ),
        (
            &format!("path={},bw=fast", s(&img)),
            "invalid disk bw 'fast'",
        ),
    ] {
        let r = run(spec);
        assert_eq!(r.code, Some(2), "{spec}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{spec}: {}", r.stderr);
    }

    // Values that parse but are out of range fail validation (status 1, like --cpus 0).
    let r = run(&format!("path={},queues=0", s(&img)));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("invalid disk queues '0': must be 1 to 16"),
        "{}",
        r.stderr
    );

    // An image another process holds is refused, naming it.
    let mut holder = Command::new("flock")
        .args(["-x", s(&img), "sleep", "20"])
        .spawn()
        .expect("flock(1) from util-linux");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = run(&format!("path={}", s(&img)));
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "disk image {} is in use by another process",
            s(&img)
        )),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
}
