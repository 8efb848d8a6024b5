//! What each thread of tern may ask of the kernel: the allow-lists, as data, in one place.
//!
//! A thread gets [`COMMON`] plus its role's list. Calls are named as the kernel's system call
//! table names them; a call with conditions is allowed only when one of its rules matches
//! (conditions compare whole 64-bit arguments). Everything else stops tern (see
//! [`crate::seccomp`]); the calls [`refused`] names fail with an error instead.
//!
//! How the lists were made: every thread of tern ran the whole test suite (probe guests and
//! Linux guests, snapshots, disks, network) under `strace -ff`, with each thread's calls
//! grouped by the name it gives itself; the lists hold what those runs used, plus what the
//! same code reaches on paths the tests make rare (errors, aborts). Review them when a thread
//! gains work: the suite runs with the filters on and fails on any violation.

use lifecycle::threads::{Device, Role};

/// A condition on argument `.0` (counted from 0) of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// The argument equals the value.
    Eq(u8, u64),
    /// The argument, masked with `.1`, equals `.2`.
    MaskedEq(u8, u64, u64),
}

/// One allowed call: always (no conditions) or when all of `when` hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The call's name.
    pub syscall: &'static str,
    /// The conditions, all of which must hold (none: always allowed).
    pub when: &'static [Arg],
}

const fn any(syscall: &'static str) -> Rule {
    Rule { syscall, when: &[] }
}

