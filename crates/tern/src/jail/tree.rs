//! The jail's file tree, `DIR/tern/ID/root`: each host file the VM needs at its own absolute
//! path, tern and its shared libraries, device nodes, and nothing else.
//!
//! Rules:
//! - A path with a `..` component is refused. A symlink is resolved on the host (the file is
//!   opened once, `O_PATH`, and that very inode is linked in), and the jail gets the target's
//!   inode at the path named: the jail itself holds no symlinks, so nothing in it points
//!   outside.
//! - A file is linked in only if the jail user (`--uid`, `--gid`, no supplementary groups)
//!   could open it anyway, judged by its owner, group and mode bits (ACLs are not read: a file
//!   only an ACL opens is refused): read for the kernel, initrd, config, snapshot files, backing
//!   files and read-only disks; read and write for writable disks and serial/console files;
//!   read and execute for tern and its program interpreter. So a symlink or a hard link to
//!   `/etc/shadow` is refused, and the jail never grants more than the host already does.
//! - Only regular files (and block devices for disks) are linked in.
//! - Same file system: a hard link (the file's own mode then applies, read-only uses included).
//!   Otherwise, or where a hard link is refused: an empty file in the jail, bind-mounted over
//!   (inside the jail's mount namespace only) and remounted read-only when tern only reads it.
//! - A serial or console file that does not exist yet is created on the host (0600, owned by
//!   the jail user), so its output is where `tern run` would have put it.
//! - The API socket's directory (and the vsock socket's) is made in the jail, owned by the jail
//!   user (0700): the host reaches the socket at `DIR/tern/ID/root/PATH`.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::sys;
use super::Plan;

/// What tern does with a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads it.
    Read,
    /// Reads and writes it.
    ReadWrite,
    /// Appends to it, creating it if missing.
    Create,
    /// Executes it.
    Exec,
}

/// A host file the jailed tern opens.
#[derive(Debug)]
pub struct Need {
    /// As named (absolute or relative to the current directory).
    pub path: PathBuf,
    /// What tern does with it.
    pub access: Access,
    /// What it is, for messages.
    pub what: String,
}

/// A bind mount to make inside the jail's mount namespace.
struct Bind {
    /// The host path (resolved), opened again in the new mount namespace: the kernel binds
    /// only from mounts of the caller's namespace.
    source: PathBuf,
    /// The inode checked when linking, which the path must still lead to.
    inode: (u64, u64),
    target: PathBuf,
    readonly: bool,
}

/// A jail under construction.
pub struct Tree {
    /// `DIR/tern/ID`.
    dir: PathBuf,
    /// `DIR/tern/ID/root`.
    pub root: PathBuf,
    uid: u32,
    gid: u32,
    root_dev: u64,
    binds: Vec<Bind>,
    /// tern's own path (the same inside the jail).
    pub tern_path: PathBuf,
}

