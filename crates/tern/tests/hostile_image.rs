//! Hostile disk images on the real `tern` binary: an image's header must never make tern open a
//! host file the user did not name. A qcow2 header names a backing file and an external data
//! file; whoever wrote the header chose them, and a guest can write one into its own raw disk.
//! The host file each case points at is a FIFO, so that any open of it is seen: opening a FIFO
//! for reading blocks until a writer comes, and the watcher is that writer.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;

/// A FIFO standing for a host file no guest may reach, and a thread that notices whenever
/// somebody opens it for reading.
struct Tripwire {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Tripwire {
    fn new(path: PathBuf) -> Self {
        let st = Command::new("mkfifo").arg(&path).status().expect("mkfifo");
        assert!(st.success());
        let (stop, opened) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (p, st, op) = (path.clone(), stop.clone(), opened.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                // Without a reader this fails (ENXIO); with one it succeeds and frees it.
                if OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&p)
                    .is_ok()
                {
                    op.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Tripwire {
            path,
            stop,
            opened,
            thread: Some(thread),
        }
    }

    /// Whether anybody opened the FIFO so far.
    fn tripped(&self) -> bool {
        self.opened.load(Ordering::Relaxed)
    }
}

impl Drop for Tripwire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A qcow2 image of `size` whose header names `backing` (a raw file) as its backing file, made
/// against a harmless stand-in so that qemu-img itself never opens `backing`.
fn qcow2_naming(tmp: &Scratch, name: &str, backing: &Path, size: &str) -> PathBuf {
    let stand_in = tmp.path(&format!("{name}.stand-in"));
    std::fs::write(&stand_in, vec![0u8; 1 << 20]).unwrap();
    let img = tmp.path(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&stand_in),
        "-F",
        "raw",
        s(&img),
        size,
    ]);
    qemu_img(&[
        "rebase",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        s(backing),
        "-F",
        "raw",
        s(&img),
    ]);
    img
}

fn probe_disk(scenario: &str, cmdline: &str, disk: &str, extra: &[&str]) -> Run {
    let mut flags = vec!["--memory", "64M", "--disk", disk];
    flags.extend_from_slice(extra);
    probe_run(scenario, cmdline, &flags)
}

#[test]
fn an_image_given_without_a_format_opens_no_backing_file() {
    if !require_kvm("an_image_given_without_a_format_opens_no_backing_file") {
        return;
    }
    let tmp = Scratch::new("hostile-backing");
    let wire = Tripwire::new(tmp.path("host-secret"));
    let img = qcow2_naming(&tmp, "disk.img", &wire.path, "16M");
    let r = probe_disk("vblk", "", &format!("path={}", s(&img)), &[]);
    assert!(!r.timed_out, "tern hung (opening the FIFO?)\n{}", r.stderr);
    assert_eq!(r.code, Some(1), "{}\n{}", r.stdout, r.stderr);
    let lines: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| !l.contains("warning"))
        .collect();
    assert_eq!(lines.len(), 1, "one line: {}", r.stderr);
    assert!(
        lines[0].contains(s(&img))
            && lines[0].contains("names a backing file")
            && lines[0].contains(s(&wire.path))
            && lines[0].contains("format=qcow2"),
        "{}",
        r.stderr
    );
    assert!(!wire.tripped(), "tern opened the backing file");
}