const fn when(syscall: &'static str, when: &'static [Arg]) -> Rule {
    Rule { syscall, when }
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
/// `ioctl` requests of KVM (type byte `KVMIO`, 0xAE) on KVM's descriptors.
const KVM_IOCTLS: &[Arg] = &[Arg::MaskedEq(1, 0xff00, 0xae00)];

/// Calls every thread makes: memory for its allocator (never executable), its stack and exit,
/// locks, time, random keys for hash maps, reading and writing the descriptors it was handed,
/// waiting on its event loop (and resuming a wait after a stop), and `abort`.
pub const COMMON: &[Rule] = &[
    any("read"),
    any("readv"),
    any("write"),
    any("writev"),
    any("close"),
    any("futex"),
    any("exit"),
    any("exit_group"),
    any("rt_sigreturn"),
    // A timed wait (a sleep, a futex with a timeout) that a stop signal interrupted resumes
    // through it when tern is continued (job control, `kill -STOP`/`-CONT`, a debugger).
    any("restart_syscall"),
    any("rt_sigprocmask"),
    any("sigaltstack"),
    any("munmap"),
    any("brk"),
    any("mremap"),
    when("mmap", &[Arg::MaskedEq(2, PROT_EXEC, 0)]),
    when("mprotect", &[Arg::MaskedEq(2, PROT_EXEC, 0)]),
    when("madvise", &[Arg::Eq(2, libc::MADV_DONTNEED as u64)]),
    any("gettid"),
    any("getpid"),
    any("sched_getaffinity"),
    any("sched_yield"),
    any("clock_gettime"),
    any("clock_nanosleep"),
    any("nanosleep"),
    any("getrandom"),
    any("epoll_wait"),
    any("epoll_pwait"),
    when("fcntl", &[Arg::Eq(1, libc::F_GETFD as u64)]),
    when("fcntl", &[Arg::Eq(1, libc::F_SETFD as u64)]),
    when("fcntl", &[Arg::Eq(1, libc::F_GETFL as u64)]),
    when("fcntl", &[Arg::Eq(1, libc::F_SETFL as u64)]),
    when("fcntl", &[Arg::Eq(1, libc::F_DUPFD_CLOEXEC as u64)]),
    // `abort` (a panic in a release build) raises SIGABRT at its own thread.
    when("tgkill", &[Arg::Eq(2, libc::SIGABRT as u64)]),
    // Allowed here only to be refused (see `refused`).
    any("openat"),
    any("open"),
    any("clone3"),
    any("clone"),
];

/// Calls that fail with an error instead of stopping tern, `(name, errno)`, for threads of
/// `role` (stacked on the role's own filter, which allows them, since of two filters the kernel
/// takes the stricter answer, and a stop is stricter than an error):
/// - new threads (`clone3`, `clone`), except on the spawner: a thread that tries gets `EPERM`.
///   A stop would be no clearer: glibc blocks every signal around `clone3`, so the kernel
///   would kill tern with `SIGSYS` before the handler could name the call.
/// - opening files (`openat`, `open`), except on the VMM's own threads: glibc's allocator
///   opens `/proc/sys/vm/overcommit_memory` from whichever thread first gives memory of a heap
///   back, and copes with `EACCES`.
pub fn refused(role: Role) -> Vec<(&'static str, i32)> {
    let mut calls = Vec::new();
    if role != Role::Spawner {
        calls.extend([("clone3", libc::EPERM), ("clone", libc::EPERM)]);
    }
    if !matches!(role, Role::Vmm | Role::Spawner) {
        calls.extend([("openat", libc::EACCES), ("open", libc::EACCES)]);
    }
    calls
}

/// Waking another thread or the main loop, and the event loop's own set-up.
const EVENTS: &[Rule] = &[
    any("epoll_create1"),
    any("epoll_ctl"),
    any("eventfd2"),
    any("timerfd_create"),
    any("timerfd_settime"),
    any("timerfd_gettime"),
];

/// A vCPU: `KVM_RUN` and the register and state ioctls, the device registers it exits to,
/// and activating a device when the guest's driver starts it (which builds the device's event
/// loop, its eventfds and timers, and a disk's io_uring; the worker thread itself comes from
/// the spawner).
const VCPU: &[Rule] = &[
    when("ioctl", KVM_IOCTLS),
    any("io_uring_setup"),
    any("io_uring_register"),
    any("io_uring_enter"),
    // The TAP device is told its offloads and header size when the driver starts a NIC.
    when("ioctl", &[Arg::Eq(1, libc::TUNSETOFFLOAD)]),
    when("ioctl", &[Arg::Eq(1, libc::TUNSETVNETHDRSZ)]),
    any("pread64"),
    any("pwrite64"),
];

/// Reading, writing and flushing open files at positions, and looking at them.
const FILE_IO: &[Rule] = &[
    any("pread64"),
    any("pwrite64"),
    any("preadv"),
    any("pwritev"),
    any("preadv2"),
    any("pwritev2"),
    any("fsync"),
    any("fdatasync"),
    any("fallocate"),
    any("lseek"),
    any("ftruncate"),
    any("fstat"),
    any("newfstatat"),
    any("statx"),
];

/// `BLKDISCARD` and `BLKZEROOUT` (`block::raw`): discard and write-zeroes on a host block
/// device.
const BLKDISCARD: u64 = 0x1277;
const BLKZEROOUT: u64 = 0x127f;

/// A disk's worker: its image through io_uring or [`FILE_IO`], flushes, discard (a host block
/// device's through its ioctls).
const BLOCK: &[Rule] = &[
    any("io_uring_enter"),
    any("io_uring_register"),
    when("ioctl", &[Arg::Eq(1, BLKDISCARD)]),
    when("ioctl", &[Arg::Eq(1, BLKZEROOUT)]),
];

/// A NIC's worker: its TAP device.
const NET: &[Rule] = &[];

/// The entropy device's worker.
const RNG: &[Rule] = &[];

/// The balloon's worker: freeing guest memory. Private anonymous memory goes with
/// `MADV_DONTNEED` (in [`COMMON`]), shared memory with `MADV_REMOVE`, and a lazily restored
/// snapshot's copy-on-write file mapping by mapping fresh anonymous memory over the range
/// (`mmap` with `MAP_FIXED`, in [`COMMON`]).
const BALLOON: &[Rule] = &[when("madvise", &[Arg::Eq(2, libc::MADV_REMOVE as u64)])];

/// The console's worker: its character device.
const CONSOLE: &[Rule] = &[any("poll"), any("ppoll")];

/// Serving connections on a socket that is already listening.
const CONNECTIONS: &[Rule] = &[
    any("accept4"),
    any("recvfrom"),
    any("sendto"),
    any("recvmsg"),
    any("sendmsg"),
    any("shutdown"),
    any("getsockopt"),
    any("setsockopt"),
    any("getsockname"),
    any("getpeername"),
];

/// virtio-vsock: accepting host connections on its listening Unix socket, connecting to the
/// host's `<socket>_<port>` sockets for the guest, with [`CONNECTIONS`].
const VSOCK: &[Rule] = &[
    when("socket", &[Arg::Eq(0, libc::AF_UNIX as u64)]),
    any("connect"),
    // Whether a host connection that ended its input closed altogether (POLLHUP).
    any("poll"),
    any("ppoll"),
    when("ioctl", &[Arg::Eq(1, libc::FIONBIO)]),
    any("epoll_ctl"),
];

/// The API thread: an HTTP server on a Unix socket (tokio on one thread), with
/// [`CONNECTIONS`].
const API: &[Rule] = &[when("ioctl", &[Arg::Eq(1, libc::FIONBIO)])];

/// Terminal input and buffered character output.
const IO: &[Rule] = &[any("poll"), any("ppoll")];

/// The spawner: new threads (`clone3` and `clone`, in [`COMMON`] and refused to every other
/// role), their stacks and names, and their filters. It
/// also gets every other role's calls, since each thread starts under its filter.
const SPAWNER: &[Rule] = &[
    any("set_robust_list"),
    any("rseq"),
    when("prctl", &[Arg::Eq(0, libc::PR_SET_NAME as u64)]),
    when("prctl", &[Arg::Eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)]),
    any("seccomp"),
];

