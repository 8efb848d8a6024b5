//! The rig's real-distribution guest: a Debian bookworm system as users run it — systemd,
//! udev, Debian's standard kernel (`linux-image-amd64`) and its own initramfs-tools initramfs —
//! built with `mmdebstrap` into `build/images/`, cached by a stamp of its recipe.
//!
//! What it produces is one raw ext4 image, `debian-disk.ext4`, that L1 gets as a read-only
//! virtio disk and mounts at `/rig/debian`. It holds:
//! - `debian.qcow2`: the root file system (ext4 on the whole disk, no partition table), which
//!   each boot uses through its own qcow2 overlay so every boot starts from the same state;
//! - `vmlinuz` and `initrd.img`: the kernel and initramfs from the root file system's `/boot`;
//! - `debian-fw.qcow2`: the same system as a whole disk that firmware boots (GPT, GRUB for BIOS
//!   and UEFI, root by UUID), and `debian-sdboot.qcow2`, an ESP-only disk that boots it with
//!   systemd-boot instead, both built by `debian_fw.rs`.
//!
//! The system gets one unit of the rig's own, `rig-report.service`: once systemd's startup has
//! finished it prints `RIG-DEBIAN-STATE=<state of systemctl is-system-running>` (and the failed
//! units, if any) through the kernel log on the serial console and powers the machine off the
//! normal way (`systemctl poweroff`).

use crate::util::{build_dir, ensure_tool, human_bytes, run_capture, Fingerprint, Stamp};
use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump to rebuild the image when the recipe changes.
const RECIPE_VERSION: &str = "debian 2";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Packages on top of `--variant=minbase`: init, device manager, the kernel and the tools that
/// build its initramfs (minbase leaves out Recommends, so these are named).
const PACKAGES: &str = "systemd-sysv,udev,kmod,initramfs-tools,linux-image-amd64";
/// Size of the root file system (sparse; the qcow2 only holds what is written).
const ROOT_FS_MIB: u64 = 2048;

/// Paths inside L1 (the disk is mounted read-only at `/rig/debian` by `xtask/l1/init.sh`;
/// `xtask/l1/scenarios/debian.sh` uses its `debian.qcow2`).
pub mod in_l1 {
    pub const KERNEL: &str = "/rig/debian/vmlinuz";
    pub const INITRD: &str = "/rig/debian/initrd.img";
    /// The firmware-bootable disk (`debian_fw.rs`).
    pub const FW_DISK: &str = "/rig/debian/debian-fw.qcow2";
    /// The systemd-boot disk (`debian_fw.rs`), put before the firmware disk.
    pub const SDBOOT_DISK: &str = "/rig/debian/debian-sdboot.qcow2";
}

/// The line the guest prints once systemd's startup has finished.
pub const STATE_MARKER: &str = "RIG-DEBIAN-STATE=";

/// `rig-report.service`: started with multi-user.target, waits for the end of startup.
const REPORT_UNIT: &str = "\
[Unit]
Description=Tell the tern rig how the boot went, then power off
After=basic.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/rig-report

[Install]
WantedBy=multi-user.target
";