#[test]
fn an_external_data_file_must_be_named_by_the_user() {
    if !require_kvm("an_external_data_file_must_be_named_by_the_user") {
        return;
    }
    let tmp = Scratch::new("hostile-datafile");
    let data = tmp.path("data.raw");
    let img = tmp.path("disk.qcow2");
    let spec = format!("data_file={},data_file_raw=on", s(&data));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &spec, s(&img), "16M"]);
    let before = std::fs::read(&data).unwrap();
    for disk in [
        format!("path={}", s(&img)),
        format!("path={},format=qcow2", s(&img)),
        format!(
            "path={},format=qcow2,data_file={}",
            s(&img),
            s(&tmp.path("other"))
        ),
    ] {
        std::fs::write(tmp.path("other"), b"").unwrap();
        let r = probe_disk("vblk", "", &disk, &[]);
        assert_eq!(r.code, Some(1), "{disk}: {}\n{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains("external data file") && r.stderr.contains(s(&data)),
            "{disk}: {}",
            r.stderr
        );
    }
    assert_eq!(
        std::fs::read(&data).unwrap(),
        before,
        "the data file changed"
    );
    // Named by the user, it is the disk's storage: the guest's pattern lands there.
    let r = probe_disk(
        "vblk",
        "probe.vblk_chunk=262144",
        &format!("path={},format=qcow2,data_file={}", s(&img), s(&data)),
        &[],
    );
    assert!(
        r.stdout.contains("probe: done status=0") && r.code == Some(0),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let written = std::fs::read(&data).unwrap();
    assert_eq!(written.len(), 16 << 20);
    assert_eq!(
        &written[8..16],
        &0x7465_726eu64.to_le_bytes(),
        "sector 0 of the data file"
    );
    // data_file without format=qcow2 is a configuration error.
    let r = probe_disk(
        "vblk",
        "",
        &format!("path={},data_file={}", s(&img), s(&data)),
        &[],
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("data_file") && r.stderr.contains("format=qcow2"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_guest_cannot_turn_its_raw_disk_into_a_qcow2_image() {
    if !require_kvm("a_guest_cannot_turn_its_raw_disk_into_a_qcow2_image") {
        return;
    }
    // The raw disk carries, at 1 MiB, a qcow2 image whose backing file is the host's FIFO. The
    // guest copies it to sector 0 and reboots: the restarted VM must see the same raw disk
    // (its own header at sector 0), not a qcow2 image reading the host file.
    let tmp = Scratch::new("hostile-guest");
    let wire = Tripwire::new(tmp.path("host-secret"));
    let header_img = qcow2_naming(&tmp, "header.qcow2", &wire.path, "1M");
    let header = std::fs::read(&header_img).unwrap();
    assert!(
        header.len() <= 256 << 10,
        "qcow2 image of {} bytes",
        header.len()
    );
    let disk = tmp.path("guest.raw");
    let mut content = vec![0u8; 4 << 20];
    content[1 << 20..(1 << 20) + header.len()].copy_from_slice(&header);
    std::fs::write(&disk, &content).unwrap();
    let fnv = header[..512]
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let r = probe_disk(
        "vblkcopy",
        "",
        &format!("path={}", s(&disk)),
        &["--on-reboot", "restart"],
    );
    assert!(!r.timed_out, "timed out\n{}\n{}", r.stdout, r.stderr);
    assert_eq!(
        r.stdout
            .matches("probe: rebooting (vblkcopy copied")
            .count(),
        1,
        "{}",
        r.stdout
    );
    let g = r.scenario("vblkcopy");
    assert_eq!(
        g.get("copied").map(String::as_str),
        Some("0"),
        "{}",
        r.stdout
    );
    assert_eq!(g["sector0_fnv"], format!("{fnv:#018x}"), "{}", r.stdout);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("it stays raw"), "{}", r.stderr);
    assert!(!wire.tripped(), "tern opened the host file the guest named");
    assert_eq!(&std::fs::read(&disk).unwrap()[..header.len()], &header[..]);
    // A new tern given the same disk without a format refuses the header's backing file.
    let r = probe_disk("vblkcopy", "", &format!("path={}", s(&disk)), &[]);
    assert_eq!(r.code, Some(1), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("names a backing file"), "{}", r.stderr);
    assert!(!wire.tripped(), "tern opened the host file the guest named");
}

#[test]
fn a_qcow2_header_the_parser_would_panic_on_is_one_line() {
    if !require_kvm("a_qcow2_header_the_parser_would_panic_on_is_one_line") {
        return;
    }
    // Found by the qcow2 fuzz target: a feature name table of 49 bytes.
    let tmp = Scratch::new("hostile-ft49");
    let img = tmp.path("ft49.qcow2");
    std::fs::write(
        &img,
        include_bytes!("../../../fuzz/regressions/qcow2/feature-name-table-of-49-bytes"),
    )
    .unwrap();
    for disk in [
        format!("path={}", s(&img)),
        format!("path={},format=qcow2", s(&img)),
    ] {
        let r = probe_disk("vblk", "", &disk, &[]);
        assert_eq!(r.code, Some(1), "{disk}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{disk}: {}", r.stderr);
        assert!(
            r.stderr.contains("feature name table is 49 bytes"),
            "{}",
            r.stderr
        );
    }
}