impl Tree {
    /// Creates `base/tern/id/root`, refusing one that exists and is not empty (a running
    /// jail with this id, or a leftover to remove first).
    pub fn create(base: &Path, id: &str, uid: u32, gid: u32) -> Result<Tree> {
        // Nobody but root may rename or replace what the jail is built in: a directory
        // another user can write could be swapped for a symlink half-way.
        let m = std::fs::metadata(base)?;
        if m.mode() & 0o002 != 0 && m.mode() & libc::S_ISVTX == 0 {
            bail!(
                "--chroot-base {}: writable by everyone (and not sticky)",
                base.display()
            );
        }
        let dir = base.join("tern").join(id);
        let root = dir.join("root");
        for d in [base.join("tern"), dir.clone(), root.clone()] {
            match std::fs::DirBuilder::new().mode(0o755).create(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => bail!("cannot create {}: {e}", d.display()),
            }
            let m = std::fs::symlink_metadata(&d)?;
            if !m.is_dir() {
                bail!("{} is not a directory (a symlink?)", d.display());
            }
            if m.uid() != 0 || m.mode() & 0o022 != 0 {
                bail!(
                    "{} must be root's and writable by root alone (it is {}:{}, mode {:o})",
                    d.display(),
                    m.uid(),
                    m.gid(),
                    m.mode() & 0o7777
                );
            }
        }
        if std::fs::read_dir(&root)?.next().is_some() {
            bail!(
                "{} exists and is not empty: a jail with id {id} runs, or is left over (remove {})",
                root.display(),
                dir.display()
            );
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        if sys::mounted_nodev(&root)? {
            bail!(
                "{} is on a file system mounted nodev: /dev/kvm cannot be made there",
                root.display()
            );
        }
        let root_dev = std::fs::metadata(&root)?.dev();
        let tern_path =
            std::fs::read_link("/proc/self/exe").context("cannot find tern's own binary")?;
        Ok(Tree {
            dir,
            root,
            uid,
            gid,
            root_dev,
            binds: Vec::new(),
            tern_path,
        })
    }

    /// Puts everything `plan` names in the jail, with tern, its libraries and device nodes.
    pub fn populate(&mut self, plan: &Plan) -> Result<()> {
        let tern = Need {
            path: self.tern_path.clone(),
            access: Access::Exec,
            what: "tern itself".into(),
        };
        self.place(&tern)?;
        for lib in shared_libraries(&self.tern_path)? {
            self.place(&lib)?;
        }
        for need in &plan.files {
            self.place(need)?;
        }
        self.device("/dev/kvm")?;
        if plan.tun {
            self.device("/dev/net/tun")?;
        }
        for d in &plan.writable_dirs {
            let inside = self.mkdirs(d)?;
            std::os::unix::fs::chown(&inside, Some(self.uid), Some(self.gid))?;
            std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// Removes a jail whose building failed.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }

    /// `DIR/tern/ID`, opened, for the pid file once the jail is the root.
    pub fn jail_dir_fd(&self) -> Result<OwnedFd> {
        sys::open_dir(&self.dir)
    }

    /// Where host path `abs` is inside the jail, as the host sees it.
    fn inside(&self, abs: &Path) -> PathBuf {
        self.root.join(abs.strip_prefix("/").unwrap_or(abs))
    }

    /// Makes directory `abs` (every missing component, 0755 root) in the jail.
    pub fn mkdirs(&self, abs: &Path) -> Result<PathBuf> {
        let mut at = self.root.clone();
        for c in abs.components() {
            match c {
                Component::Normal(n) => at.push(n),
                Component::RootDir | Component::CurDir => continue,
                _ => bail!("{}: '..' is not allowed here", abs.display()),
            }
            match std::fs::DirBuilder::new().mode(0o755).create(&at) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if !std::fs::symlink_metadata(&at)?.is_dir() {
                        bail!("{} is in the jail and is not a directory", abs.display());
                    }
                }
                Err(e) => bail!("cannot create {}: {e}", at.display()),
            }
        }
        Ok(at)
    }

    /// Links one host file into the jail at the same path.
    fn place(&mut self, need: &Need) -> Result<()> {
        let shown = need.path.display();
        let what = &need.what;
        let abs = std::path::absolute(&need.path).with_context(|| format!("{what} {shown}"))?;
        if abs.components().any(|c| c == Component::ParentDir) {
            bail!("{what} {shown}: '..' is not allowed in a path tern jail links in (name the file itself)");
        }
        if need.access == Access::Create {
            create_for(&abs, self.uid, self.gid).with_context(|| format!("{what} {shown}"))?;
        }
        let fd = sys::open_path(&abs).with_context(|| format!("{what} {shown}"))?;
        let st = sys::fstat(&fd).with_context(|| format!("{what} {shown}"))?;
        let resolved = match std::fs::canonicalize(&abs) {
            Ok(r) if r != abs => format!(" (resolved to {})", r.display()),
            _ => String::new(),
        };
        let kind = st.st_mode & libc::S_IFMT;
        let block_ok = matches!(need.access, Access::Read | Access::ReadWrite);
        if kind != libc::S_IFREG && !(kind == libc::S_IFBLK && block_ok) {
            bail!("{what} {shown}{resolved}: not a regular file");
        }
        if !may(&st, self.uid, self.gid, need.access) {
            let verb = match need.access {
                Access::Read => "read",
                Access::ReadWrite | Access::Create => "read and write",
                Access::Exec => "read and execute",
            };
            bail!(
                "{what} {shown}{resolved}: uid {} gid {} may not {verb} it (owner {}:{}, mode {:o}); \
                 the jail only links in files its user could open anyway",
                self.uid,
                self.gid,
                st.st_uid,
                st.st_gid,
                st.st_mode & 0o7777
            );
        }
        let target = self.inside(&abs);
        if let Some(parent) = abs.parent() {
            self.mkdirs(parent)?;
        }
        if let Ok(m) = std::fs::symlink_metadata(&target) {
            // Named twice (a disk and its data file, the interpreter under two names…).
            if m.dev() == st.st_dev && m.ino() == st.st_ino || self.is_bind_target(&target) {
                return Ok(());
            }
            bail!("{what} {shown}: the jail already has another file at this path");
        }
        if kind == libc::S_IFREG && st.st_dev == self.root_dev {
            match sys::link_fd(&fd, &target) {
                Ok(()) => return Ok(()),
                // Another mount of the same file system, or a link the kernel refuses: bind.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EPERM)) => {}
                Err(e) => bail!("cannot link {} into the jail: {e}", abs.display()),
            }
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&target)
            .with_context(|| format!("cannot create {}", target.display()))?;
        let source = std::fs::canonicalize(&abs).with_context(|| format!("{what} {shown}"))?;
        self.binds.push(Bind {
            source,
            inode: (st.st_dev, st.st_ino),
            target,
            readonly: matches!(need.access, Access::Read | Access::Exec),
        });
        Ok(())
    }

    fn is_bind_target(&self, target: &Path) -> bool {
        self.binds.iter().any(|b| b.target == target)
    }

    /// Makes the host's character device `path` in the jail, owned by the jail user, 0600.
    fn device(&self, path: &str) -> Result<()> {
        let m = std::fs::metadata(path).with_context(|| format!("the host's {path}"))?;
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_char_device() {
            bail!("the host's {path} is not a character device");
        }
        let abs = Path::new(path);
        if let Some(parent) = abs.parent() {
            self.mkdirs(parent)?;
        }
        let target = self.inside(abs);
        sys::mknod_char(&target, m.rdev())
            .with_context(|| format!("mknod {}", target.display()))?;
        std::os::unix::fs::chown(&target, Some(self.uid), Some(self.gid))?;
        Ok(())
    }

    /// Enters a new root: every mount private, the jail bound onto itself, the cross-file-system
    /// files bound in, `pivot_root`, the old root detached (on an initramfs root: the other
    /// mounts detached, the jail moved onto `/` and `chroot`), then `cwd`.
    pub fn mount_and_pivot(&self, cwd: &Path) -> Result<()> {
        sys::make_mounts_private()?;
        sys::bind_self(&self.root)?;
        for b in &self.binds {
            let fd =
                sys::open_path(&b.source).with_context(|| format!("{}", b.source.display()))?;
            let st = sys::fstat(&fd)?;
            if (st.st_dev, st.st_ino) != b.inode {
                bail!(
                    "{} was replaced while the jail was built",
                    b.source.display()
                );
            }
            sys::bind_fd(&fd, &b.target, b.readonly)
                .with_context(|| format!("bind mount onto {}", b.target.display()))?;
        }
        sys::pivot_into(&self.root, cwd)
    }
}

/// Whether `uid`:`gid` (no other groups) may `access` a file by its mode bits.
fn may(st: &libc::stat, uid: u32, gid: u32, access: Access) -> bool {
    let mode = st.st_mode;
    let bits = if st.st_uid == uid {
        (mode >> 6) & 7
    } else if st.st_gid == gid {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    let want = match access {
        Access::Read => 4,
        Access::ReadWrite | Access::Create => 6,
        Access::Exec => 5,
    };
    bits & want == want
}

/// Creates a missing serial/console file for the jail user (an existing one is left alone).
fn create_for(abs: &Path, uid: u32, gid: u32) -> Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(abs)
    {
        Ok(f) => {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(anyhow!("cannot create it: {e}")),
    }
}

/// The shared objects this process (tern) has mapped, and its ELF interpreter under the name
/// the binary asks for: what a dynamically linked tern needs to start in the jail (none for a
/// static one). Each is placed at the path the kernel and `ld.so` look for.
fn shared_libraries(exe: &Path) -> Result<Vec<Need>> {
    let maps = std::fs::read_to_string("/proc/self/maps").context("/proc/self/maps")?;
    let mut out: Vec<Need> = Vec::new();
    let mut add = |path: PathBuf, access: Access| {
        if path != exe && !out.iter().any(|n| n.path == path) {
            out.push(Need {
                path,
                access,
                what: "a shared library tern uses".into(),
            });
        }
    };
    if let Some(interp) = elf_interpreter(exe)? {
        add(interp, Access::Exec);
    }
    for line in maps.lines() {
        let path = line
            .split_whitespace()
            .skip(5)
            .collect::<Vec<_>>()
            .join(" ");
        if path.starts_with('/') && !path.ends_with(" (deleted)") {
            add(PathBuf::from(path), Access::Read);
        }
    }
    Ok(out)
}

/// The `PT_INTERP` path of an ELF64 executable, if it has one.
fn elf_interpreter(exe: &Path) -> Result<Option<PathBuf>> {
    // The program headers and the interpreter's name are at the start of the file.
    let mut bytes = Vec::new();
    File::open(exe)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", exe.display()))?;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return Ok(None);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Ok(None);
    };
    for i in 0..phnum {
        let Some(ph) = i.checked_mul(phentsize).and_then(|o| o.checked_add(phoff)) else {
            break;
        };
        let Some(kind) = bytes.get(ph..ph.saturating_add(4)) else {
            break;
        };
        if kind != [3, 0, 0, 0] {
            continue;
        }
        let (Some(off), Some(size)) = (u64_at(ph + 8), u64_at(ph + 32)) else {
            break;
        };
        let name = off
            .checked_add(size)
            .and_then(|end| bytes.get(off..end))
            .ok_or_else(|| anyhow!("{}: bad PT_INTERP", exe.display()))?;
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        return Ok(Some(PathBuf::from(OsStr::from_bytes(name))));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(uid: u32, gid: u32, mode: u32) -> libc::stat {
        // SAFETY: libc::stat is plain data; all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        st.st_uid = uid;
        st.st_gid = gid;
        st.st_mode = libc::S_IFREG | mode;
        st
    }

    #[test]
    fn the_jail_user_gets_what_the_mode_bits_give_it() {
        let (u, g) = (10123, 10124);
        assert!(may(&stat(0, 0, 0o644), u, g, Access::Read));
        assert!(!may(&stat(0, 0, 0o644), u, g, Access::ReadWrite));
        assert!(!may(&stat(0, 42, 0o640), u, g, Access::Read), "/etc/shadow");
        assert!(may(&stat(0, g, 0o660), u, g, Access::ReadWrite));
        assert!(may(&stat(u, 0, 0o600), u, g, Access::Create));
        // The owner's bits apply to the owner, even when others have more.
        assert!(!may(&stat(u, 0, 0o066), u, g, Access::Read));
        assert!(may(&stat(0, 0, 0o755), u, g, Access::Exec));
        assert!(!may(&stat(0, 0, 0o644), u, g, Access::Exec));
    }

    #[test]
    fn tern_s_interpreter_is_found() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        // A dynamically linked test binary names its interpreter; a static one none.
        if let Some(i) = elf_interpreter(&exe).unwrap() {
            assert!(i.is_absolute() && i.exists(), "{}", i.display());
        }
    }
}
