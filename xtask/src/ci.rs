//! `cargo xtask test` (everything CI runs) and `cargo xtask demo` (build tern, boot a guest).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util::{apt_install, build_dir, workspace_root};

/// Debian packages the tests need on the host (e2fsprogs: `mkfs.ext4 -d` builds the virtio-blk
/// disk image, and its `debugfs`/`e2fsck` and qemu-utils' `qemu-img` check disks inside L1;
/// iproute2's `ip` builds the network scenarios' bridge and TAPs inside L1; seabios is the PC
/// BIOS of the QEMU peer's `-M pc` Debian boots; mmdebstrap builds the Debian guest; gdb takes
/// the L0 emulator's thread backtraces when L1 freezes; grub-common, grub-pc-bin,
/// grub-efi-amd64-bin, fdisk's `sfdisk`, dosfstools and mtools build the firmware-bootable
/// Debian disk — GRUB for BIOS and UEFI, its GPT and its FAT ESP without loop devices — and
/// ovmf is the UEFI firmware that boots it; python3-prometheus-client is Prometheus' own
/// text-format parser, which reads `GET /metrics` in the tests, systemd's
/// `systemd-analyze verify` checks the shipped unit template, python3-venv holds
/// pyrecracker, a Firecracker client from PyPI that drives tern's Firecracker API, and dbus,
/// python3-dbus and python3-gi give the machined test a real message bus and a service on
/// it, and systemd-container boots this host's Debian as a container with systemd, journald
/// and systemd-machined, where the shipped unit runs a VM).
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "gdb",
    "seabios",
    "mmdebstrap",
    "busybox-static",
    "e2fsprogs",
    "qemu-utils",
    "iproute2",
    "grub-common",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "fdisk",
    "dosfstools",
    "mtools",
    "ovmf",
    "python3-prometheus-client",
    "systemd",
    "python3-venv",
    "dbus",
    "python3-dbus",
    "python3-gi",
    "systemd-container",
];

/// A third-party Firecracker client from PyPI. It declares Python 3.12 or later, but its
/// code runs on Debian's 3.11, so it is installed with `--ignore-requires-python`.
const PYRECRACKER: &str = "pyrecracker==0.6.4";

/// A venv under `build/` with [`PYRECRACKER`]; its Python.
fn ensure_pyrecracker() -> Result<PathBuf> {
    let venv = build_dir().join("venv-pyrecracker");
    let python = venv.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", "import pyrecracker.client"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready() {
        return Ok(python);
    }
    let _ = std::fs::remove_dir_all(&venv);
    check(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv),
        "python3 -m venv",
    )?;
    check(
        Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--ignore-requires-python",
            PYRECRACKER,
        ]),
        "pip install pyrecracker",
    )?;
    if !ready() {
        bail!(
            "pyrecracker was installed in {} but does not import",
            venv.display()
        );
    }
    Ok(python)
}

/// Fuzzing time per target in `cargo xtask test`: with the instrumented build, the fuzz step
/// stays within about four minutes.
const FUZZ_SECONDS: u64 = 5;

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    if in_ci() {
        // A clean clone builds once: incremental state would only take disk.
        c.env("CARGO_INCREMENTAL", "0");
    }
    c
}

fn step(name: &str) {
    println!("\n==> {name}{}", free_space());
}

/// Free space where the build goes, as `(N GiB free)`: a CI machine with a small disk fails
/// with "No space left on device" somewhere inside cargo, and this line says why.
fn free_space() -> String {
    let Ok(path) = std::ffi::CString::new(workspace_root().as_os_str().as_encoded_bytes()) else {
        return String::new();
    };
    // SAFETY: statvfs only writes the zeroed struct it is given; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return String::new();
    }
    let free = st.f_bavail as f64 * st.f_frsize as f64 / f64::from(1u32 << 30);
    format!(" ({free:.1} GiB free)")
}

/// Whether this is a CI run (`CI=true`).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn ensure_packages() -> Result<()> {
    let missing = || -> Vec<&str> {
        PACKAGES
            .iter()
            .copied()
            .filter(|p| {
                !Command::new("dpkg-query")
                    .args(["-W", "-f=${Status}", p])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                    .unwrap_or(false)
            })
            .collect()
    };
    // Twice: installing one package can remove another (Debian's qemu-system-x86 removes a
    // qemu-utils of another QEMU version that a machine came with), which the second round
    // puts back at the matching version.
    for _ in 0..2 {
        let m = missing();
        if m.is_empty() {
            return Ok(());
        }
        println!("installing Debian packages: {}", m.join(" "));
        apt_install(&m)?;
    }
    let m = missing();
    if !m.is_empty() {
        bail!(
            "Debian packages still missing after installing them: {}",
            m.join(" ")
        );
    }
    Ok(())
}

