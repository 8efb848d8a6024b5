//! `cargo xtask images`: the rig's kernels and initramfs images, built from Debian packages into
//! `build/images/`, each step cached by a stamp of its inputs.
//!
//! - `vmlinuz-l1`: `linux-image-amd64`'s kernel, the L1 kernel (kvm-amd is loaded from its
//!   modules).
//! - `vmlinuz-cloud`: `linux-image-cloud-amd64`'s bzImage, the guest (L2) kernel;
//!   `vmlinux-cloud`: the ELF vmlinux extracted from it (PVH / 64-bit Linux entry).
//! - `guest-initrd.cpio`: busybox + `/init` (xtask/guest/init.sh) + scenario scripts
//!   (xtask/guest/scenarios/*.sh) + the cloud kernel's virtio-related modules + `vsock-rig`
//!   (xtask/rig/vsock-rig.c, also in L1).
//! - `blk-root.ext4`: a small ext4 file system (`mkfs.ext4 -d`) holding busybox, the guest init
//!   as `/sbin/init` and the scenario scripts: the root disk of the virtio-blk scenarios (the
//!   initramfs init mounts it and `switch_root`s when the command line says `root=/dev/vdX`).
//! - `l1-initrd.cpio`: busybox + `/init` (xtask/l1/init.sh) + kvm modules + QEMU (with its
//!   libraries and firmware) + tern (optional) + the rig agent + the guest images + the
//!   L1-side scenario scripts (xtask/l1/scenarios/*.sh) and their tools (e2fsprogs'
//!   `debugfs`/`e2fsck`, `qemu-img`, iproute2's `ip`) + the scenario list.
//!
//! Both initramfs images are uncompressed: under TCG the L1 kernel would spend seconds
//! inflating a compressed one, while an uncompressed cpio costs only the copy.

use crate::bzimage;
use crate::cpio::{Archive, Source};
use crate::debs;
use crate::modules::{self, ModuleTree};
use crate::util::{
    build_dir, ensure_tool, human_bytes, run_capture, write_atomic, Fingerprint, Stamp,
};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump to force rebuilding every image when the build logic changes.
const IMAGES_VERSION: &str = "1";

const GUEST_INIT: &str = include_str!("../guest/init.sh");
const L1_INIT: &str = include_str!("../l1/init.sh");

/// L1 modules to load (dependencies are added automatically, in load order).
const L1_MODULES: &[&str] = &[
    "irqbypass",
    "ccp",
    "kvm",
    "kvm_amd",
    "tun",
    "llc",
    "stp",
    "bridge",
    // The Debian guest's disk (a read-only virtio disk holding an ext4 file system).
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    // Loop devices: a host block device for tern-blk-fstrim-loop.
    "loop",
    // QEMU's vhost-vsock-device, the reference in `cargo xtask bench-vsock`.
    "vhost_vsock",
];

/// Cloud-kernel modules shipped in the guest initramfs: every module under these paths, plus
/// their dependencies.
const GUEST_MODULE_PATHS: &[&str] = &[
    "kernel/drivers/virtio/",
    "kernel/drivers/block/virtio_blk",
    "kernel/drivers/net/virtio_net",
    "kernel/drivers/char/virtio_console",
    "kernel/drivers/char/hw_random/virtio-rng",
    "kernel/drivers/scsi/virtio_scsi",
    "kernel/drivers/nvdimm/virtio_pmem",
    "kernel/net/vmw_vsock/vsock",
    "kernel/net/vmw_vsock/vmw_vsock_virtio",
    "kernel/fs/fuse/",
    "kernel/drivers/acpi/button",
    "kernel/drivers/input/evdev",
];

/// Size of the virtio-blk scenarios' ext4 disk image. Every L1-side check reads it whole
/// (sha256, qemu-img convert) at emulated-CPU speed, so it is kept small.
const BLK_ROOT_MIB: u64 = 16;

/// Content of `/base.txt` in the disk image (the L1 scripts and guest scripts check for it).
const BLK_BASE_TXT: &str = "tern-blk-base: written by cargo xtask images\n";

