//! The system calls of `tern jail`, each wrapped to return an error that names what failed.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Error, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| anyhow!("{}: contains NUL", p.display()))
}

/// Fails with the OS error when `ret` is -1.
fn check(ret: libc::c_long, what: impl FnOnce() -> String) -> Result<()> {
    if ret == -1 {
        bail!("{}: {}", what(), Error::last_os_error());
    }
    Ok(())
}

/// Closes every descriptor above 2.
pub fn close_inherited_fds() -> Result<()> {
    // SAFETY: close_range only closes descriptors; nothing in this process uses any above 2
    // yet (tern jail has opened none).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r == 0 {
        return Ok(());
    }
    // Before Linux 5.9: the list in /proc.
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .context("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor this process does not use (the read_dir one is closed
        // already: EBADF, ignored).
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Opens `path` (following symlinks) as an `O_PATH` descriptor: the inode to link or bind.
pub fn open_path(path: &Path) -> Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: a valid NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!("cannot open it: {}", Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens directory `path`.
pub fn open_dir(path: &Path) -> Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: a valid NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        bail!("cannot open {}: {}", path.display(), Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat`.
pub fn fstat(fd: &OwnedFd) -> Result<libc::stat> {
    // SAFETY: all-zero is a valid libc::stat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open and st is a valid out pointer.
    let r = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    check(r.into(), || "fstat".into())?;
    Ok(st)
}

/// Hard-links the inode `fd` holds at `target`.
pub fn link_fd(fd: &OwnedFd, target: &Path) -> std::io::Result<()> {
    let t = CString::new(target.as_os_str().as_bytes()).map_err(Error::other)?;
    // SAFETY: AT_EMPTY_PATH links the inode of fd itself (tern jail is root, so it has the
    // CAP_DAC_READ_SEARCH this needs); both strings are NUL-terminated.
    let r = unsafe {
        libc::linkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(Error::last_os_error());
    }
    Ok(())
}

/// Whether `path`'s file system is mounted `nodev`.
pub fn mounted_nodev(path: &Path) -> Result<bool> {
    let c = cstr(path)?;
    // SAFETY: all-zero is a valid statvfs.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and out pointer.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    check(r.into(), || format!("statvfs {}", path.display()))?;
    Ok(s.f_flag & libc::ST_NODEV != 0)
}

/// Makes character device `dev` at `path`, 0600.
pub fn mknod_char(path: &Path, dev: u64) -> Result<()> {
    let c = cstr(path)?;
    // SAFETY: a valid path; mknod creates a node and touches no memory of ours.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, dev) };
    check(r.into(), || "mknod".into())
}

/// An rlimit `tern jail` sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// RLIMIT_NOFILE.
    NoFile,
    /// RLIMIT_FSIZE.
    Fsize,
}

/// Sets both the soft and the hard limit.
pub fn set_rlimit(r: Resource, value: u64) -> Result<()> {
    let (res, name) = match r {
        Resource::NoFile => (libc::RLIMIT_NOFILE, "no-file"),
        Resource::Fsize => (libc::RLIMIT_FSIZE, "fsize"),
    };
    let l = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: a valid rlimit value.
    let ret = unsafe { libc::setrlimit(res, &l) };
    check(ret.into(), || format!("--resource-limit {name}={value}"))
}

/// Opens a network namespace handle, checking that it is one.
pub fn open_netns(path: &Path) -> Result<OwnedFd> {
    let f = File::open(path).with_context(|| format!("--netns {}", path.display()))?;
    // SAFETY: all-zero is a valid statfs.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: f is open and s a valid out pointer.
    let r = unsafe { libc::fstatfs(f.as_raw_fd(), &mut s) };
    check(r.into(), || format!("--netns {}", path.display()))?;
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    if s.f_type as i64 != NSFS_MAGIC {
        bail!(
            "--netns {}: not a namespace handle (e.g. /var/run/netns/NAME)",
            path.display()
        );
    }
    // SAFETY: File opens with O_CLOEXEC; the descriptor moves to the OwnedFd.
    Ok(OwnedFd::from(f))
}

/// Joins the network namespace `fd`.
pub fn join_netns(fd: &OwnedFd, path: &Path) -> Result<()> {
    // SAFETY: fd is an open namespace handle.
    let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    check(r.into(), || {
        format!("--netns {}: cannot join it", path.display())
    })
}

/// New mount, IPC and UTS namespaces for this process, and a new PID namespace for its next
/// child when `pid`.
pub fn unshare_namespaces(pid: bool) -> Result<()> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if pid {
        flags |= libc::CLONE_NEWPID;
    }
    // SAFETY: unshare changes only this process's namespaces (it is single-threaded).
    let r = unsafe { libc::unshare(flags) };
    check(r.into(), || "unshare (new namespaces)".into())
}

/// The host name in the new UTS namespace.
pub fn set_hostname(name: &str) -> Result<()> {
    // SAFETY: name points to name.len() readable bytes.
    let r = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    check(r.into(), || "sethostname".into())
}

/// `/dev/null` for a daemon's standard descriptors (opened before the host's /dev is gone).
pub fn open_dev_null() -> Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("/dev/null")?;
    Ok(OwnedFd::from(f))
}

fn mount(src: Option<&Path>, target: &Path, flags: libc::c_ulong) -> Result<()> {
    let t = cstr(target)?;
    let s = src.map(cstr).transpose()?;
    // SAFETY: NUL-terminated strings or null; no data argument.
    let r = unsafe {
        libc::mount(
            s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            t.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    check(r.into(), || format!("mount {}", target.display()))
}

/// No mount event in this namespace reaches the host's, and none comes back.
pub fn make_mounts_private() -> Result<()> {
    mount(None, Path::new("/"), libc::MS_REC | libc::MS_PRIVATE)
}

/// Binds `root` onto itself (pivot_root needs a mount point), nosuid.
pub fn bind_self(root: &Path) -> Result<()> {
    mount(Some(root), root, libc::MS_BIND)?;
    mount(
        None,
        root,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID,
    )
}

/// Binds the inode `fd` holds onto `target`, read-only if `readonly`; nosuid, nodev for files.
pub fn bind_fd(fd: &OwnedFd, target: &Path, readonly: bool) -> Result<()> {
    let src = format!("/proc/self/fd/{}", fd.as_raw_fd());
    mount(Some(Path::new(&src)), target, libc::MS_BIND)?;
    let st = fstat(fd)?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
    if st.st_mode & libc::S_IFMT == libc::S_IFREG {
        flags |= libc::MS_NODEV;
    }
    if readonly {
        flags |= libc::MS_RDONLY;
    }
    mount(None, target, flags)
}

/// `pivot_root` into `root`, detaching the old root, then `chdir(cwd)`.
///
/// `pivot_root` refuses (EINVAL) when the current root is the initramfs (`rootfs`), which can
/// be neither unmounted nor pivoted away: a system running from its initramfs, like the nested
/// rig's L1. Only then, and only when "/" really is `rootfs`, the jail does what container
/// runtimes do for that case ([`move_root`]).
pub fn pivot_into(root: &Path, cwd: &Path) -> Result<()> {
    std::env::set_current_dir(root).with_context(|| format!("chdir {}", root.display()))?;
    // SAFETY: pivot_root(".", ".") stacks the old root on the new one (both NUL-terminated).
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    if r == -1 {
        let e = Error::last_os_error();
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").context("/proc/self/mountinfo")?;
        if e.raw_os_error() != Some(libc::EINVAL) || !root_is_rootfs(&mountinfo) {
            bail!("pivot_root: {e}");
        }
        move_root(root, &mountinfo)?;
    } else {
        // SAFETY: detaches the old root, now mounted on top of "/".
        let r = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
        check(r.into(), || "unmounting the old root".into())?;
    }
    std::env::set_current_dir(cwd).with_context(|| format!("chdir {} in the jail", cwd.display()))
}

/// The fallback for a `rootfs` root (the current directory is `root`, the jail's own bind
/// mount, in this process's private mount namespace), as container runtimes do it:
/// `mount(root, "/", MS_MOVE); chroot("."); chdir("/")`. Between the move and the `chroot`,
/// every other mount of the namespace (the host's /proc, /sys, /dev, the file system the jail
/// is on, …) is detached: paths still resolve from the old root then, as a mount stacked on
/// the root directory is not entered until the process `chroot`s into it.
///
/// Unlike `pivot_root`, this leaves the initramfs itself below the jail in the mount
/// namespace, reachable only by escaping the `chroot`. That takes `CAP_SYS_CHROOT` (or a new
/// user namespace to get one), and the process that runs in the jail has neither: tern runs as
/// the non-root `--uid`:`--gid` with no capabilities, `PR_SET_NO_NEW_PRIVS` set and (by
/// default) seccomp filters that refuse `chroot`, `unshare`, `setns` and `mount`.
fn move_root(root: &Path, mountinfo: &str) -> Result<()> {
    let detach = mounts_to_detach(mountinfo, root);
    mount(Some(root), Path::new("/"), libc::MS_MOVE)
        .context("moving the jail onto / (the root is the initramfs: no pivot_root)")?;
    for m in detach {
        let c = cstr(&m)?;
        // SAFETY: a NUL-terminated path; detaches a mount of this private namespace only.
        let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let e = Error::last_os_error();
        // EINVAL/ENOENT: hidden under a later mount (and so below the chroot as well).
        if r != 0 && !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            bail!("detaching {} from the jail's namespace: {e}", m.display());
        }
    }
    // SAFETY: NUL-terminated path; makes the current directory (the moved jail) the root.
    let r = unsafe { libc::chroot(c".".as_ptr()) };
    check(r.into(), || "chroot into the jail".into())?;
    std::env::set_current_dir("/").context("chdir / in the jail")
}

/// The fields of one `/proc/self/mountinfo` line this module uses: mount point and type.
fn mountinfo_entries(mountinfo: &str) -> impl Iterator<Item = (PathBuf, &str)> {
    mountinfo.lines().filter_map(|line| {
        let mut fields = line.split(' ');
        let point = fields.nth(4)?;
        // After the optional fields, "-", then the file system type.
        let fstype = fields.skip_while(|f| *f != "-").nth(1)?;
        Some((PathBuf::from(unescape_octal(point)), fstype))
    })
}

/// Undoes the kernel's `\ooo` escapes (space, tab, newline, backslash) in a mountinfo path.
fn unescape_octal(s: &str) -> std::ffi::OsString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// Whether the topmost mount on "/" is the initramfs (`rootfs`), which `pivot_root` refuses.
fn root_is_rootfs(mountinfo: &str) -> bool {
    mountinfo_entries(mountinfo)
        .filter(|(p, _)| p == Path::new("/"))
        .last()
        .is_some_and(|(_, t)| t == "rootfs")
}

/// The mounts to detach once the jail's mount (`root`, with what is under it) moved onto "/":
/// all others but "/", the file system the jail is on included, deepest first (so none is gone
/// with its parent already); a path with several mounts stacked on it comes once per mount.
fn mounts_to_detach(mountinfo: &str, root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = mountinfo_entries(mountinfo)
        .map(|(p, _)| p)
        .filter(|p| p != Path::new("/") && !p.starts_with(root))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// Writes `pid` to `tern.pid` in `dir` (the jail's directory, outside its root).
pub fn write_pid_file(dir: &OwnedFd, pid: i32) -> Result<()> {
    // SAFETY: dir is an open directory; the name is NUL-terminated; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c"tern.pid".as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        bail!("cannot write tern.pid: {}", Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor this function owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    writeln!(f, "{pid}").context("cannot write tern.pid")
}

/// What execs tern, prepared before any fork.
pub struct Exec {
    path: CString,
    argv: Vec<CString>,
    uid: u32,
    gid: u32,
}

impl Exec {
    /// tern at `path` with `args` (`run …`), to run as `uid`:`gid`.
    pub fn new(path: &Path, args: &[String], uid: u32, gid: u32) -> Result<Exec> {
        let mut argv = vec![CString::new("tern")?];
        for a in args {
            argv.push(CString::new(a.as_str()).map_err(|_| anyhow!("an argument contains NUL"))?);
        }
        Ok(Exec {
            path: cstr(path)?,
            argv,
            uid,
            gid,
        })
    }

    /// No new privileges, no supplementary groups, `gid`, `uid`, the signal mask cleared, then
    /// `execve` with an empty environment. Returns only on failure.
    pub fn run(self) -> anyhow::Error {
        let fail = |what: &str| anyhow!("{what}: {}", Error::last_os_error());
        // SAFETY: an all-empty signal set, applied to this thread; no pointers kept.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return fail("PR_SET_NO_NEW_PRIVS");
        }
        // SAFETY: an empty group list (null pointer with size 0).
        if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
            return fail("setgroups");
        }
        // SAFETY: integer arguments only.
        if unsafe { libc::setresgid(self.gid, self.gid, self.gid) } != 0 {
            return fail("setresgid");
        }
        // SAFETY: integer arguments only; after this the process has no capabilities.
        if unsafe { libc::setresuid(self.uid, self.uid, self.uid) } != 0 {
            return fail("setresuid");
        }
        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        // SAFETY: path, argv and envp are NUL-terminated strings in null-terminated arrays
        // that live until execve returns (it only returns on failure).
        unsafe { libc::execve(self.path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        anyhow!(
            "cannot run {} in the jail: {}",
            Path::new(OsStr::from_bytes(self.path.as_bytes())).display(),
            Error::last_os_error()
        )
    }
}

/// The signals the waiting `tern jail` passes on to tern, and SIGCHLD.
fn forwarded() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGCHLD,
        ] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Forks: the child (pid 1 of the new PID namespace when there is one) becomes tern, as a
/// daemon if `daemonize`. The parent writes its pid to `tern.pid`; then, for a daemon, it
/// exits, otherwise it waits for tern (passing on SIGTERM, SIGINT, SIGHUP and SIGQUIT) and
/// exits as tern did.
pub fn fork_and_exec(
    exec: Exec,
    pid_dir: OwnedFd,
    devnull: Option<OwnedFd>,
    daemonize: bool,
) -> Result<ExitCode> {
    let set = forwarded();
    // SAFETY: blocks signals for this (only) thread; the child clears its mask before exec.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // SAFETY: tern jail is single-threaded here, so the child may run ordinary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", Error::last_os_error());
    }
    if pid == 0 {
        drop(pid_dir);
        if let Some(null) = devnull {
            // SAFETY: setsid and dup2 on descriptors this process owns; a forked child is
            // never a process group leader, so setsid succeeds.
            unsafe {
                libc::setsid();
                for fd in 0..3 {
                    libc::dup2(null.as_raw_fd(), fd);
                }
            }
        }
        let e = exec.run();
        eprintln!("tern jail: {e:#}");
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(1) };
    }
    write_pid_file(&pid_dir, pid)?;
    if daemonize {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        let mut status = 0;
        // SAFETY: a valid pid and out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            return Ok(ExitCode::from(code as u8));
        }
        if r < 0 {
            bail!("waiting for tern: {}", Error::last_os_error());
        }
        // SAFETY: waits for one of the blocked signals in `set`.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if sig > 0 && sig != libc::SIGCHLD {
            // SAFETY: signals tern, our child.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nested rig's L1 (running from its initramfs), in the jail's mount namespace after
    /// the jail's root (on a tmpfs) was bound onto itself and a file of the initramfs bound in.
    const L1: &str = "\
1 1 0:2 / / rw shared:1 - rootfs rootfs rw,size=1523588k
22 1 0:20 / /proc rw,relatime - proc proc rw
23 1 0:21 / /sys rw,relatime - sysfs sysfs rw
24 1 0:5 / /dev rw,relatime - devtmpfs devtmpfs rw,size=1523596k,mode=755
25 23 0:22 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw
26 1 0:40 / /tmp/jail rw - tmpfs tmpfs rw
27 26 0:40 /tern/vm/root /tmp/jail/tern/vm/root rw,nosuid - tmpfs tmpfs rw
28 27 0:2 /rig/guest/k /tmp/jail/tern/vm/root/rig/guest/k ro,nosuid,nodev - rootfs rootfs rw
29 1 0:30 / /mnt/a\\040b rw master:3 - tmpfs tmpfs rw
30 1 0:31 / /mnt/a\\040b rw - tmpfs tmpfs rw
";

    #[test]
    fn a_root_on_the_initramfs_is_recognised() {
        assert!(root_is_rootfs(L1));
        let disk = "21 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    22 21 0:20 / /proc rw - proc proc rw\n";
        assert!(!root_is_rootfs(disk));
        // The topmost mount on "/" counts: a tmpfs over the initramfs is not rootfs.
        let stacked = format!("{L1}30 1 0:40 / / rw - tmpfs tmpfs rw\n");
        assert!(!root_is_rootfs(&stacked));
        assert!(!root_is_rootfs(""));
    }

    #[test]
    fn every_mount_outside_the_jail_is_detached_deepest_first() {
        let got = mounts_to_detach(L1, Path::new("/tmp/jail/tern/vm/root"));
        let want: Vec<PathBuf> = [
            "/sys/fs/cgroup",
            "/tmp/jail",
            "/mnt/a b",
            "/mnt/a b",
            "/proc",
            "/sys",
            "/dev",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_octal("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape_octal("/a\\04"), "/a\\04");
        assert_eq!(unescape_octal("/x\\"), "/x\\");
    }
}
