//! `tern jail` end to end, as root on the host's /dev/kvm: a jailed tern boots the probe
//! guest as an unprivileged user, in its chroot, namespaces and cgroup, with only the files
//! its VM needs; paths that would reach outside the jail, and bad arguments, are refused with
//! one line.

mod common;
mod jail_vcpus;

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The unprivileged user and group the jailed tern runs as.
const UID: u32 = 10123;
const GID: u32 = 10124;

/// True when this process is root. Otherwise fails under CI=true and skips loudly elsewhere.
fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if in_ci() {
        panic!("{test}: tern jail needs root under CI=true");
    }
    eprintln!("\n*** SKIPPED {test}: tern jail needs root ***\n");
    false
}

/// A scratch directory named after `name`, and in it the empty chroot base `base`.
fn scratch_and_base(name: &str) -> (Scratch, PathBuf) {
    let dir = Scratch::new(name);
    let base = dir.path("base");
    std::fs::create_dir(&base).unwrap();
    (dir, base)
}

/// `tern jail` with the ids above, `base`, `id` and `extra` flags, then `-- run ARGS`.
fn jail_cmd(base: &Path, id: &str, extra: &[&str], run: &[&str]) -> Command {
    let mut c = Command::new(tern());
    c.args([
        "jail",
        "--id",
        id,
        "--uid",
        &UID.to_string(),
        "--gid",
        &GID.to_string(),
    ])
    .args(["--chroot-base", s(base)])
    .args(extra)
    .arg("--")
    .arg("run")
    .args(run);
    c
}

/// Runs a command that must fail fast, returning its output.
fn output(mut c: Command) -> Output {
    c.stdin(Stdio::null()).output().expect("run tern")
}

/// Asserts `o` failed with status 1 and one line of stderr containing every piece of `want`.
fn refused(o: &Output, want: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("tern jail: "), "{err}");
    for w in want {
        assert!(err.contains(w), "'{w}' not in: {err}");
    }
}

/// The cgroup setting the boot test applies, for where this host has the cpu controller:
/// (flag, file, value read back).
fn cpu_limit() -> (String, &'static str, &'static str) {
    let v2_cpu = std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .filter_map(|l| l.split_whitespace().nth(1).map(PathBuf::from))
        .any(|m| {
            std::fs::read_to_string(m.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|w| w == "cpu"))
        });
    if v2_cpu {
        ("cpu.max=50000 100000".into(), "cpu.max", "50000 100000")
    } else {
        ("cpu.cfs_quota_us=50000".into(), "cpu.cfs_quota_us", "50000")
    }
}

/// The cgroup directory of `pid` in the hierarchy whose /proc/PID/cgroup line `pick` chooses,
/// as the host sees it.
fn cgroup_dir(pid: u32, pick: impl Fn(&str) -> bool) -> Option<PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let line = own
        .lines()
        .find(|l| pick(l.split(':').nth(1).unwrap_or("")))?;
    let (ctl, path) = line.split_once(':')?.1.split_once(':')?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let mount = mounts.lines().find_map(|m| {
        let f: Vec<&str> = m.split_whitespace().collect();
        let ok = match ctl {
            "" => f.get(2) == Some(&"cgroup2"),
            c => f.get(2) == Some(&"cgroup") && f.get(3)?.split(',').any(|o| o == c),
        };
        ok.then(|| PathBuf::from(f[1]))
    })?;
    Some(mount.join(path.trim_start_matches('/')))
}