/// Host tools the L1-side scenario scripts use: (tool, Debian package, path inside L1). The
/// block scenarios check images with e2fsprogs and qemu-img; the network scenarios build
/// bridges and TAPs with iproute2's `ip` (busybox's `ip` cannot; at `/usr/sbin/ip` it comes
/// before busybox's `/sbin/ip` in L1's `PATH`).
const L1_TOOLS: &[(&str, &str, &str)] = &[
    ("debugfs", "e2fsprogs", "/usr/sbin/debugfs"),
    ("e2fsck", "e2fsprogs", "/usr/sbin/e2fsck"),
    ("qemu-img", "qemu-utils", "/usr/bin/qemu-img"),
    ("ip", "iproute2", "/usr/sbin/ip"),
];

/// QEMU firmware the L2 QEMU may need (microvm: qboot + option ROMs; pc: SeaBIOS).
const QEMU_FIRMWARE: &[&str] = &[
    "bios-microvm.bin",
    "qboot.rom",
    "linuxboot_dma.bin",
    "linuxboot.bin",
    "pvh.bin",
    "multiboot_dma.bin",
    "kvmvapic.bin",
    "bios-256k.bin",
    "bios.bin",
    "efi-virtio.rom",
    "vgabios-stdvga.bin",
];

/// Paths inside L1.
pub mod l1 {
    pub const BZIMAGE: &str = "/rig/guest/vmlinuz-cloud";
    pub const VMLINUX: &str = "/rig/guest/vmlinux-cloud";
    pub const INITRD: &str = "/rig/guest/guest-initrd.cpio";
    pub const TERN: &str = "/usr/bin/tern";
    pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";
    pub const QEMU_DATA: &str = "/usr/share/qemu";
    /// The peers, when a benchmark is given them, and their configuration files.
    pub const FIRECRACKER: &str = "/usr/bin/firecracker";
    pub const CLOUD_HYPERVISOR: &str = "/usr/bin/cloud-hypervisor";
    pub const PEERS: &str = "/rig/peers";
    pub const AGENT: &str = "/rig/xtask";
    /// The virtio-blk scenarios' pristine ext4 disk image (scripts copy it before use).
    pub const BLK_ROOT: &str = "/rig/blk/root.ext4";
    /// L1-side scenario scripts (`xtask/l1/scenarios/NAME.sh` is `/rig/l1/NAME.sh`).
    pub const SCRIPTS: &str = "/rig/l1";
}

/// Everything `cargo xtask images` produces (except the L1 initramfs, which depends on the run).
#[derive(Debug, Clone)]
pub struct Images {
    pub l1_kernel: PathBuf,
    pub l1_release: String,
    pub l1_modules: PathBuf,
    pub vmlinuz_cloud: PathBuf,
    pub vmlinux_cloud: PathBuf,
    pub guest_release: String,
    pub guest_initrd: PathBuf,
    /// ext4 image with busybox + guest init + scenario scripts (virtio-blk root disk).
    pub blk_root: PathBuf,
    pub busybox: PathBuf,
    /// The host's QEMU: the peer VMM that L1 runs as L2's VMM.
    pub qemu: PathBuf,
    /// The L0 emulator that runs L1, and its firmware directory (see [`l0_emulator`]).
    pub l0_qemu: PathBuf,
    pub l0_data: PathBuf,
    /// The library preloaded into the L0 emulator (see [`l0_preload`]).
    pub l0_preload: PathBuf,
    /// The vsock scenario's helper (see [`vsock_rig`]).
    pub vsock_rig: PathBuf,
}

/// QEMU 10 from bookworm-backports, unpacked under `build/debs/qemu-l0/` (the host's QEMU is
/// left as it is), is the L0 emulator. Bookworm's own QEMU 7.2 freezes L1 for good every few
/// dozen nested boots: its TCG leaves a deliverable interrupt pending in L1's local APIC while
/// L1 halts or L2 runs on (see shared/design/TESTING.md).
pub fn l0_emulator() -> Result<(PathBuf, PathBuf)> {
    let root = debs::fetch_backports(
        "qemu-l0",
        &["qemu-system-x86", "qemu-system-data", "qemu-system-common"],
    )?;
    let qemu = root.join("usr/bin/qemu-system-x86_64");
    run_capture(Command::new(&qemu).arg("--version")).with_context(|| {
        format!(
            "the L0 emulator {} does not run (its libraries are those of bookworm's qemu-system-x86)",
            qemu.display()
        )
    })?;
    Ok((qemu, root.join("usr/share/qemu")))
}

