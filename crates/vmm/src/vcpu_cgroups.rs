//! The cgroups vCPU threads join: descriptors of cgroup thread lists (`tasks` in cgroup v1,
//! `cgroup.threads` in v2) that `tern jail --vcpu-cgroup` opens and hands down with
//! `tern run --vcpu-cgroup-fd N`. Each vCPU thread writes its own thread id to each of them as
//! it starts, before it first enters the guest.
//!
//! A setting of the process rather than of the VM ([`api::config::VmConfig`]): the descriptors
//! belong to this tern, inherited from its jailer, not to the machine a configuration
//! describes, so they are neither sent through the API nor saved in a snapshot; they apply
//! to every vCPU thread the process starts (after a restore or a guest reboot too). The
//! threads only `write` to descriptors opened before them: a vCPU thread may not open files
//! (seccomp), and inside the jail the cgroup file system is not mounted anyway.

use std::os::fd::RawFd;
use std::sync::OnceLock;

static FDS: OnceLock<Vec<RawFd>> = OnceLock::new();

/// Checks that each of `fds` is an open descriptor above 2 that can be written, marks it
/// close-on-exec, and has every vCPU thread started from now on join it. Once per process.
pub fn set(fds: &[RawFd]) -> Result<(), String> {
    for &fd in fds {
        let bad = |why: String| format!("--vcpu-cgroup-fd {fd}: {why}");
        if fd <= 2 {
            return Err(bad("not a cgroup's thread list (0 to 2 are stdio)".into()));
        }
        // SAFETY: fcntl only reads the flags of whatever descriptor `fd` is.
        let (fd_flags, fl) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFD),
                libc::fcntl(fd, libc::F_GETFL),
            )
        };
        if fd_flags < 0 || fl < 0 {
            let e = std::io::Error::last_os_error();
            return Err(bad(format!("not an open descriptor ({e})")));
        }
        if fl & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(bad("not open for writing".into()));
        }
        // SAFETY: sets the close-on-exec flag of an open descriptor tern was given.
        unsafe { libc::fcntl(fd, libc::F_SETFD, fd_flags | libc::FD_CLOEXEC) };
    }
    FDS.set(fds.to_vec())
        .map_err(|_| "the vCPU cgroups are set already".to_string())
}

/// Moves the calling thread into each vCPU cgroup (none unless [`set`]). A failure is a
/// warning: the vCPU then runs in the VM's cgroup.
pub fn join() {
    let Some(fds) = FDS.get().filter(|f| !f.is_empty()) else {
        return;
    };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() }.to_string();
    for &fd in fds {
        // SAFETY: writes the initialised bytes of `tid` to a descriptor checked by `set`.
        let n = unsafe { libc::write(fd, tid.as_ptr().cast(), tid.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(
                "vCPU thread {tid} stays out of its cgroup (--vcpu-cgroup-fd {fd}): {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn only_open_writable_descriptors_are_taken() {
        let e = set(&[1]).unwrap_err();
        assert!(e.contains("stdio"), "{e}");
        let e = set(&[987_654]).unwrap_err();
        assert!(
            e.starts_with("--vcpu-cgroup-fd 987654: not an open descriptor"),
            "{e}"
        );
        let ro = std::fs::File::open("/proc/self/status").unwrap();
        let e = set(&[ro.as_raw_fd()]).unwrap_err();
        assert!(e.contains("not open for writing"), "{e}");
        // A thread writes its id to each.
        let dir = std::env::temp_dir().join(format!("tern-vcpucg-{}", std::process::id()));
        let f = std::fs::File::create(&dir).unwrap();
        set(&[f.as_raw_fd()]).unwrap();
        // SAFETY: F_GETFD on an open descriptor.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        let tid = std::thread::spawn(|| {
            join();
            // SAFETY: gettid has no preconditions.
            unsafe { libc::gettid() }
        })
        .join()
        .unwrap();
        // (Other tests' vCPU threads may write theirs too.)
        let text = std::fs::read_to_string(&dir).unwrap();
        assert!(text.contains(&tid.to_string()), "{text}");
        assert!(set(&[]).is_err(), "once per process");
        let _ = std::fs::remove_file(&dir);
        // The descriptor stays open for the rest of this process (the setting stays too).
        std::mem::forget(f);
    }
}