/// A migration's sending thread (and its vCPU throttle): KVM's dirty log and the state
/// ioctls of the VM (saving it at the switch-over), kicking vCPUs out of `KVM_RUN`, and one
/// connection to the destination, TCP or Unix, with [`CONNECTIONS`].
const MIGRATION: &[Rule] = &[
    when("ioctl", KVM_IOCTLS),
    // Connecting with a timeout switches the socket to non-blocking and back.
    when("ioctl", &[Arg::Eq(1, libc::FIONBIO)]),
    any("tgkill"),
    when("socket", &[Arg::Eq(0, libc::AF_UNIX as u64)]),
    when("socket", &[Arg::Eq(0, libc::AF_INET as u64)]),
    when("socket", &[Arg::Eq(0, libc::AF_INET6 as u64)]),
    any("connect"),
    any("poll"),
    any("ppoll"),
    any("flock"),
    // Finding the data in shared guest memory's file (SEEK_DATA, SEEK_HOLE), and the pages
    // of private guest memory the host gave it (/proc/self/pagemap).
    any("lseek"),
    any("pread64"),
];

/// The VMM's own threads (the main loop, preparing a VM, registering memory, the INTx
/// resampler): building and rebuilding the VM (files, `/dev/kvm`, TAP devices, guest memory),
/// the API's requests (snapshots), signals. Everything a VMM does, but never a new program, a
/// process, a mount, a module, another process's memory or privileges.
const VMM: &[Rule] = &[
    when("ioctl", KVM_IOCTLS),
    // The process' peak memory and CPU time, for `GET /v1/vm/counters` and `GET /metrics`.
    any("getrusage"),
    // Type 'T' (0x54): TAP set-up (TUNSETIFF, TUNSETOFFLOAD, …), the terminal (TCGETS,
    // TCSETS), FIONBIO.
    when("ioctl", &[Arg::MaskedEq(1, 0xff00, 0x5400)]),
    // Type 0x12: a host block device's size, block sizes and read-only flag, read when a
    // disk on it is opened (BLKGETSIZE64, BLKSSZGET, BLKPBSZGET, BLKROGET).
    when("ioctl", &[Arg::MaskedEq(1, 0xff00, 0x1200)]),
    any("openat"),
    any("open"),
    any("creat"),
    any("mkdirat"),
    any("mkdir"),
    any("unlinkat"),
    any("unlink"),
    any("renameat"),
    any("renameat2"),
    any("rename"),
    any("linkat"),
    any("symlinkat"),
    any("readlinkat"),
    any("readlink"),
    any("fchmod"),
    any("fchmodat"),
    any("chmod"),
    any("fchown"),
    any("umask"),
    any("access"),
    any("faccessat"),
    any("faccessat2"),
    any("stat"),
    any("lstat"),
    any("statfs"),
    any("fstatfs"),
    any("getdents64"),
    any("getcwd"),
    any("sendfile"),
    any("copy_file_range"),
    any("sync_file_range"),
    any("flock"),
    any("dup"),
    any("dup2"),
    any("dup3"),
    any("pipe2"),
    any("fcntl"),
    any("poll"),
    any("ppoll"),
    any("memfd_create"),
    // The UEFI variable flash goes back to its file when its VM ends (`devices::flash`).
    any("msync"),
    any("mincore"),
    any("madvise"),
    any("mlock"),
    any("munlock"),
    any("io_uring_setup"),
    any("io_uring_register"),
    any("io_uring_enter"),
    any("userfaultfd"),
    any("signalfd4"),
    any("rt_sigaction"),
    any("rt_sigtimedwait"),
    any("rt_sigpending"),
    // Kicking vCPUs out of KVM_RUN.
    any("tgkill"),
    // Whether the process that left a snapshot's temporary files behind still runs.
    when("kill", &[Arg::Eq(1, 0)]),
    // Unix sockets (the API socket, checking a stale one) and, for a migration's destination,
    // TCP, with CONNECTIONS.
    when("socket", &[Arg::Eq(0, libc::AF_UNIX as u64)]),
    when("socket", &[Arg::Eq(0, libc::AF_INET as u64)]),
    when("socket", &[Arg::Eq(0, libc::AF_INET6 as u64)]),
    any("socketpair"),
    any("bind"),
    any("listen"),
    any("connect"),
    any("prlimit64"),
    any("getrlimit"),
    any("getuid"),
    any("geteuid"),
    any("getgid"),
    any("getegid"),
    any("sched_setaffinity"),
    any("uname"),
    any("sysinfo"),
];