/// `xtask/l0/virq-unlocked.c` built into `build/images/l0-virq-unlocked.so`, preloaded into
/// the L0 emulator: it lets the emulator's one assertion that L2 guests writing CR8 trip (OVMF
/// does it after every interrupt) pass instead of aborting L1 (the file says why that is
/// sound enough for the rig).
pub fn l0_preload() -> Result<PathBuf> {
    let src = crate::util::workspace_root().join("xtask/l0/virq-unlocked.c");
    let out = images_dir().join("l0-virq-unlocked.so");
    let stamp = Stamp::new(
        &out,
        Fingerprint::default().str(IMAGES_VERSION).file(&src)?.hex(),
    );
    if stamp.fresh(&out) {
        return Ok(out);
    }
    let cc = crate::util::which("cc").context("no C compiler (cc) for the L0 preload")?;
    let tmp = out.with_extension("so.tmp");
    run_capture(
        Command::new(cc)
            .args([
                "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o",
            ])
            .arg(&tmp)
            .arg(&src)
            .arg("-ldl"),
    )?;
    std::fs::rename(&tmp, &out)?;
    stamp.commit()?;
    Ok(out)
}

/// `xtask/rig/vsock-rig.c` built static into `build/images/vsock-rig`: both ends of the vsock
/// scenario, in the guest's initramfs (AF_VSOCK) and in L1 (Unix sockets).
pub fn vsock_rig() -> Result<PathBuf> {
    let src = crate::util::workspace_root().join("xtask/rig/vsock-rig.c");
    let out = images_dir().join("vsock-rig");
    let stamp = Stamp::new(
        &out,
        Fingerprint::default().str(IMAGES_VERSION).file(&src)?.hex(),
    );
    if stamp.fresh(&out) {
        return Ok(out);
    }
    let cc = crate::util::which("cc").context("no C compiler (cc) for vsock-rig")?;
    let tmp = out.with_extension("tmp");
    run_capture(
        Command::new(cc)
            .args(["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&tmp)
            .arg(&src),
    )?;
    std::fs::rename(&tmp, &out)?;
    stamp.commit()?;
    Ok(out)
}

fn images_dir() -> PathBuf {
    build_dir().join("images")
}

/// Copies `src` to `dst` unless the stamp says it is current.
fn cached_copy(src: &Path, dst: &Path) -> Result<()> {
    let stamp = Stamp::new(
        dst,
        Fingerprint::default().str(IMAGES_VERSION).file(src)?.hex(),
    );
    if stamp.fresh(dst) {
        return Ok(());
    }
    write_atomic(dst, |f| {
        std::io::copy(&mut std::fs::File::open(src)?, f)?;
        Ok(())
    })?;
    stamp.commit()
}

/// Builds (or finds cached) kernels and the guest initramfs.
pub fn build() -> Result<Images> {
    let dir = images_dir();
    std::fs::create_dir_all(&dir)?;

    let l1_pkg =
        debs::fetch_and_unpack(&debs::resolve("linux-image-amd64", Some("linux-image-"))?)?;
    let guest_pkg = debs::fetch_and_unpack(&debs::resolve(
        "linux-image-cloud-amd64",
        Some("linux-image-"),
    )?)?;
    let busybox_pkg = debs::fetch_and_unpack(&debs::resolve("busybox-static", None)?)?;
    let busybox = busybox_pkg.root.join("bin/busybox");
    if !busybox.is_file() {
        bail!("busybox-static has no /bin/busybox");
    }
    let qemu = ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
    let (l0_qemu, l0_data) = l0_emulator()?;
    let l0_preload = l0_preload()?;
    let vsock_rig = vsock_rig()?;

    let (l1_release, l1_vmlinuz, l1_modules) = l1_pkg.kernel()?;
    let (guest_release, guest_vmlinuz, guest_modules) = guest_pkg.kernel()?;

    let l1_kernel = dir.join("vmlinuz-l1");
    cached_copy(&l1_vmlinuz, &l1_kernel)?;
    let vmlinuz_cloud = dir.join("vmlinuz-cloud");
    cached_copy(&guest_vmlinuz, &vmlinuz_cloud)?;

    let vmlinux_cloud = dir.join("vmlinux-cloud");
    let stamp = Stamp::new(
        &vmlinux_cloud,
        Fingerprint::default()
            .str(IMAGES_VERSION)
            .file(&guest_vmlinuz)?
            .hex(),
    );
    if !stamp.fresh(&vmlinux_cloud) {
        let image = std::fs::read(&guest_vmlinuz)?;
        let info = bzimage::setup_header_info(&image)
            .with_context(|| format!("{} is not a usable bzImage", guest_vmlinuz.display()))?;
        eprintln!(
            "[xtask] extracting vmlinux from {} (boot protocol {}.{:02}, {} payload)",
            guest_vmlinuz.display(),
            info.protocol_version >> 8,
            info.protocol_version & 0xff,
            info.payload_format
                .map_or("unknown".to_string(), |f| f.to_string())
        );
        let vmlinux = bzimage::extract_vmlinux(&image)
            .with_context(|| format!("cannot extract vmlinux from {}", guest_vmlinuz.display()))?;
        write_atomic(&vmlinux_cloud, |f| {
            use std::io::Write;
            f.write_all(&vmlinux)?;
            Ok(())
        })?;
        stamp.commit()?;
    }

    let guest_initrd = dir.join("guest-initrd.cpio");
    let mut archive = guest_archive(&busybox, &guest_modules, &guest_release)?;
    archive.file("bin/vsock-rig", &vsock_rig)?;
    write_archive(&archive, &guest_initrd)?;

    let blk_root = dir.join("blk-root.ext4");
    build_blk_root(&busybox, &blk_root)?;

    Ok(Images {
        l1_kernel,
        l1_release,
        l1_modules,
        vmlinuz_cloud,
        vmlinux_cloud,
        guest_release,
        guest_initrd,
        blk_root,
        busybox,
        qemu,
        l0_qemu,
        l0_data,
        l0_preload,
        vsock_rig,
    })
}

/// Writes `archive` to `path` unless its stamp says the same content is already there.
fn write_archive(archive: &Archive, path: &Path) -> Result<()> {
    let stamp = Stamp::new(path, archive.fingerprint()?.str(IMAGES_VERSION).hex());
    if stamp.fresh(path) {
        return Ok(());
    }
    let mut written = 0;
    write_atomic(path, |f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        written = archive.write_to(&mut w)?;
        use std::io::Write;
        w.flush()?;
        Ok(())
    })?;
    eprintln!(
        "[xtask] wrote {} ({})",
        path.display(),
        human_bytes(written)
    );
    stamp.commit()
}

/// Busybox, its applet links, the standard directories and `/dev/console`.
fn base_archive(busybox: &Path) -> Result<Archive> {
    let mut a = Archive::default();
    for d in ["proc", "sys", "dev", "tmp", "run", "root", "etc", "mnt"] {
        a.dir(d)?;
    }
    // The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
    a.add("dev/console", Source::CharDev(5, 1), 0o600)?;
    a.add("dev/null", Source::CharDev(1, 3), 0o666)?;
    a.file("bin/busybox", busybox)?;
    let applets = run_capture(Command::new(busybox).arg("--list-full"))
        .context("cannot list busybox applets")?;
    for applet in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        a.symlink(applet, "/bin/busybox")?;
    }
    for needed in ["bin/sh", "sbin/insmod", "sbin/poweroff"] {
        if !a.contains(needed) {
            bail!("busybox lacks the {needed} applet");
        }
    }
    a.bytes("etc/passwd", "root::0:0:root:/root:/bin/sh\n", 0o644)?;
    Ok(a)
}

