//! `debian-fw.qcow2`: the rig's Debian guest as a whole, firmware-bootable disk, laid out the
//! way installed systems and cloud images are — so a VMM can be tested booting it through
//! SeaBIOS or OVMF and GRUB, not only by loading a kernel itself.
//!
//! The disk (GPT, 512-byte sectors, every partition 1 MiB-aligned):
//! - p1 "BIOS boot" (1 MiB): GRUB's i386-pc `core.img`, which the boot code in the MBR loads;
//! - p2 EFI system partition (FAT32): GRUB for x86_64 UEFI at the removable-media path
//!   `EFI/BOOT/BOOTX64.EFI`, which firmware finds without a boot entry in NVRAM;
//! - p3 the root file system: ext4 with a fixed UUID holding the same Debian tree as
//!   `debian.qcow2`, plus `/boot/grub/grub.cfg` and an fstab naming the root by UUID.
//!
//! Both GRUB images carry the same early configuration: find the root file system by its UUID
//! and take `/boot/grub` on it as the prefix; GRUB's `normal` mode then reads `grub.cfg` there,
//! which sends GRUB's terminal to the serial port and boots Debian's kernel and initramfs.
//!
//! `debian-sdboot.qcow2` is a second, small disk for the other boot loader users meet on UEFI:
//! one ESP holding systemd-boot (Debian's `systemd-boot-efi`) at the removable-media path, its
//! `loader.conf` and one Boot Loader Specification entry, and Debian's kernel and initramfs
//! beside them. Put before the firmware disk, it boots the same root file system (by UUID) with
//! systemd-boot instead of GRUB.
//!
//! Nothing here needs loop devices or mounts (which these machines do not offer for
//! partitions): each partition is built as a file of its own (`mkfs.ext4 -d`, `mkfs.vfat` +
//! mtools) and copied into a sparse disk file at its offset after `sfdisk` wrote the table. The
//! BIOS boot code is installed by hand, doing what `grub-install` does for a GPT disk with a
//! BIOS boot partition (GRUB's `util/setup.c`): the first 440 bytes of `boot.img` go into the
//! MBR (sfdisk's protective partition table and disk signature stay), pointed at the first
//! sector of `core.img`, and the block list at the end of `core.img`'s first sector
//! (`diskboot.img`) is pointed at the rest of it.