/// The rules of `role`: [`COMMON`] and its own (the spawner's own only; see
/// [`crate::compile::role_rules`]).
pub fn rules(role: Role) -> Vec<Rule> {
    let own: &[&[Rule]] = match role {
        Role::Vmm => &[VMM, FILE_IO, CONNECTIONS, EVENTS],
        Role::Vcpu => &[VCPU, EVENTS],
        Role::DeviceWorker(Device::Block) => &[BLOCK, FILE_IO, EVENTS],
        Role::DeviceWorker(Device::Net) => &[NET, EVENTS],
        Role::DeviceWorker(Device::Rng) => &[RNG, EVENTS],
        Role::DeviceWorker(Device::Console) => &[CONSOLE, EVENTS],
        // virtio-mem frees unplugged memory the way the balloon frees what it is given.
        Role::DeviceWorker(Device::Balloon | Device::Mem) => &[BALLOON, EVENTS],
        Role::DeviceWorker(Device::Vsock) => &[VSOCK, CONNECTIONS, EVENTS],
        Role::Api => &[API, CONNECTIONS, EVENTS],
        Role::Io => &[IO],
        Role::Spawner => &[SPAWNER],
        Role::Migration => &[MIGRATION, CONNECTIONS, EVENTS],
    };
    COMMON
        .iter()
        .chain(own.iter().flat_map(|l| l.iter()))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{number, role_rules, ROLES};

    /// Calls no thread of tern may make: new programs and processes, debugging other
    /// processes or reading their memory, mounts and namespaces, identities, kernel modules
    /// and images, eBPF, keys, the clock, the machine.
    const NEVER: &[&str] = &[
        "execve",
        "execveat",
        "fork",
        "vfork",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "setns",
        "unshare",
        "setuid",
        "setgid",
        "setreuid",
        "setresuid",
        "capset",
        "init_module",
        "finit_module",
        "delete_module",
        "kexec_load",
        "kexec_file_load",
        "bpf",
        "perf_event_open",
        "keyctl",
        "add_key",
        "request_key",
        "personality",
        "reboot",
        "swapon",
        "settimeofday",
        "clock_settime",
    ];

    #[test]
    fn every_call_named_exists_and_no_role_may_make_the_dangerous_ones() {
        for &role in ROLES {
            for r in role_rules(role) {
                assert!(
                    number(r.syscall).is_some(),
                    "{}: {}",
                    role.name(),
                    r.syscall
                );
                assert!(
                    !NEVER.contains(&r.syscall),
                    "{} may call {}",
                    role.name(),
                    r.syscall
                );
            }
            for (n, _) in refused(role) {
                assert!(number(n).is_some(), "{n}");
            }
        }
    }

    #[test]
    fn only_the_spawner_starts_threads_and_only_vmm_threads_open_files() {
        for &role in ROLES {
            let names: Vec<&str> = refused(role).iter().map(|c| c.0).collect();
            assert_eq!(names.contains(&"clone3"), role != Role::Spawner);
            assert_eq!(
                names.contains(&"openat"),
                !matches!(role, Role::Vmm | Role::Spawner)
            );
        }
    }
}