fn guest_archive(busybox: &Path, modules_dir: &Path, release: &str) -> Result<Archive> {
    let mut a = base_archive(busybox)?;
    a.bytes("init", GUEST_INIT, 0o755)?;

    for (name, script) in scripts_in("xtask/guest/scenarios")? {
        a.bytes(&format!("scenarios/{name}"), script, 0o755)?;
    }

    let tree = ModuleTree::scan(modules_dir)?;
    let roots: Vec<String> = tree
        .under(GUEST_MODULE_PATHS)
        .iter()
        .map(|m| m.name.clone())
        .collect();
    let mut list = String::new();
    let mut included = BTreeMap::new();
    for root in &roots {
        let order = tree.load_order(&[root.as_str()])?;
        let paths: Vec<String> = order
            .iter()
            .map(|m| format!("/lib/modules/{release}/{}", strip_compression(&m.rel)))
            .collect();
        list.push_str(&format!("{root}: {}\n", paths.join(" ")));
        for m in order {
            included.insert(m.rel.clone(), m.path.clone());
        }
    }
    for (rel, path) in &included {
        let data = modules::load(path)?;
        a.bytes(
            &format!("lib/modules/{release}/{}", strip_compression(rel)),
            data,
            0o644,
        )?;
    }
    a.bytes("lib/modules/rig-modules.list", list, 0o644)?;
    Ok(a)
}