use crate::debian::mkfs_ext4;
use crate::util::{apt_install, ensure_tool, run_capture, Fingerprint};
use anyhow::{bail, ensure, Context, Result};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Fixed identities, so the recipe gives the same disk every time (and `grub.cfg`, the GRUB
/// images and fstab can name the root file system before it exists).
const ROOT_UUID: &str = "3f6c2a4e-5b1d-4e8a-9c27-7d0e41b5a9c3";
const DISK_GUID: &str = "3F6C2A4E-5B1D-4E8A-9C27-7D0E41B5A900";
const PART_GUIDS: [&str; 3] = [
    "3F6C2A4E-5B1D-4E8A-9C27-7D0E41B5A901",
    "3F6C2A4E-5B1D-4E8A-9C27-7D0E41B5A902",
    "3F6C2A4E-5B1D-4E8A-9C27-7D0E41B5A903",
];
/// FAT volume serial of the ESP.
const ESP_VOLUME_ID: &str = "3F6C2A4E";
/// The systemd-boot disk's identities: disk, ESP partition, FAT volume serial.
const SDBOOT_DISK_GUID: &str = "3F6C2A4E-5B1D-4E8A-9C27-7D0E41B5A910";
const SDBOOT_ESP_GUID: &str = "3F6C2A4E-5B1D-4E8A-9C27-7D0E41B5A911";
const SDBOOT_VOLUME_ID: &str = "3F6C2A4F";
/// Where Debian's `systemd-boot-efi` puts the boot manager (the package is downloaded and
/// unpacked under `build/debs/`, not installed: it would upgrade the host's systemd to match).
const SDBOOT_EFI: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// systemd-boot's configuration: no menu (a key held at start still shows it), the one entry.
const SDBOOT_LOADER_CONF: &str = "timeout 0\ndefault debian.conf\n";

/// GPT partition types (as GRUB's `include/grub/gpt_partition.h` and util-linux spell them).
const TYPE_BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const TYPE_LINUX_FS: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

const SECTOR: u64 = 512;
const MIB_SECTORS: u64 = (1 << 20) / SECTOR;
/// Partition starts and sizes in MiB: p1 at 1 MiB (the first MiB holds the MBR and GPT).
const BIOS_BOOT_MIB: u64 = 1;
const ESP_MIB: u64 = 100;

/// GRUB modules built into both images (their dependencies come along); `boot` runs the
/// loaded kernel at the end of a menu entry.
const GRUB_COMMON_MODULES: &[&str] = &[
    "part_gpt",
    "ext2",
    "search",
    "search_fs_uuid",
    "normal",
    "linux",
    "boot",
    "serial",
    "terminal",
    "echo",
    "configfile",
];
const GRUB_BIOS_MODULES: &[&str] = &["biosdisk"];
const GRUB_EFI_MODULES: &[&str] = &["fat", "efi_gop"];

/// Where `grub-pc-bin` and `grub-efi-amd64-bin` put GRUB's images and modules.
const GRUB_PC_DIR: &str = "/usr/lib/grub/i386-pc";
const GRUB_EFI_DIR: &str = "/usr/lib/grub/x86_64-efi";

/// Offsets in GRUB's i386-pc boot sector (`boot.img`, include/grub/i386/pc/boot.h): the LBA
/// of core.img's first sector (u64), the boot drive (0xff: the one the BIOS passes in %dl),
/// and the 2-byte jump that skips the drive-number check, which grub-install turns into two
/// NOPs for hard disks (a workaround for BIOSes that pass a wrong drive number).
const BOOT_KERNEL_SECTOR: usize = 0x5c;
const BOOT_DRIVE: usize = 0x64;
const BOOT_DRIVE_CHECK: usize = 0x66;
/// Boot code ends where the disk signature and the partition table start.
const BOOT_CODE_END: usize = 0x1b8;
/// diskboot.S: the first block list entry ends its sector — start LBA (u64), sector count
/// (u16), load segment (u16; 0x820, right after the first sector at 0x8000); the 12 bytes
/// before it are the (all-zero) terminating entry.
const BLOCKLIST: usize = 0x200 - 12;
const CORE_LOAD_SEGMENT: u16 = 0x820;

/// The first line GRUB prints from `grub.cfg` (the rig times it: the firmware's share of a boot).
pub const GRUB_LOADING: &str = "rig-grub: loading";

/// The configuration built into both GRUB images.
fn early_config() -> String {
    format!("search --no-floppy --fs-uuid --set=root {ROOT_UUID}\nset prefix=($root)/boot/grub\n")
}

/// `/boot/grub/grub.cfg`, hand-written (the image has no `update-grub`): GRUB on the serial
/// port under both firmwares, no menu delay, Debian's kernel with the root named by UUID.
fn grub_cfg(kernel: &str, initrd: &str) -> String {
    format!(
        "\
# Written by the tern rig (xtask/src/debian_fw.rs); this system has no update-grub.
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial
set timeout=0
set default=0
echo '{GRUB_LOADING} /boot/{kernel}'
menuentry 'Debian GNU/Linux (tern rig)' {{
\tlinux /boot/{kernel} root=UUID={ROOT_UUID} ro console=ttyS0 quiet
\tinitrd /boot/{initrd}
}}
"
    )
}

/// The systemd-boot entry (Boot Loader Specification type 1): the kernel and initramfs at the
/// ESP's root, the same command line as GRUB's.
fn sdboot_entry() -> String {
    format!(
        "title Debian GNU/Linux (tern rig, systemd-boot)\nlinux /vmlinuz\ninitrd /initrd.img\n\
         options root=UUID={ROOT_UUID} ro console=ttyS0 quiet\n"
    )
}

/// The partition table, as `sfdisk` script.
fn sfdisk_script(root_mib: u64) -> String {
    let (p1, p2, p3) = layout(root_mib);
    let part = |(start, size): (u64, u64), ty: &str, guid: &str, name: &str| {
        format!("start={start}, size={size}, type={ty}, uuid={guid}, name=\"{name}\"\n")
    };
    format!(
        "label: gpt\nlabel-id: {DISK_GUID}\nunit: sectors\nsector-size: {SECTOR}\n\n{}{}{}",
        part(p1, TYPE_BIOS_BOOT, PART_GUIDS[0], "BIOS boot"),
        part(p2, TYPE_ESP, PART_GUIDS[1], "EFI system"),
        part(p3, TYPE_LINUX_FS, PART_GUIDS[2], "Debian root"),
    )
}

/// (start, sectors) of p1, p2, p3.
fn layout(root_mib: u64) -> ((u64, u64), (u64, u64), (u64, u64)) {
    let p1 = (MIB_SECTORS, BIOS_BOOT_MIB * MIB_SECTORS);
    let p2 = (p1.0 + p1.1, ESP_MIB * MIB_SECTORS);
    let p3 = (p2.0 + p2.1, root_mib * MIB_SECTORS);
    (p1, p2, p3)
}

/// Total size: the partitions plus 1 MiB at the end for the backup GPT.
fn disk_sectors(root_mib: u64) -> u64 {
    let (_, _, p3) = layout(root_mib);
    p3.0 + p3.1 + MIB_SECTORS
}

/// Everything the disk is made from, for the cache stamp of the Debian image.
pub fn recipe(fp: &mut Fingerprint) {
    fp.str(&early_config())
        .str(&grub_cfg("KERNEL", "INITRD"))
        .str(&sfdisk_script(1))
        .str(ESP_VOLUME_ID)
        .str(&GRUB_COMMON_MODULES.join(","))
        .str(&GRUB_BIOS_MODULES.join(","))
        .str(&GRUB_EFI_MODULES.join(","))
        .str(SDBOOT_DISK_GUID)
        .str(SDBOOT_ESP_GUID)
        .str(SDBOOT_VOLUME_ID)
        .str(SDBOOT_EFI)
        .str(SDBOOT_LOADER_CONF)
        .str(&sdboot_entry());
}

/// The host tools, installed if missing (GRUB's images are data files, not commands).
struct Tools {
    mkimage: PathBuf,
    sfdisk: PathBuf,
    mkfs_vfat: PathBuf,
    mmd: PathBuf,
    mcopy: PathBuf,
    dd: PathBuf,
}

fn tools() -> Result<Tools> {
    let mkimage = ensure_tool("grub-mkimage", "grub-common")?;
    for (dir, package) in [
        (GRUB_PC_DIR, "grub-pc-bin"),
        (GRUB_EFI_DIR, "grub-efi-amd64-bin"),
    ] {
        let probe = Path::new(dir).join("kernel.img");
        if !probe.exists() {
            eprintln!(
                "[xtask] {} not found; installing {package}",
                probe.display()
            );
            apt_install(&[package])?;
        }
        ensure!(
            probe.exists(),
            "{} missing after installing {package}",
            probe.display()
        );
    }
    Ok(Tools {
        mkimage,
        sfdisk: ensure_tool("sfdisk", "fdisk")?,
        mkfs_vfat: ensure_tool("mkfs.vfat", "dosfstools")?,
        mmd: ensure_tool("mmd", "mtools")?,
        mcopy: ensure_tool("mcopy", "mtools")?,
        dd: ensure_tool("dd", "coreutils")?,
    })
}

/// What the Debian build hands over: its tree (after `debian.qcow2` was made from it), the
/// kernel and initramfs file names in its `/boot`, the root file system's size and the tools.
pub struct Input<'a> {
    pub root: &'a Path,
    pub kernel: &'a str,
    pub initrd: &'a str,
    pub root_mib: u64,
    pub mkfs_ext4: &'a Path,
    pub qemu_img: &'a Path,
}