fn check(cmd: &mut Command, what: &str) -> Result<()> {
    let st = cmd.status().with_context(|| format!("cannot run {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

/// Builds tern (release) and returns its path (under `$CARGO_TARGET_DIR` when set).
pub fn build_tern() -> Result<PathBuf> {
    check(
        cargo().args(["build", "--release", "-p", "tern"]),
        "cargo build --release -p tern",
    )?;
    Ok(crate::util::release_tern())
}

/// Builds the probe guest and returns its path.
pub fn build_probe() -> Result<PathBuf> {
    let dir = workspace_root().join("guests/probe");
    check(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release"])
            .current_dir(&dir)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS"),
        "building the probe guest",
    )?;
    Ok(dir.join("target/x86_64-unknown-linux-gnu/release/probe"))
}

/// Runs a cargo test command, echoing its output and adding up its "test result" lines.
fn cargo_test(
    args: &[&str],
    env: &[(&str, &Path)],
    passed: &mut u64,
    failed: &mut u64,
) -> Result<bool> {
    let mut cmd = cargo();
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("cannot run cargo test")?;
    let out = child.stdout.take().context("stdout")?;
    for line in BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |key: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok.")
                            .trim_start_matches("FAILED.")
                            .trim()
                            .strip_suffix(key)
                            .map(|n| n.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0)
            };
            *passed += num("passed");
            *failed += num("failed");
        }
    }
    Ok(child.wait()?.success())
}

/// `cargo xtask test`: packages, formatting and lints, unit and end-to-end tests on /dev/kvm,
/// and the Linux-guest scenarios in the nested rig.
pub fn test(skip_rig: bool) -> Result<()> {
    let ci = in_ci();
    step("packages");
    ensure_packages()?;
    if ci
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
    {
        bail!("CI=true but /dev/kvm cannot be opened: the probe-guest tests and the rig need it");
    }
    step("format and lints");
    check(
        cargo().args(["fmt", "--all", "--check"]),
        "cargo fmt --check",
    )?;
    check(
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        "cargo clippy",
    )?;
    step("build");
    let tern = build_tern()?;
    let probe = build_probe()?;
    let pyrecracker = ensure_pyrecracker()?;

    let (mut passed, mut failed) = (0u64, 0u64);
    step("unit and end-to-end tests (host /dev/kvm)");
    // Every tern the tests start runs with its seccomp filters on (the default) and copies
    // each violation line here.
    std::fs::create_dir_all(build_dir())?;
    let violations_file = build_dir().join("seccomp-violations.log");
    let _ = std::fs::remove_file(&violations_file);
    let ok = cargo_test(
        &["test", "--workspace", "--no-fail-fast"],
        &[
            ("TERN_PROBE", &probe),
            ("TERN_SECCOMP_REPORT", &violations_file),
            ("TERN_PYRECRACKER_PYTHON", &pyrecracker),
        ],
        &mut passed,
        &mut failed,
    )?;
    let mut violations: Vec<String> = std::fs::read_to_string(&violations_file)
        .unwrap_or_default()
        .lines()
        .map(|l| format!("host tests: {l}"))
        .collect();

    step("fuzz targets (regression inputs, then a few seconds each)");
    let fuzz_ok = crate::fuzz::run(&crate::fuzz::FuzzOptions {
        target: None,
        seconds: FUZZ_SECONDS,
        runs: None,
    })
    .map_err(|e| println!("{e:#}"))
    .is_ok();
    if ci {
        // The instrumented build is not reused by a clean clone; its disk goes back now.
        let _ = std::fs::remove_dir_all(build_dir().join("fuzz-target"));
    }

    let mut rig_ok = true;
    if !skip_rig {
        step("Linux guests in the nested rig");
        let opts = crate::rig::RigOptions::new(tern.clone(), None);
        let run = crate::rig::rig_run(&opts, "core", None)?;
        let f = run.results.iter().filter(|r| !r.pass).count() as u64;
        passed += run.results.len() as u64 - f;
        failed += f;
        rig_ok = f == 0;
        println!("rig: {}", run.freeze_summary());
        violations.extend(run.seccomp_violations.iter().cloned());
        if run.tern_froze_more() {
            println!("rig: FAIL: L1 froze at least twice during tern runs, more often per run than during QEMU runs");
            rig_ok = false;
        }
    }
    for v in &violations {
        println!("{v}");
    }
    println!("seccomp violations: {}", violations.len());
    println!("\ntests: {passed} passed, {failed} failed{}", free_space());
    if !ok || !fuzz_ok || !rig_ok || failed > 0 || !violations.is_empty() {
        bail!("some tests failed");
    }
    Ok(())
}

/// `cargo xtask demo`: builds tern and boots the Debian guest — directly on a hardware-KVM
/// host (interactive shell), or inside the nested rig on an emulation-backed one.
pub fn demo() -> Result<()> {
    ensure_packages()?;
    let tern = build_tern()?;
    let imgs = crate::images::build()?;
    let hardware = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm")))
        })
        .unwrap_or(false)
        && !Path::new("/sys/module/kvm_pvm").exists();
    if hardware {
        println!(
            "This host has hardware virtualization: booting the Debian guest directly with tern."
        );
        println!("You get the guest's shell; `poweroff -f` or Ctrl-A x ends it.\n");
        let st = Command::new(&tern)
            .args(["run", "--kernel"])
            .arg(&imgs.vmlinuz_cloud)
            .arg("--initrd")
            .arg(&imgs.guest_initrd)
            .args([
                "--cpus",
                "2",
                "--memory",
                "512M",
                "--cmdline",
                "console=ttyS0 reboot=k panic=1 rig.action=shell",
            ])
            .status()?;
        if !st.success() {
            bail!("tern exited with {st}");
        }
        return Ok(());
    }
    println!(
        "This host's /dev/kvm is emulation-backed (no vmx/svm, or kvm_pvm): a stock kernel cannot"
    );
    println!("boot on it. Booting the same Debian guest with tern inside the nested rig instead");
    println!("(QEMU emulating an AMD-V machine with kvm-amd); the guest's console follows.\n");
    crate::rig::demo(&crate::rig::RigOptions::new(tern, None))
}