/// The `*.sh` files in a directory of the workspace, sorted by name, with their content.
fn scripts_in(rel_dir: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let dir = crate::util::workspace_root().join(rel_dir);
    let mut scripts = Vec::new();
    if dir.is_dir() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "sh") {
                let name = path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                scripts.push((name, std::fs::read(&path)?));
            }
        }
    }
    scripts.sort();
    Ok(scripts)
}

/// Builds the virtio-blk scenarios' root disk: an ext4 image (`mkfs.ext4 -d`) of a tree with
/// busybox and its applet links, the guest init as `/sbin/init`, the scenario scripts,
/// `/etc/rig-disk-root` (tells the init it already runs from the disk) and `/base.txt`.
fn build_blk_root(busybox: &Path, image: &Path) -> Result<()> {
    let mkfs = ensure_tool("mkfs.ext4", "e2fsprogs")?;
    let scripts = scripts_in("xtask/guest/scenarios")?;
    let mut fp = Fingerprint::default();
    fp.str(IMAGES_VERSION)
        .str("blk-root 1")
        .file(busybox)?
        .str(GUEST_INIT)
        .str(BLK_BASE_TXT)
        .bytes(&BLK_ROOT_MIB.to_le_bytes());
    for (name, script) in &scripts {
        fp.str(name).bytes(script);
    }
    let stamp = Stamp::new(image, fp.hex());
    if stamp.fresh(image) {
        return Ok(());
    }

    let tree = image.with_extension("tree");
    let _ = std::fs::remove_dir_all(&tree);
    let mkdir = |rel: &str| -> Result<PathBuf> {
        let p = tree.join(rel);
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(p)
    };
    let write = |rel: &str, data: &[u8], mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let p = tree.join(rel);
        std::fs::write(&p, data).with_context(|| format!("cannot write {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "mnt",
        "data",
        "scenarios",
    ] {
        mkdir(d)?;
    }
    write("bin/busybox", &std::fs::read(busybox)?, 0o755)?;
    let applets = run_capture(Command::new(busybox).arg("--list-full"))
        .context("cannot list busybox applets")?;
    for applet in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let link = tree.join(applet);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)
            .with_context(|| format!("cannot create {}", link.display()))?;
    }
    // The applet list has sbin/init (busybox init); the rig's init replaces it.
    let _ = std::fs::remove_file(tree.join("sbin/init"));
    write("sbin/init", GUEST_INIT.as_bytes(), 0o755)?;
    for (name, script) in &scripts {
        write(&format!("scenarios/{name}"), script, 0o755)?;
    }
    write("etc/passwd", b"root::0:0:root:/root:/bin/sh\n", 0o644)?;
    write(
        "etc/rig-disk-root",
        b"This file system is the rig's virtio-blk root disk (xtask/src/images.rs).\n",
        0o644,
    )?;
    write("base.txt", BLK_BASE_TXT.as_bytes(), 0o644)?;

    let partial = image.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    run_capture(
        Command::new(&mkfs)
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "tern-blk", "-E",
            ])
            .arg("root_owner=0:0")
            .arg("-d")
            .arg(&tree)
            .arg(&partial)
            .arg(format!("{BLK_ROOT_MIB}M")),
    )
    .context("mkfs.ext4 -d failed (e2fsprogs >= 1.43 is needed)")?;
    std::fs::rename(&partial, image)?;
    let _ = std::fs::remove_dir_all(&tree);
    eprintln!(
        "[xtask] wrote {} ({BLK_ROOT_MIB} MiB ext4: busybox, init, scenario scripts)",
        image.display()
    );
    stamp.commit()
}