/// Builds `out` (qcow2) in `work`; changes the tree (fstab, grub.cfg) for the firmware boot.
pub fn build(input: &Input, work: &Path, out: &Path) -> Result<()> {
    let t = tools()?;
    let root_mib = input.root_mib;
    let (p1, p2, p3) = layout(root_mib);

    // The root file system: the same tree, mounted by UUID, with GRUB's configuration.
    let write = |rel: &str, data: &str| -> Result<()> {
        let p = input.root.join(rel);
        std::fs::create_dir_all(p.parent().context("no parent")?)?;
        std::fs::write(&p, data).with_context(|| format!("cannot write {}", p.display()))
    };
    write(
        "etc/fstab",
        &format!("UUID={ROOT_UUID} / ext4 defaults 0 1\n"),
    )?;
    write("boot/grub/grub.cfg", &grub_cfg(input.kernel, input.initrd))?;
    let root_img = work.join("fw-root.ext4");
    let uuid = ["-U", ROOT_UUID];
    mkfs_ext4(
        input.mkfs_ext4,
        "debian-root",
        &uuid,
        input.root,
        &root_img,
        root_mib,
    )
    .context("mkfs.ext4 -d of the firmware disk's root file system failed")?;

    // GRUB for both firmwares, from one early configuration.
    let early = work.join("grub-early.cfg");
    std::fs::write(&early, early_config())?;
    let core = work.join("core.img");
    let efi = work.join("BOOTX64.EFI");
    for (format, image, extra) in [
        ("i386-pc", &core, GRUB_BIOS_MODULES),
        ("x86_64-efi", &efi, GRUB_EFI_MODULES),
    ] {
        run_capture(
            Command::new(&t.mkimage)
                .args(["-O", format, "-p", "/boot/grub", "-c"])
                .arg(&early)
                .arg("-o")
                .arg(image)
                .args(GRUB_COMMON_MODULES)
                .args(extra),
        )
        .with_context(|| format!("grub-mkimage -O {format} failed"))?;
    }

    // The ESP: FAT32 with GRUB at the removable-media path.
    let esp = work.join("esp.vfat");
    fat_image(
        &t,
        &esp,
        p2.1 * SECTOR,
        ESP_VOLUME_ID,
        &[(efi.as_path(), "EFI/BOOT/BOOTX64.EFI")],
    )?;

    // The disk: table, partitions, boot code.
    let raw = work.join("fw-disk.raw");
    partitioned_disk(
        &t,
        &raw,
        disk_sectors(root_mib),
        &sfdisk_script(root_mib),
        &[(&esp, p2), (&root_img, p3)],
    )?;
    install_bios_boot(&raw, &core, p1)?;
    to_qcow2(input.qemu_img, &raw, out)
}