/// Waits for the jailed tern: its pid from `tern.pid`, once it runs as the jail user.
fn wait_for_tern(jail: &Path, child: &mut Child) -> u32 {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("tern jail exited ({st}) early: {err}");
        }
        let pid = std::fs::read_to_string(jail.join("tern.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if status.contains(&format!("Uid:\t{UID}\t")) {
                return pid;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "tern did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `/proc/PID/status` field `key`.
fn status(pid: u32, key: &str) -> String {
    status_field(&format!("/proc/{pid}/status"), key)
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Every non-directory under `dir`, as absolute paths of the jail.
fn tree(dir: &Path, at: &Path, out: &mut BTreeSet<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let inside = at.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            tree(&e.path(), &inside, out);
        } else {
            out.insert(inside);
        }
    }
}

/// A file removed when dropped (the test's disk outside its scratch directory).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Removes a VM's cgroup `tern/ID`, and `tern` if no other VM uses it.
fn remove_cgroup(leaf: &Path) {
    let _ = std::fs::remove_dir(leaf);
    let _ = std::fs::remove_dir(leaf.parent().unwrap());
}

/// Waits for `child` with a timeout, returning (exit status, stderr).
fn finish(mut child: Child, timeout: Duration) -> (Option<i32>, String) {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > timeout {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_jailed_tern_boots_the_probe_as_an_unprivileged_user_in_its_chroot_and_cgroup() {
    let test = "a_jailed_tern_boots_the_probe_as_an_unprivileged_user_in_its_chroot_and_cgroup";
    if !require_root(test) || !require_kvm(test) {
        return;
    }
    let (dir, base) = scratch_and_base("jail-boot");
    // The kernel through a symlink: the jail gets the target itself at the link's path.
    let kernel = dir.path("kernel-link");
    std::os::unix::fs::symlink(probe(), &kernel).unwrap();
    // A writable disk the jail user owns (same file system: hard link) and a read-only one
    // on /dev/shm (another file system: a read-only bind mount).
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    std::os::unix::fs::chown(&disk, Some(UID), Some(GID)).unwrap();
    let shm_file = RemoveOnDrop(PathBuf::from(format!(
        "/dev/shm/tern-jail-{}.raw",
        std::process::id()
    )));
    let shm = shm_file.0.clone();
    std::fs::write(&shm, vec![0u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&shm, std::fs::Permissions::from_mode(0o644)).unwrap();
    let serial = dir.path("serial.log");
    let sock = dir.path("api/api.sock");
    // A vsock, whose socket tern makes in a directory of its own in the jail.
    let vsock = dir.path("vsock/v.sock");
    let vsock_arg = format!("cid=3,socket={}", s(&vsock));
    let id = format!("boot-{}", std::process::id());
    let (limit, limit_file, limit_value) = cpu_limit();
    let mut cmd = jail_cmd(
        &base,
        &id,
        &["--cgroup", &limit, "--resource-limit", "no-file=256"],
        &[
            "--kernel",
            s(&kernel),
            "--memory",
            "64M",
            "--cmdline",
            "probe.run=count probe.count_ms=4000",
            "--serial",
            &format!("file:{}", s(&serial)),
            "--api-socket",
            s(&sock),
            "--disk",
            &format!("path={}", s(&disk)),
            "--disk",
            &format!("path={},readonly=on", s(&shm)),
            "--vsock",
            &vsock_arg,
        ],
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let jail = base.join("tern").join(&id);
    let root = jail.join("root");
    let pid = wait_for_tern(&jail, &mut child);
    wait_until("the guest's first tick", Duration::from_secs(20), || {
        !ticks(&serial).is_empty()
    });

    // The user, its groups, its privileges.
    assert_eq!(status(pid, "Uid"), format!("{UID} {UID} {UID} {UID}"));
    assert_eq!(status(pid, "Gid"), format!("{GID} {GID} {GID} {GID}"));
    assert_eq!(status(pid, "Groups"), "");
    assert_eq!(status(pid, "NoNewPrivs"), "1");
    // Every thread has its seccomp filter, and tern was told to close Landlock around itself.
    assert_eq!(status(pid, "Seccomp"), "2");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        cmdline.split(|b| *b == 0).any(|a| a == b"--landlock"),
        "{:?}",
        String::from_utf8_lossy(&cmdline)
    );
    assert_eq!(status(pid, "CapEff"), "0000000000000000");
    assert_eq!(status(pid, "CapPrm"), "0000000000000000");
    // PID 1 of its own PID namespace; its own mount, IPC and UTS namespaces.
    let nspid = status(pid, "NSpid");
    assert_eq!(nspid, format!("{pid} 1"));
    for ns in ["mnt", "pid", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 256 ")),
        "{limits}"
    );
    // Its root is the jail.
    let their_root = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
    let jail_root = std::fs::metadata(&root).unwrap();
    assert_eq!(
        (their_root.dev(), their_root.ino()),
        (jail_root.dev(), jail_root.ino())
    );
    // Its cgroup is tern/ID, with the limit applied.
    let cg =
        cgroup_dir(pid, |c| c.split(',').any(|c| c == "cpu") || c.is_empty()).expect("cpu cgroup");
    assert!(cg.ends_with(format!("tern/{id}")), "{}", cg.display());
    let got = std::fs::read_to_string(cg.join(limit_file)).unwrap();
    assert_eq!(got.trim(), limit_value);

    // Exactly the expected files, as the jailed tern sees them.
    let mut seen = BTreeSet::new();
    tree(
        Path::new(&format!("/proc/{pid}/root")),
        Path::new("/"),
        &mut seen,
    );
    let tern_path = std::fs::canonicalize(tern()).unwrap();
    let want: BTreeSet<PathBuf> = [
        tern_path,
        kernel.clone(),
        disk.clone(),
        shm.clone(),
        serial.clone(),
        sock.clone(),
        vsock.clone(),
        PathBuf::from("/dev/kvm"),
    ]
    .into_iter()
    .collect();
    let libs: Vec<&PathBuf> = seen.difference(&want).collect();
    for l in &libs {
        let name = l.file_name().unwrap().to_string_lossy();
        let in_lib_dir = ["/lib", "/lib64", "/usr/lib", "/usr/lib64"]
            .iter()
            .any(|d| l.starts_with(d));
        assert!(
            in_lib_dir && name.contains(".so"),
            "unexpected file in the jail: {}",
            l.display()
        );
    }
    let missing: Vec<_> = want.difference(&seen).collect();
    assert!(missing.is_empty(), "missing in the jail: {missing:?}");
    // The symlink became the kernel itself; the device node belongs to the jail user.
    let inside = |p: &Path| PathBuf::from(format!("/proc/{pid}/root{}", p.display()));
    assert!(std::fs::symlink_metadata(inside(&kernel))
        .unwrap()
        .is_file());
    let kvm = std::fs::metadata(inside(Path::new("/dev/kvm"))).unwrap();
    assert_eq!(
        (kvm.uid(), kvm.gid(), kvm.mode() & 0o777),
        (UID, GID, 0o600)
    );
    // The /dev/shm disk is a read-only bind mount.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let shm_mount = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some(s(&shm)))
        .unwrap_or_else(|| panic!("no mount at {}: {mountinfo}", shm.display()));
    assert!(
        shm_mount
            .split_whitespace()
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "{shm_mount}"
    );
    // The serial file was made for the jail user where `tern run` would write it.
    let m = std::fs::metadata(&serial).unwrap();
    assert_eq!((m.uid(), m.gid()), (UID, GID));
    // The API answers on the socket inside the jail.
    let host_sock = root.join(sock.strip_prefix("/").unwrap());
    let info = Command::new(tern())
        .args(["info", "--api-socket", s(&host_sock)])
        .output()
        .unwrap();
    let info_out = String::from_utf8_lossy(&info.stdout);
    assert!(info_out.contains("state: running"), "{info_out}");
    // The vsock's socket is the jail user's, where the host reaches it.
    let host_vsock = root.join(vsock.strip_prefix("/").unwrap());
    let m = std::fs::symlink_metadata(&host_vsock).unwrap();
    assert!(m.file_type().is_socket(), "{}", host_vsock.display());
    assert_eq!((m.uid(), m.gid()), (UID, GID));
    std::os::unix::net::UnixStream::connect(&host_vsock).expect("connect to the vsock socket");

    // The guest finishes its count; tern jail exits as tern did.
    let (code, err) = finish(child, Duration::from_secs(60));
    assert_eq!(code, Some(0), "stderr: {err}");
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.contains("probe: done status=0"), "{text}");
    assert!(ticks(&serial).len() >= 10, "{text}");
    assert!(!host_vsock.exists(), "tern left its vsock socket behind");

    remove_cgroup(&cg);
}

/// A network namespace made with `ip netns add`, deleted when dropped.
struct NetNs(String);

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `ip args`, failing the test unless it succeeds.
fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("ip(8)");
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_jailed_tern_joins_a_cgroup_v2_and_a_network_namespace_with_its_tap() {
    let test = "a_jailed_tern_joins_a_cgroup_v2_and_a_network_namespace_with_its_tap";
    if !require_root(test) || !require_kvm(test) {
        return;
    }
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("cgroup2"));
    let have_ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted || !have_ip {
        let why = format!("cgroup2 mounted: {mounted}, ip(8): {have_ip}");
        if in_ci() {
            panic!("{test}: needs a cgroup2 hierarchy and iproute2 under CI=true ({why})");
        }
        eprintln!("\n*** SKIPPED {test}: needs a cgroup2 hierarchy and iproute2 ({why}) ***\n");
        return;
    }
    let (_dir, base) = scratch_and_base("jail-v2");
    let id = format!("v2-{}", std::process::id());
    // A namespace with a persistent TAP the jail user may attach to (the jailed tern cannot
    // create one: it has no CAP_NET_ADMIN).
    let ns = NetNs(format!("ternjail{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    let uid = UID.to_string();
    ip(&[
        "-n", &ns.0, "tuntap", "add", "dev", "tapj0", "mode", "tap", "user", &uid,
    ]);
    let ns_path = format!("/var/run/netns/{}", ns.0);
    let kernel = probe();
    // A core file every v2 cgroup has, whatever controllers are enabled.
    let mut cmd = jail_cmd(
        &base,
        &id,
        &[
            "--cgroup-version",
            "2",
            "--cgroup",
            "cgroup.max.depth=0",
            "--netns",
            &ns_path,
        ],
        &[
            "--kernel",
            s(&kernel),
            "--memory",
            "64M",
            "--cmdline",
            "probe.run=count probe.count_ms=1500",
            "--serial",
            "none",
            "--net",
            "tap=tapj0",
        ],
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = wait_for_tern(&base.join("tern").join(&id), &mut child);
    let cg = cgroup_dir(pid, str::is_empty).expect("v2 cgroup");
    assert!(cg.ends_with(format!("tern/{id}")), "{}", cg.display());
    let depth = std::fs::read_to_string(cg.join("cgroup.max.depth")).unwrap();
    assert_eq!(depth.trim(), "0");
    // In the namespace, with /dev/net/tun for its TAP.
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
    let named = std::fs::metadata(&ns_path).unwrap();
    assert_eq!(theirs.ino(), named.ino(), "network namespace");
    let tun = std::fs::metadata(format!("/proc/{pid}/root/dev/net/tun")).unwrap();
    assert_eq!((tun.uid(), tun.gid()), (UID, GID));
    let (code, err) = finish(child, Duration::from_secs(60));
    assert_eq!(code, Some(0), "stderr: {err}");
    remove_cgroup(&cg);
}

#[test]
fn a_daemonized_jail_detaches_and_can_stay_in_the_host_pid_namespace() {
    let test = "a_daemonized_jail_detaches_and_can_stay_in_the_host_pid_namespace";
    if !require_root(test) || !require_kvm(test) {
        return;
    }
    let (_dir, base) = scratch_and_base("jail-daemon");
    let id = format!("daemon-{}", std::process::id());
    // The kernel by a relative path: tern starts in the same directory inside the jail.
    let kernel = probe();
    let mut cmd = jail_cmd(
        &base,
        &id,
        &["--daemonize", "--no-new-pid-ns"],
        &[
            "--kernel",
            kernel.file_name().unwrap().to_str().unwrap(),
            "--memory",
            "64M",
            "--cmdline",
            "probe.run=count probe.count_ms=1500",
        ],
    );
    cmd.current_dir(kernel.parent().unwrap());
    // tern jail returns at once, tern goes on.
    let o = output(cmd);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty(), "a daemon's console goes to /dev/null");
    let pid: u32 = std::fs::read_to_string(base.join("tern").join(&id).join("tern.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(") ").unwrap().1;
    let session: u32 = after.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(session, pid, "a session of its own: {stat}");
    assert_eq!(
        status(pid, "NSpid"),
        pid.to_string(),
        "the host's PID namespace"
    );
    for fd in 0..3 {
        let m = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(m.file_type().is_char_device() && m.rdev() == libc::makedev(1, 3));
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    let rel = kernel.parent().unwrap().strip_prefix("/").unwrap();
    assert!(cwd.ends_with(rel), "{cwd:?}");
    wait_until("the daemon to exit", Duration::from_secs(30), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
}

#[test]
fn paths_that_would_reach_outside_the_jail_are_refused() {
    let test = "paths_that_would_reach_outside_the_jail_are_refused";
    if !require_root(test) {
        return;
    }
    let (dir, base) = scratch_and_base("jail-escape");
    let id = format!("esc-{}", std::process::id());
    let root = base.join("tern").join(&id).join("root");
    // A symlink to a file the jail user may not read: refused after resolving it.
    let link = dir.path("shadow-link");
    std::os::unix::fs::symlink("/etc/shadow", &link).unwrap();
    let o = output(jail_cmd(&base, &id, &[], &["--kernel", s(&link)]));
    refused(
        &o,
        &["the kernel", "resolved to /etc/shadow", "may not read it"],
    );
    assert!(!root.exists(), "a refused jail is removed");
    // A hard link to it (same file system as /etc only): the same inode, the same answer.
    let hard = dir.path("shadow-hard");
    if std::fs::hard_link("/etc/shadow", &hard).is_ok() {
        let o = output(jail_cmd(&base, &id, &[], &["--kernel", s(&hard)]));
        refused(&o, &["the kernel", "may not read it"]);
    } else {
        eprintln!("note: /etc is on another file system; the hard-link case is not tried");
    }
    // A disk that is a symlink to a readable file outside, but writable only by root.
    let o = output(jail_cmd(
        &base,
        &id,
        &[],
        &["--kernel", s(&probe()), "--disk", "path=/etc/hostname"],
    ));
    refused(&o, &["disk 0 /etc/hostname", "may not read and write it"]);
    // '..' is refused even where it would end at a readable file.
    let sub = dir.path("sub");
    std::fs::create_dir(&sub).unwrap();
    let dotdot = format!("{}/../../../../../../etc/hostname", s(&sub));
    let o = output(jail_cmd(&base, &id, &[], &["--kernel", &dotdot]));
    refused(&o, &["'..' is not allowed"]);
    // A missing file.
    let o = output(jail_cmd(
        &base,
        &id,
        &[],
        &["--kernel", "/nonexistent/kernel"],
    ));
    refused(
        &o,
        &[
            "the kernel /nonexistent/kernel",
            "No such file or directory",
        ],
    );
    assert!(!root.exists());
}

#[test]
fn bad_arguments_get_one_line_errors() {
    let test = "bad_arguments_get_one_line_errors";
    if !require_root(test) {
        return;
    }
    let (dir, base) = scratch_and_base("jail-args");
    let k = probe();
    let run = ["--kernel", s(&k)];
    for bad in ["a/b", "", "..", "white space", &"x".repeat(65)] {
        let o = output(jail_cmd(&base, bad, &[], &run));
        refused(&o, &["--id"]);
    }
    let o = output(jail_cmd(Path::new("relative"), "ok", &[], &run));
    refused(&o, &["--chroot-base relative: not an absolute path"]);
    let o = output(jail_cmd(&dir.path("missing"), "ok", &[], &run));
    refused(&o, &["not an existing directory"]);
    let o = output(jail_cmd(&base, "ok", &["--cgroup", "nosuch.knob=1"], &run));
    refused(&o, &["no cgroup hierarchy has the nosuch controller"]);
    let o = output(jail_cmd(
        &base,
        "ok",
        &["--resource-limit", "nproc=1"],
        &run,
    ));
    refused(&o, &["unknown resource 'nproc'"]);
    let o = output(jail_cmd(&base, "ok", &[], &["--memory", "lots"]));
    refused(&o, &["the run arguments"]);
    let mut root_uid = Command::new(tern());
    root_uid.args([
        "jail",
        "--id",
        "ok",
        "--uid",
        "0",
        "--gid",
        "0",
        "--chroot-base",
        s(&base),
    ]);
    root_uid.args(["--", "run"]).args(run);
    refused(&output(root_uid), &["must not be 0"]);
    let mut info = Command::new(tern());
    info.args([
        "jail",
        "--id",
        "ok",
        "--uid",
        "1",
        "--gid",
        "1",
        "--chroot-base",
        s(&base),
    ]);
    info.args(["--", "info"]);
    refused(&output(info), &["-- run ARGS"]);
    // A base others could swap directories in, or a `tern` directory that is not root's.
    let open = dir.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    refused(
        &output(jail_cmd(&open, "ok", &[], &run)),
        &["writable by everyone"],
    );
    let theirs = dir.path("theirs");
    std::fs::create_dir_all(theirs.join("tern")).unwrap();
    std::os::unix::fs::chown(theirs.join("tern"), Some(UID), Some(GID)).unwrap();
    refused(
        &output(jail_cmd(&theirs, "ok", &[], &run)),
        &["must be root's"],
    );
    // A jail that is there already (running, or left over).
    let busy = base.join("tern/busy/root");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("x"), "").unwrap();
    let o = output(jail_cmd(&base, "busy", &[], &run));
    refused(&o, &["exists and is not empty"]);
    // Not root: as the unprivileged user (tern's own directory must be reachable to it).
    let mut c = jail_cmd(&base, "ok", &[], &run);
    c.uid(UID).gid(GID);
    match c.stdin(Stdio::null()).output() {
        Ok(o) => refused(&o, &["must run as root"]),
        Err(e) => eprintln!("note: cannot run tern as uid {UID} here ({e}); not tried"),
    }
}

#[test]
fn a_snapshot_restores_in_a_jail() {
    let test = "a_snapshot_restores_in_a_jail";
    if !require_root(test) || !require_kvm(test) {
        return;
    }
    let (dir, base) = scratch_and_base("jail-restore");
    // A counting VM, paused after its first ticks and snapshotted (unjailed).
    let sock = dir.path("a.sock");
    let log = dir.path("a.log");
    let kernel = probe();
    let vm = Command::new(tern())
        .args(["run", "--kernel", s(&kernel), "--memory", "64M"])
        .args(["--cmdline", "probe.run=count probe.count_ms=3000"])
        .args(["--serial", &format!("file:{}", s(&log))])
        .args(["--api-socket", s(&sock)])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the first ticks", Duration::from_secs(20), || {
        ticks(&log).len() >= 3
    });
    let api = |args: &[&str]| {
        let o = Command::new(tern()).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    api(&["pause", "--api-socket", s(&sock)]);
    let before = ticks(&log).last().unwrap().0;
    let snap = dir.path("snap");
    api(&[
        "snapshot",
        "create",
        "--api-socket",
        s(&sock),
        "--dir",
        s(&snap),
    ]);
    api(&["shutdown", "--force", "--api-socket", s(&sock)]);
    finish(vm, Duration::from_secs(20));
    // Snapshot files are owner-only: as root's they stay out of the jail.
    let id = format!("restore-{}", std::process::id());
    let restored = dir.path("restored.log");
    let args = [
        "--restore",
        s(&snap),
        "--serial",
        &format!("file:{}", s(&restored)),
    ];
    let o = output(jail_cmd(&base, &id, &[], &args));
    refused(&o, &["snapshot file state.json", "may not read it"]);
    // Given to the jail user, they restore, and the count goes on to its end.
    for e in std::fs::read_dir(&snap).unwrap() {
        std::os::unix::fs::chown(e.unwrap().path(), Some(UID), Some(GID)).unwrap();
    }
    let child = jail_cmd(&base, &id, &[], &args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, err) = finish(child, Duration::from_secs(60));
    assert_eq!(code, Some(0), "stderr: {err}");
    let text = std::fs::read_to_string(&restored).unwrap();
    assert!(text.contains("probe: done status=0"), "{text}");
    let after = ticks(&restored);
    assert!(
        after.first().is_some_and(|t| t.0 > before),
        "{before} then {text}"
    );
}