/// `x.ko.xz` -> `x.ko` (modules are stored decompressed for busybox insmod).
fn strip_compression(rel: &str) -> String {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(stem) = rel.strip_suffix(ext) {
            return stem.to_string();
        }
    }
    rel.to_string()
}

/// The shared libraries a dynamically linked program needs (host paths), from `ldd`.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = match run_capture(Command::new("ldd").arg(program)) {
        Ok(out) => out,
        // ldd fails on static binaries ("not a dynamic executable").
        Err(_) => return Ok(Vec::new()),
    };
    let mut libs = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("{}: missing library: {line}", program.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Adds a program and its libraries (at their host paths) to the archive.
fn add_program(a: &mut Archive, archive_path: &str, host: &Path) -> Result<()> {
    a.file(archive_path, host)?;
    for lib in shared_libraries(host)? {
        let path = lib.to_string_lossy().into_owned();
        if !a.contains(&path) {
            a.file(&path, &lib)?;
        }
    }
    Ok(())
}

/// Builds `build/images/l1-initrd.cpio` for one rig run.
/// `programs`: more programs to put in L1, as (L1 path, host path), with their libraries.
pub fn build_l1_initrd(
    images: &Images,
    tern: Option<&Path>,
    programs: &[(&str, &Path)],
    spec_json: &str,
) -> Result<PathBuf> {
    ensure_tool("ldd", "libc-bin")?;
    let mut a = base_archive(&images.busybox)?;
    a.bytes("init", L1_INIT, 0o755)?;

    let tree = ModuleTree::scan(&images.l1_modules)?;
    let order = tree.load_order(L1_MODULES)?;
    let mut load_order = String::new();
    for (i, m) in order.iter().enumerate() {
        let file = strip_compression(m.rel.rsplit('/').next().unwrap_or(&m.rel));
        let path = format!("lib/modules/l1/{i:02}-{file}");
        a.bytes(&path, modules::load(&m.path)?, 0o644)?;
        load_order.push_str(&format!("/{path}\n"));
    }
    a.bytes("lib/modules/l1/load-order", load_order, 0o644)?;

    let agent = std::env::current_exe().context("cannot locate the xtask binary")?;
    add_program(&mut a, l1::AGENT, &agent)?;
    add_program(&mut a, l1::QEMU, &images.qemu)?;
    let qemu_data = images
        .qemu
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("share/qemu"))
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("/usr/share/qemu"));
    // Debian's QEMU also looks in /usr/share/seabios (package seabios) for the PC BIOS.
    for fw in QEMU_FIRMWARE {
        let host = [qemu_data.as_path(), Path::new("/usr/share/seabios")]
            .iter()
            .map(|d| d.join(fw))
            .find(|p| p.is_file());
        if let Some(host) = host {
            a.file(&format!("{}/{fw}", l1::QEMU_DATA), &host)?;
        }
    }
    // OVMF (package ovmf) where tern and the QEMU scenarios look for it.
    for fw in ["OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"] {
        let host = Path::new("/usr/share/OVMF").join(fw);
        if host.is_file() {
            a.file(&format!("/usr/share/OVMF/{fw}"), &host)?;
        }
    }
    if let Some(tern) = tern {
        add_program(&mut a, l1::TERN, tern)?;
    }
    for (in_l1, host) in programs {
        add_program(&mut a, in_l1, host)?;
    }
    a.file(l1::BZIMAGE, &images.vmlinuz_cloud)?;
    a.file(l1::VMLINUX, &images.vmlinux_cloud)?;
    a.file(l1::INITRD, &images.guest_initrd)?;
    a.file(l1::BLK_ROOT, &images.blk_root)?;
    a.file("/usr/bin/vsock-rig", &images.vsock_rig)?;
    for (tool, package, in_l1) in L1_TOOLS {
        let host = ensure_tool(tool, package)?;
        add_program(&mut a, in_l1, &host)?;
    }
    for (name, script) in scripts_in("xtask/l1/scenarios")? {
        a.bytes(&format!("{}/{name}", l1::SCRIPTS), script, 0o755)?;
    }
    a.bytes(crate::spec::SPEC_PATH_IN_L1, spec_json, 0o644)?;

    let path = images_dir().join("l1-initrd.cpio");
    write_archive(&a, &path)?;
    Ok(path)
}