/// Builds `debian-sdboot.qcow2` at `out` in `work`: one GPT partition, an ESP with systemd-boot
/// at the removable-media path, its configuration, one entry, and the kernel and initramfs.
pub fn build_sdboot(input: &Input, work: &Path, out: &Path) -> Result<()> {
    let t = tools()?;
    let sdboot = crate::debs::fetch_and_unpack(&crate::debs::resolve("systemd-boot-efi", None)?)?
        .root
        .join(SDBOOT_EFI);
    ensure!(
        sdboot.is_file(),
        "{} missing from Debian's systemd-boot-efi",
        sdboot.display()
    );
    let kernel = input.root.join("boot").join(input.kernel);
    let initrd = input.root.join("boot").join(input.initrd);
    let payload = std::fs::metadata(&kernel)?.len() + std::fs::metadata(&initrd)?.len();
    // Room for FAT's own structures; 64 MiB at least, which FAT32 with 512-byte clusters needs.
    let esp_mib = ((payload >> 20) + 16).max(64);
    let esp_part = (MIB_SECTORS, esp_mib * MIB_SECTORS);
    let loader_conf = work.join("loader.conf");
    std::fs::write(&loader_conf, SDBOOT_LOADER_CONF)?;
    let entry = work.join("debian.conf");
    std::fs::write(&entry, sdboot_entry())?;
    let esp = work.join("sdboot-esp.vfat");
    fat_image(
        &t,
        &esp,
        esp_part.1 * SECTOR,
        SDBOOT_VOLUME_ID,
        &[
            (sdboot.as_path(), "EFI/BOOT/BOOTX64.EFI"),
            (loader_conf.as_path(), "loader/loader.conf"),
            (entry.as_path(), "loader/entries/debian.conf"),
            (kernel.as_path(), "vmlinuz"),
            (initrd.as_path(), "initrd.img"),
        ],
    )?;
    let script = format!(
        "label: gpt\nlabel-id: {SDBOOT_DISK_GUID}\nunit: sectors\nsector-size: {SECTOR}\n\n\
         start={}, size={}, type={TYPE_ESP}, uuid={SDBOOT_ESP_GUID}, name=\"EFI system\"\n",
        esp_part.0, esp_part.1
    );
    let raw = work.join("sdboot-disk.raw");
    // The ESP after the first MiB, and 1 MiB at the end for the backup GPT.
    let sectors = esp_part.0 + esp_part.1 + MIB_SECTORS;
    partitioned_disk(&t, &raw, sectors, &script, &[(&esp, esp_part)])?;
    to_qcow2(input.qemu_img, &raw, out)
}

