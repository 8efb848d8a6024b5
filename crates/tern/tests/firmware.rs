//! Firmware boots on the host's /dev/kvm: Debian's SeaBIOS (`--firmware bios`) boots a disk
//! through its master boot record. The boot sector here is 60 bytes of real-mode code: it reads
//! the disk's second sector with BIOS `int 13h` into 0x7e00, prints its text on COM1 and
//! leaves through tern's debug-exit port with the status its first byte holds (0x22 when the
//! read failed). SeaBIOS's serial console shares COM1, so the text is compared with line ends
//! and SeaBIOS's dots taken out. Real Linux
//! distributions booted by GRUB through BIOS run in the nested rig (`cargo xtask rig`).
//!
//! SeaBIOS comes from Debian's `seabios` package: without it these tests fail under CI=true
//! and skip loudly elsewhere.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    in_ci, listening, require_kvm, run_with_timeout, s, spawn, tern, wait_until, Run, Scratch,
};

/// The boot sector's code (82 bytes; GNU as, `.code16`, linked at 0x7c00):
/// ```text
///     cli; xor %ax,%ax; mov %ax,%ds; mov %ax,%es; mov %ax,%ss; mov $0x7c00,%sp; sti
///     mov $0x0201,%ax; mov $2,%cx; xor %dh,%dh; mov $0x7e00,%bx; int $0x13   # read sector 2
///     jc fail; mov 0x7e00,%bl; mov $0x7e01,%si; jmp print       # status, then the text
/// fail: mov $msg_fail,%si; mov $0x22,%bl
/// print: mov $0x3f8,%dx; cld
/// 1:  lodsb; test %al,%al; jz 2f; out %al,%dx; jmp 1b
/// 2:  mov %bl,%al; out %al,$0xf4                                       # tern's debug exit
/// 3:  hlt; jmp 3b
/// msg_fail: .asciz "TERN-MBR-READ-FAILED\n"
/// ```
const BOOT_SECTOR: &[u8] = &[
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x7c, 0xfb, 0xb8, 0x01, 0x02,
    0xb9, 0x02, 0x00, 0x30, 0xf6, 0xbb, 0x00, 0x7e, 0xcd, 0x13, 0x72, 0x09, 0x8a, 0x1e, 0x00, 0x7e,
    0xbe, 0x01, 0x7e, 0xeb, 0x05, 0xbe, 0x3d, 0x7c, 0xb3, 0x22, 0xba, 0xf8, 0x03, 0xfc, 0xac, 0x84,
    0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8, 0x88, 0xd8, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd, 0x54, 0x45, 0x52,
    0x4e, 0x2d, 0x4d, 0x42, 0x52, 0x2d, 0x52, 0x45, 0x41, 0x44, 0x2d, 0x46, 0x41, 0x49, 0x4c, 0x45,
    0x44, 0x0a,
];
/// A second boot sector, the ticker: prints `TICKER-READY`, then a `+` every 9 BIOS timer ticks
/// (about half a second; it sleeps with `hlt` between the PIT's interrupts, counted by SeaBIOS
/// at 0x46c), and after 12 of them `TICKER-DONE` and exit status 0x21.
/// ```text
///     (set-up as above); mov $0x3f8,%dx; mov $msg_ready,%si; call print; xor %cx,%cx
/// next: mov 0x46c,%bx; add $9,%bx
/// wait: hlt; mov 0x46c,%ax; sub %bx,%ax; js wait
///     mov $'+',%al; out %al,%dx; inc %cx; cmp $12,%cx; jb next
///     mov $msg_done,%si; call print; mov $0x21,%al; out %al,$0xf4
/// 1:  hlt; jmp 1b
/// print: cld; 2: lodsb; test %al,%al; jz 3f; out %al,%dx; jmp 2b; 3: ret
/// msg_ready: .asciz "TICKER-READY\n"; msg_done: .asciz "\nTICKER-DONE\n"
/// ```
const TICKER: &[u8] = &[
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x7c, 0xfb, 0xba, 0xf8, 0x03,
    0xbe, 0x47, 0x7c, 0xe8, 0x27, 0x00, 0x31, 0xc9, 0x8b, 0x1e, 0x6c, 0x04, 0x83, 0xc3, 0x09, 0xf4,
    0xa1, 0x6c, 0x04, 0x29, 0xd8, 0x78, 0xf8, 0xb0, 0x2b, 0xee, 0x41, 0x83, 0xf9, 0x0c, 0x72, 0xe8,
    0xbe, 0x55, 0x7c, 0xe8, 0x07, 0x00, 0xb0, 0x21, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd, 0xfc, 0xac, 0x84,
    0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8, 0xc3, 0x54, 0x49, 0x43, 0x4b, 0x45, 0x52, 0x2d, 0x52, 0x45,
    0x41, 0x44, 0x59, 0x0a, 0x00, 0x0a, 0x54, 0x49, 0x43, 0x4b, 0x45, 0x52, 0x2d, 0x44, 0x4f, 0x4e,
    0x45, 0x0a,
];