/// Writes through the kernel log (`/dev/kmsg`, at a level `quiet` still shows): the serial
/// getty hangs up every other open of `ttyS0` when it starts, so a service's own writes to the
/// TTY can be lost.
const REPORT_SCRIPT: &str = "#!/bin/sh
# Installed by the tern rig (xtask/src/debian.rs).
say() { echo \"<2>rig-report: $*\" > /dev/kmsg; }
state=$(systemctl is-system-running --wait)
# The boot loader, when it says: systemd-boot sets LoaderInfo (GRUB sets nothing). The value
# follows 4 bytes of attributes, in UTF-16; efivarfs files cannot seek, hence cat.
info=/sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f
[ -r $info ] && say \"RIG-DEBIAN-LOADER=$(cat $info | tail -c +5 | tr -d '\\000')\"
say \"RIG-DEBIAN-STATE=$state uptime=$(cut -d' ' -f1 /proc/uptime)\"
if [ \"$state\" != running ]; then
    systemctl --failed --no-legend --plain | while read -r unit rest; do
        say \"RIG-DEBIAN-FAILED-UNIT $unit $rest\"
    done
fi
systemctl poweroff
";

/// Builds (or finds cached) `build/images/debian-disk.ext4`.
pub fn build() -> Result<PathBuf> {
    let dir = build_dir().join("images");
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("debian-disk.ext4");
    let mut fp = Fingerprint::default();
    fp.str(RECIPE_VERSION)
        .str(SUITE)
        .str(MIRROR)
        .str(PACKAGES)
        .str(REPORT_UNIT)
        .str(REPORT_SCRIPT)
        .bytes(&ROOT_FS_MIB.to_le_bytes());
    crate::debian_fw::recipe(&mut fp);
    let stamp = Stamp::new(&disk, fp.hex());
    if stamp.fresh(&disk) {
        return Ok(disk);
    }
    let mmdebstrap = ensure_tool("mmdebstrap", "mmdebstrap")?;
    let mkfs = ensure_tool("mkfs.ext4", "e2fsprogs")?;
    let qemu_img = ensure_tool("qemu-img", "qemu-utils")?;

    let work = dir.join("debian.work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let root = work.join("root");
    eprintln!("[xtask] building the Debian {SUITE} guest with mmdebstrap (about a minute)");
    let started = std::time::Instant::now();
    run_capture(
        Command::new(&mmdebstrap)
            .args(["--mode=root", "--variant=minbase", "--quiet"])
            .arg(format!("--include={PACKAGES}"))
            .arg("--aptopt=Acquire::Retries \"3\"")
            .arg(SUITE)
            .arg(&root)
            .arg(MIRROR)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("mmdebstrap failed")?;
    customize(&root)?;

    // The kernel and initramfs the distribution installed.
    let boot = root.join("boot");
    let pick = |prefix: &str| -> Result<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&boot)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .collect();
        found.sort();
        found
            .pop()
            .with_context(|| format!("the Debian tree has no /boot/{prefix}*"))
    };
    let kernel = pick("vmlinuz-")?;
    let initrd = pick("initrd.img-")?;

    let outer = work.join("disk");
    std::fs::create_dir_all(&outer)?;
    std::fs::copy(&kernel, outer.join("vmlinuz"))?;
    std::fs::copy(&initrd, outer.join("initrd.img"))?;

    let root_img = work.join("root.ext4");
    mkfs_ext4(&mkfs, "debian-root", &[], &root, &root_img, ROOT_FS_MIB)
        .context("mkfs.ext4 -d of the Debian tree failed")?;
    let name = |p: &Path| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let fw = crate::debian_fw::Input {
        root: &root,
        kernel: &name(&kernel),
        initrd: &name(&initrd),
        root_mib: ROOT_FS_MIB,
        mkfs_ext4: &mkfs,
        qemu_img: &qemu_img,
    };
    let fw_started = std::time::Instant::now();
    crate::debian_fw::build(&fw, &work, &outer.join("debian-fw.qcow2"))
        .context("building the firmware-bootable Debian disk failed")?;
    crate::debian_fw::build_sdboot(&fw, &work, &outer.join("debian-sdboot.qcow2"))
        .context("building the systemd-boot disk failed")?;
    let fw_secs = fw_started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&root);
    run_capture(
        Command::new(&qemu_img)
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&root_img)
            .arg(outer.join("debian.qcow2")),
    )
    .context("qemu-img convert of the Debian root file system failed")?;
    std::fs::remove_file(&root_img)?;

    let content: u64 = std::fs::read_dir(&outer)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    // ext4 metadata and slack: an eighth more, at least 64 MiB.
    let disk_mib = (content >> 20) + ((content >> 20) / 8).max(64);
    let partial = disk.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    mkfs_ext4(&mkfs, "rig-debian", &[], &outer, &partial, disk_mib)
        .context("mkfs.ext4 -d of the rig's Debian disk failed")?;
    std::fs::rename(&partial, &disk)?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "[xtask] wrote {} ({} in {:.0}s: Debian {SUITE} qcow2 root, {}, {})",
        disk.display(),
        human_bytes(disk_mib << 20),
        started.elapsed().as_secs_f64(),
        name(&kernel),
        name(&initrd),
    );
    eprintln!(
        "[xtask]   {} (built in {fw_secs:.0}s)",
        crate::debian_fw::describe(ROOT_FS_MIB)
    );
    stamp.commit()?;
    Ok(disk)
}

/// `mkfs.ext4 -d TREE`: an ext4 file system of `mib` MiB labelled `label` holding `tree`
/// (`extra`: more options, such as `-U UUID`).
pub fn mkfs_ext4(
    mkfs: &Path,
    label: &str,
    extra: &[&str],
    tree: &Path,
    image: &Path,
    mib: u64,
) -> Result<()> {
    run_capture(
        Command::new(mkfs)
            .args(["-q", "-F", "-t", "ext4", "-L", label])
            .args(extra)
            .arg("-d")
            .arg(tree)
            .arg(image)
            .arg(format!("{mib}M")),
    )?;
    Ok(())
}

/// The rig's additions to the Debian tree: the report unit, a host name, an fstab.
fn customize(root: &Path) -> Result<()> {
    let write = |rel: &str, data: &str, mode: u32| -> Result<()> {
        let p = root.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, data).with_context(|| format!("cannot write {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    write("etc/systemd/system/rig-report.service", REPORT_UNIT, 0o644)?;
    write("usr/local/sbin/rig-report", REPORT_SCRIPT, 0o755)?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants)?;
    let link = wants.join("rig-report.service");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/systemd/system/rig-report.service", &link)?;
    write("etc/hostname", "rig-debian\n", 0o644)?;
    write("etc/fstab", "/dev/vda / ext4 defaults 0 1\n", 0o644)?;
    if !root.join("sbin/init").exists() && !root.join("usr/sbin/init").exists() {
        bail!("the Debian tree has no /sbin/init (systemd-sysv missing?)");
    }
    Ok(())
}