/// A FAT32 image of `len` bytes at `path` (volume serial `volume_id`, label "EFI") holding
/// `files`, each (source, path on the volume), with the directories they need.
fn fat_image(
    t: &Tools,
    path: &Path,
    len: u64,
    volume_id: &str,
    files: &[(&Path, &str)],
) -> Result<()> {
    sparse_file(path, len)?;
    run_capture(
        Command::new(&t.mkfs_vfat)
            .args(["-F", "32", "-s", "1", "-n", "EFI", "-i", volume_id])
            .arg(path),
    )
    .with_context(|| format!("mkfs.vfat of {} failed", path.display()))?;
    let image = format!("{}", path.display());
    let mut dirs: Vec<String> = Vec::new();
    for (_, dest) in files {
        let mut at = String::new();
        for part in dest
            .split('/')
            .rev()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            at = format!("{at}/{part}");
            if !dirs.contains(&at) {
                dirs.push(at.clone());
            }
        }
    }
    if !dirs.is_empty() {
        run_capture(
            Command::new(&t.mmd)
                .args(["-i", &image])
                .args(dirs.iter().map(|d| format!("::{d}")))
                .env("MTOOLS_SKIP_CHECK", "1"),
        )
        .with_context(|| format!("mmd on {} failed", path.display()))?;
    }
    for (src, dest) in files {
        run_capture(
            Command::new(&t.mcopy)
                .args(["-i", &image])
                .arg(src)
                .arg(format!("::/{dest}"))
                .env("MTOOLS_SKIP_CHECK", "1"),
        )
        .with_context(|| format!("mcopy of {} to {dest} failed", src.display()))?;
    }
    Ok(())
}

/// A sparse raw disk of `sectors` at `raw` with the partition table of `script` (sfdisk), and
/// each image copied to its partition `(start, sectors)` (then removed).
fn partitioned_disk(
    t: &Tools,
    raw: &Path,
    sectors: u64,
    script: &str,
    parts: &[(&Path, (u64, u64))],
) -> Result<()> {
    sparse_file(raw, sectors * SECTOR)?;
    let mut sfdisk = Command::new(&t.sfdisk)
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(raw)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run sfdisk")?;
    sfdisk
        .stdin
        .take()
        .context("sfdisk stdin")?
        .write_all(script.as_bytes())?;
    let done = sfdisk.wait_with_output()?;
    if !done.status.success() {
        bail!(
            "sfdisk failed ({}): {}",
            done.status,
            String::from_utf8_lossy(&done.stderr).trim()
        );
    }
    for (image, (start, sectors)) in parts {
        let len = std::fs::metadata(image)?.len();
        ensure!(
            len <= sectors * SECTOR,
            "{} is larger than its partition",
            image.display()
        );
        run_capture(
            Command::new(&t.dd)
                .arg(format!("if={}", image.display()))
                .arg(format!("of={}", raw.display()))
                .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
                .arg(format!("seek={}", start / MIB_SECTORS)),
        )
        .with_context(|| format!("dd of {} into the disk failed", image.display()))?;
        std::fs::remove_file(image)?;
    }
    Ok(())
}