/// Exit statuses the disks' second sectors hold.
const BOOTED: u8 = 0x21;
const FIRST: u8 = 0x31;
const SECOND: u8 = 0x32;
const T: Duration = Duration::from_secs(60);

/// True when SeaBIOS is installed; otherwise fails under CI=true and skips loudly elsewhere.
fn require_seabios(test: &str) -> bool {
    if !require_kvm(test) {
        return false;
    }
    if api::firmware::Firmware::Bios.image().is_ok() {
        return true;
    }
    if in_ci() {
        panic!("{test}: SeaBIOS (Debian package seabios) is required under CI=true");
    }
    eprintln!("\n*** SKIPPED {test}: SeaBIOS is not installed (Debian package seabios) ***\n");
    false
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tern-fw-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A 1 MiB raw disk: the boot sector, and in sector 2 the exit `status` and `text` (or all
/// zeroes, no boot sector).
fn disk(dir: &Path, name: &str, message: Option<(u8, &str)>) -> PathBuf {
    let mut d = vec![0u8; 1 << 20];
    if let Some((status, text)) = message {
        d[..BOOT_SECTOR.len()].copy_from_slice(BOOT_SECTOR);
        d[510] = 0x55;
        d[511] = 0xaa;
        d[512] = status;
        d[513..513 + text.len()].copy_from_slice(text.as_bytes());
    }
    let p = dir.join(name);
    std::fs::write(&p, d).unwrap();
    p
}

/// The console without line ends and dots, which SeaBIOS's serial console may print in the
/// middle of the boot sector's text.
fn console(r: &Run) -> String {
    r.stdout.replace(['\r', '\n', '.'], "")
}

fn run(args: &[&str]) -> Run {
    let mut a = vec!["run", "--firmware", "bios", "--memory", "128M"];
    a.extend_from_slice(args);
    run_with_timeout(&tern(), &a, T)
}

/// The last line of tern's stderr (a warning about an emulation-backed /dev/kvm may come
/// first), checked to be tern's one-line error naming `needle`.
fn last_line_error(r: &Run, needle: &str) {
    assert!(!r.timed_out, "timed out; stderr: {}", r.stderr);
    assert_ne!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("tern: ") && last.contains(needle),
        "'{last}' does not mention '{needle}'; stderr: {}",
        r.stderr
    );
}

#[test]
fn bios_boots_the_master_boot_record_of_a_virtio_pci_disk() {
    if !require_seabios("bios_boots_the_master_boot_record_of_a_virtio_pci_disk") {
        return;
    }
    let dir = scratch("mbr");
    let raw = disk(
        &dir,
        "boot.raw",
        Some((BOOTED, "TERN-MBR-OK from sector 2\n")),
    );
    // As raw and as qcow2, with one and two vCPUs (SeaBIOS wakes the second one itself).
    let qcow2 = dir.join("boot.qcow2");
    let converted = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .is_ok_and(|s| s.success());
    let mut disks = vec![format!("path={}", raw.display())];
    if converted {
        disks.push(format!("path={},format=qcow2", qcow2.display()));
    } else {
        assert!(!in_ci(), "qemu-img is needed under CI=true");
        eprintln!("*** qemu-img missing: the qcow2 case is skipped ***");
    }
    for d in &disks {
        for cpus in ["1", "2"] {
            let r = run(&["--cpus", cpus, "--disk", d, "--log-level", "firmware=info"]);
            assert_eq!(
                r.code,
                Some(i32::from(BOOTED)),
                "{d}, {cpus} vCPUs: stdout: {}\nstderr: {}",
                r.stdout,
                r.stderr
            );
            assert!(
                console(&r).contains("TERN-MBR-OK from sector 2"),
                "{}",
                r.stdout
            );
            // SeaBIOS found the disk through fw_cfg's boot order and every vCPU through ACPI
            // and its own start-up IPIs.
            assert!(
                r.stderr.contains("found virtio-blk at 00:01.0"),
                "{}",
                r.stderr
            );
            assert!(
                r.stderr.contains(&format!("Found {cpus} cpu(s)")),
                "{}",
                r.stderr
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bios_boots_the_first_disk_in_their_order() {
    if !require_seabios("bios_boots_the_first_disk_in_their_order") {
        return;
    }
    let dir = scratch("order");
    let blank = disk(&dir, "blank.raw", None);
    let first = disk(&dir, "first.raw", Some((FIRST, "TERN-FIRST-DISK\n")));
    let second = disk(&dir, "second.raw", Some((SECOND, "TERN-SECOND-DISK\n")));
    let arg = |p: &Path| format!("path={}", p.display());
    // The first disk in the order given boots.
    for (disks, want) in [
        (vec![&first, &second], FIRST),
        (vec![&second, &first], SECOND),
    ] {
        let mut a: Vec<String> = Vec::new();
        for d in disks {
            a.push("--disk".into());
            a.push(arg(d));
        }
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let r = run(&refs);
        assert_eq!(
            r.code,
            Some(i32::from(want)),
            "{a:?}: {}\n{}",
            r.stdout,
            r.stderr
        );
        let text = if want == FIRST {
            "TERN-FIRST-DISK"
        } else {
            "TERN-SECOND-DISK"
        };
        assert!(console(&r).contains(text), "{a:?}: {}", r.stdout);
    }
    // Like a PC BIOS, SeaBIOS boots hard disks as one class: the first one, drive 0x80. A
    // first disk without a boot sector does not pass on to the second.
    let r = run(&["--disk", &arg(&blank), "--disk", &arg(&second)]);
    assert!(console(&r).contains("not a bootable disk"), "{}", r.stdout);
    last_line_error(&r, "the firmware found no bootable device");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_bootable_disk_is_one_line_not_a_hang() {
    if !require_seabios("no_bootable_disk_is_one_line_not_a_hang") {
        return;
    }
    let dir = scratch("noboot");
    let blank = disk(&dir, "blank.raw", None);
    let disk_arg = format!("path={}", blank.display());
    for args in [vec![], vec!["--disk", disk_arg.as_str()]] {
        let r = run(&args);
        last_line_error(&r, "the firmware found no bootable device");
        // SeaBIOS would retry after 60 s; tern stops at its first "No bootable device".
        assert!(r.elapsed < Duration::from_secs(30), "{:?}", r.elapsed);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_firmware_gets_one_line() {
    if !require_kvm("bad_firmware_gets_one_line") {
        return;
    }
    let dir = scratch("bad");
    let zeros = dir.join("zeros.bin");
    std::fs::write(&zeros, vec![0u8; 256 << 10]).unwrap();
    let short = dir.join("short.bin");
    std::fs::write(&short, vec![0xeau8; 1000]).unwrap();
    let missing = dir.join("missing.bin");
    let one_line = |args: &[&str], needle: &str| {
        let mut a = vec!["run", "--memory", "128M"];
        a.extend_from_slice(args);
        let r = run_with_timeout(&tern(), &a, T);
        assert_eq!(r.code, Some(1), "{args:?}: {}", r.stderr);
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {lines:?}");
        assert!(
            lines[0].starts_with("tern: ") && lines[0].contains(needle),
            "{lines:?}"
        );
    };
    let p = |p: &Path| p.display().to_string();
    one_line(&["--firmware", &p(&zeros)], "it has no x86 reset vector");
    one_line(
        &["--firmware", &p(&short)],
        "1000 bytes is not a firmware image size",
    );
    one_line(&["--firmware", &p(&missing)], "missing.bin");
    one_line(
        &["--firmware", "bios", "--uefi-vars", &p(&zeros)],
        "UEFI variables are for --firmware uefi",
    );
    if Path::new(OVMF_VARS).exists() {
        // A variable file of another size than OVMF's store.
        one_line(
            &["--firmware", "uefi", "--uefi-vars", &p(&short)],
            "1000 bytes, but OVMF's variable store",
        );
    }
    one_line(
        &["--firmware", "bios", "--kernel", &p(&zeros)],
        "give --kernel or --firmware, not both",
    );
    one_line(
        &["--firmware", "bios", "--cmdline", "quiet"],
        "cmdline is for a kernel tern boots",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 1 MiB disk whose boot sector is the ticker.
fn ticker_disk(dir: &Scratch) -> PathBuf {
    let img = dir.path("ticker.raw");
    let mut d = vec![0u8; 1 << 20];
    d[..TICKER.len()].copy_from_slice(TICKER);
    d[510] = 0x55;
    d[511] = 0xaa;
    std::fs::write(&img, d).unwrap();
    img
}

/// The ticker booted by SeaBIOS from `img`, its console in `serial`, its API on `sock`.
fn ticker(img: &Path, serial: &Path, sock: &Path) -> common::Tern {
    let disk = format!("path={}", s(img));
    let backend = format!("file:{}", s(serial));
    spawn(&[
        "--firmware",
        "bios",
        "--memory",
        "128M",
        "--disk",
        &disk,
        "--serial",
        &backend,
        "--api-socket",
        s(sock),
    ])
}

/// A firmware-booted guest, paused in its bootloader's code between two timer interrupts,
/// survives snapshot, kill and restore: it goes on ticking where it was (no second SeaBIOS
/// banner, fewer than 12 ticks after the restore) and finishes.
#[test]
fn a_firmware_booted_guest_survives_snapshot_and_restore() {
    if !require_seabios("a_firmware_booted_guest_survives_snapshot_and_restore") {
        return;
    }
    let dir = Scratch::new("fw-snapshot");
    let img = ticker_disk(&dir);
    let (sock, serial, snap) = (dir.path("a.sock"), dir.path("a.log"), dir.path("snap"));
    let mut vm = ticker(&img, &serial, &sock);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let ticks = |p: &Path| read(p).matches('+').count();
    wait_until("3 ticks", T, || ticks(&serial) >= 3);
    let client = |args: &[&str]| {
        let r = run_with_timeout(&tern(), args, Duration::from_secs(20));
        assert_eq!(r.code, Some(0), "tern {args:?}: {}{}", r.stdout, r.stderr);
    };
    client(&["pause", "--api-socket", s(&sock)]);
    let before = ticks(&serial);
    client(&[
        "snapshot",
        "create",
        "--dir",
        s(&snap),
        "--api-socket",
        s(&sock),
    ]);
    let _ = vm.0.kill();
    let _ = vm.0.wait();
    assert!(before < 12, "the ticker finished before the snapshot");

    let restored = dir.path("b.log");
    let backend = format!("file:{}", s(&restored));
    let r = run_with_timeout(
        &tern(),
        &["run", "--restore", s(&snap), "--serial", &backend],
        T,
    );
    let text = read(&restored);
    assert_eq!(r.code, Some(0x21), "restore: {}\n{text}", r.stderr);
    assert!(text.contains("TICKER-DONE"), "{text}");
    assert!(
        !text.contains("SeaBIOS") && !text.contains("READY"),
        "{text}"
    );
    assert_eq!(ticks(&restored), 12 - before, "{text}");
}

/// The ticker, booted by SeaBIOS, migrates live to another tern and finishes there: the source
/// exits 0, and the ticks of both add up to the 12 the guest prints in all (the destination
/// maps its own SeaBIOS and puts the BARs where the firmware moved them).
#[test]
fn a_firmware_booted_guest_migrates() {
    if !require_seabios("a_firmware_booted_guest_migrates") {
        return;
    }
    let dir = Scratch::new("fw-migrate");
    let img = ticker_disk(&dir);
    let (sock, a, b) = (dir.path("a.sock"), dir.path("a.log"), dir.path("b.log"));
    let url = format!("unix:{}", s(&dir.path("m.sock")));
    let dst_serial = format!("file:{}", s(&b));
    let mut dst = listening(&url, &["--serial", &dst_serial, "--accept-dir", s(&dir.0)]);
    let src = ticker(&img, &a, &sock);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let ticks = |p: &Path| read(p).matches('+').count();
    wait_until("2 ticks", T, || ticks(&a) >= 2);
    let r = run_with_timeout(
        &tern(),
        &["migrate", "--api-socket", s(&sock), "--to", &url],
        T,
    );
    assert_eq!(r.code, Some(0), "migrate: {}{}", r.stdout, r.stderr);
    let (code, err) = src.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "source: {err}");
    assert!(dst.running(), "the destination does not run the VM");
    let (code, err) = dst.finish(T);
    let there = read(&b);
    assert_eq!(code, Some(0x21), "destination: {err}\n{there}");
    assert!(
        there.contains("TICKER-DONE") && !there.contains("SeaBIOS"),
        "{there}"
    );
    assert_eq!(ticks(&a) + ticks(&b), 12, "{}\n---\n{there}", read(&a));
}

/// OVMF's variable store template (Debian's `ovmf`).
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// `--uefi-vars` names a file that does not exist yet: tern makes it, mode 0600, a copy of
/// OVMF's template, before the VM starts, and leaves an existing one as it is. (OVMF itself
/// does not run on emulation-backed `/dev/kvm`: its SEC phase stops at an x87 instruction that
/// host cannot emulate, so the VM ends there; the nested rig's `tern-debian-uefi` boots it.)
#[test]
fn a_uefi_variable_file_is_made_from_the_template() {
    use std::os::unix::fs::PermissionsExt;
    if !require_kvm("a_uefi_variable_file_is_made_from_the_template") {
        return;
    }
    if !Path::new(OVMF_VARS).exists() {
        assert!(
            std::env::var("CI").is_err(),
            "OVMF ({OVMF_VARS}) is missing: CI installs Debian's ovmf"
        );
        eprintln!("SKIP a_uefi_variable_file_is_made_from_the_template: {OVMF_VARS} missing");
        return;
    }
    let dir = scratch("uefivars");
    let vars = dir.join("vm-vars.fd");
    let a = [
        "run",
        "--memory",
        "128M",
        "--firmware",
        "uefi",
        "--uefi-vars",
    ];
    let mut args = a.to_vec();
    let vp = vars.display().to_string();
    args.push(&vp);
    let _ = run_with_timeout(&tern(), &args, T);
    let made = std::fs::read(&vars).expect("the variable file was not made");
    assert_eq!(made, std::fs::read(OVMF_VARS).unwrap());
    let mode = std::fs::metadata(&vars).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        std::fs::read_dir(&dir).unwrap().count() == 1,
        "temporary file left behind"
    );
    // An empty file (as `tern jail` makes one) is filled from the template.
    std::fs::write(&vars, b"").unwrap();
    let _ = run_with_timeout(&tern(), &args, T);
    assert_eq!(std::fs::read(&vars).unwrap(), made);
    // An existing file is kept as it is (its contents are the VM's variables).
    let mut mine = made.clone();
    mine[100] ^= 0xff;
    std::fs::write(&vars, &mine).unwrap();
    let _ = run_with_timeout(&tern(), &args, T);
    assert_eq!(std::fs::read(&vars).unwrap()[100], mine[100]);
    let _ = std::fs::remove_dir_all(&dir);
}