/// Converts the raw disk `raw` to qcow2 at `out` and removes it.
fn to_qcow2(qemu_img: &Path, raw: &Path, out: &Path) -> Result<()> {
    run_capture(
        Command::new(qemu_img)
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(out),
    )
    .with_context(|| format!("qemu-img convert of {} failed", raw.display()))?;
    std::fs::remove_file(raw)?;
    Ok(())
}

/// A file of `len` bytes that takes no space until written.
fn sparse_file(path: &Path, len: u64) -> Result<()> {
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path)
        .and_then(|f| f.set_len(len))
        .with_context(|| format!("cannot create {}", path.display()))
}

/// GRUB's i386-pc boot path, installed the way `grub-install` installs it on a GPT disk:
/// `core.img` at the start of the BIOS boot partition `(start, sectors)`, its block list
/// pointing at its own sectors 1.., and `boot.img`'s code in the MBR pointing at sector 0.
fn install_bios_boot(raw: &Path, core_img: &Path, (start, sectors): (u64, u64)) -> Result<()> {
    let mut core = std::fs::read(core_img)?;
    let core_sectors = core.len().div_ceil(SECTOR as usize);
    ensure!(
        core_sectors as u64 <= sectors,
        "core.img ({core_sectors} sectors) does not fit the BIOS boot partition"
    );
    core.resize(core_sectors * SECTOR as usize, 0);
    // diskboot.img loads whole sectors; the count must fit its u16 and the terminator before
    // the entry must be empty (grub-mkimage leaves it so).
    let count = u16::try_from(core_sectors - 1).context("core.img too large")?;
    ensure!(
        core[BLOCKLIST - 12..BLOCKLIST].iter().all(|&b| b == 0),
        "core.img's block list has no terminator where diskboot.img expects one"
    );
    core[BLOCKLIST..BLOCKLIST + 8].copy_from_slice(&(start + 1).to_le_bytes());
    core[BLOCKLIST + 8..BLOCKLIST + 10].copy_from_slice(&count.to_le_bytes());
    core[BLOCKLIST + 10..BLOCKLIST + 12].copy_from_slice(&CORE_LOAD_SEGMENT.to_le_bytes());

    let boot = std::fs::read(Path::new(GRUB_PC_DIR).join("boot.img"))?;
    ensure!(boot.len() == SECTOR as usize, "boot.img is not one sector");
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)?;
    let mut mbr = [0u8; SECTOR as usize];
    disk.read_exact_at(&mut mbr, 0)?;
    ensure!(
        mbr[0x1fe..] == [0x55, 0xaa] && mbr[0x1c2] == 0xee,
        "sector 0 holds no protective MBR"
    );
    ensure!(
        boot[BOOT_DRIVE_CHECK] == 0xeb && boot[BOOT_DRIVE] == 0xff,
        "boot.img does not have the layout this installer knows (GRUB 2.x)"
    );
    // The BIOS parameter block area (0x3..0x5a) stays zero, as on a fresh disk.
    mbr[..BOOT_CODE_END].copy_from_slice(&boot[..BOOT_CODE_END]);
    mbr[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8].copy_from_slice(&start.to_le_bytes());
    mbr[BOOT_DRIVE_CHECK..BOOT_DRIVE_CHECK + 2].copy_from_slice(&[0x90, 0x90]);
    disk.write_all_at(&core, start * SECTOR)?;
    disk.write_all_at(&mbr, 0)?;
    disk.sync_all()?;
    Ok(())
}

/// One line for the build log: what the disk holds and where L1 finds it.
pub fn describe(root_mib: u64) -> String {
    let (p1, p2, p3) = layout(root_mib);
    format!(
        "{}: GPT, BIOS boot at LBA {}, ESP at LBA {} ({ESP_MIB} MiB), root (UUID {ROOT_UUID}) \
         at LBA {} ({root_mib} MiB), {} sectors; {}: GPT, ESP with systemd-boot at LBA {}",
        crate::debian::in_l1::FW_DISK,
        p1.0,
        p2.0,
        p3.0,
        disk_sectors(root_mib),
        crate::debian::in_l1::SDBOOT_DISK,
        MIB_SECTORS,
    )
}
