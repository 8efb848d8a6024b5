//! `tern jail`: runs `tern run` confined, as Firecracker's jailer runs Firecracker.
//!
//! In order: checks the arguments (id, ids, chroot base; only root may jail), closes every
//! inherited descriptor above 2, reads the `run` arguments with tern's own parser
//! ([`super::Cli`], [`super::RunArgs::into_config`], [`vmm::snapshot::open`] for `--restore`)
//! to learn which host files the VM needs, builds `DIR/tern/ID/root` holding only those files
//! at the same absolute paths (hard links, or read-only-where-possible bind mounts across file
//! systems), the device nodes and tern itself with its shared libraries ([`tree`]), places the
//! process in `tern/ID` cgroups and opens the thread lists of `tern/ID/vcpus` for tern's vCPU
//! threads ([`cgroup`]), sets rlimits, joins `--netns`, enters new mount, IPC, UTS and (by
//! default) PID namespaces, `pivot_root`s into the jail (where the root is the initramfs:
//! moves the jail onto `/` and `chroot`s, see [`sys::pivot_into`]), sets
//! `PR_SET_NO_NEW_PRIVS`, drops supplementary groups, becomes `--uid`:`--gid` and execs tern
//! with `run ARGS…` (and `--vcpu-cgroup-fd N` for those thread lists) and an empty environment
//! ([`sys`]).
//!
//! Hand-written on libc rather than a container runtime crate: the jailer is a few dozen
//! system calls in a fixed order, each of which has to be checked and explained, and it has to
//! know tern's configuration to decide what goes into the jail.

mod cgroup;
mod sys;
mod tree;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use tree::{Access, Need};

/// Default `no-file` limit when no `--resource-limit no-file=N` is given (as Firecracker's).
const DEFAULT_NO_FILE: u64 = 2048;

/// The `tern jail` flags.
#[derive(clap::Args)]
pub struct JailArgs {
    /// The VM's id: 1 to 64 ASCII letters, digits and '-'. Names the jail `DIR/tern/ID` and
    /// the cgroup `tern/ID`.
    #[arg(long)]
    id: String,
    /// The user tern runs as (not 0).
    #[arg(long, value_name = "UID")]
    uid: u32,
    /// The group tern runs as (its only group; not 0).
    #[arg(long, value_name = "GID")]
    gid: u32,
    /// An absolute, existing directory; the jail is built in DIR/tern/ID/root.
    #[arg(long, value_name = "DIR")]
    chroot_base: PathBuf,
    /// Join this network namespace (e.g. /var/run/netns/NAME) before running tern.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Write VALUE to FILE of the VM's cgroup tern/ID (repeatable), e.g. cpu.max=50000 100000
    /// (v2) or cpu.cfs_quota_us=50000 (v1). The controller is FILE's prefix.
    #[arg(long, value_name = "FILE=VALUE")]
    cgroup: Vec<String>,
    /// Write VALUE to FILE of the cgroup tern/ID/vcpus (repeatable), which tern's vCPU threads
    /// join (its other threads stay in tern/ID), e.g. cpu.cfs_quota_us=50000 (v1) or
    /// cpu.max=50000 100000 (v2, where tern/ID/vcpus is threaded: cpu, cpuset, perf_event and
    /// pids files only).
    #[arg(long, value_name = "FILE=VALUE")]
    vcpu_cgroup: Vec<String>,
    /// Which cgroup hierarchy the --cgroup and --vcpu-cgroup files are in: 1, 2, or auto (v2
    /// where the controller is enabled there, else v1).
    #[arg(long, value_name = "VERSION", default_value = "auto", value_parser = ["1", "2", "auto"])]
    cgroup_version: String,
    /// An rlimit for tern (repeatable): no-file=N (default 2048) or fsize=BYTES.
    #[arg(long, value_name = "RESOURCE=N")]
    resource_limit: Vec<String>,
    /// Detach: a new session, standard input and output on /dev/null; `tern jail` exits once
    /// tern started.
    #[arg(long)]
    daemonize: bool,
    /// Run tern in a new PID namespace (the default; accepted for Firecracker's flag).
    #[arg(long, overrides_with = "no_new_pid_ns")]
    new_pid_ns: bool,
    /// Run tern in the host's PID namespace (tern replaces `tern jail` unless --daemonize).
    #[arg(long)]
    no_new_pid_ns: bool,
    /// Do not add --landlock to the run arguments (jailed, tern runs with Landlock unless
    /// told not to).
    #[arg(long)]
    no_landlock: bool,
    /// `run` and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "run ARGS")]
    command: Vec<String>,
}

/// `tern jail`: on success this does not return in the process that becomes tern.
pub fn main(args: JailArgs) -> ExitCode {
    match jail(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern jail: {e:#}");
            ExitCode::from(super::EXIT_VMM_ERROR)
        }
    }
}

/// What the `run` arguments make tern open.
#[derive(Default, Debug)]
pub struct Plan {
    /// Host files to link into the jail.
    pub files: Vec<Need>,
    /// Directories tern creates a file in (the API socket's, the vsock's): made in the jail, owned by the
    /// jail user.
    pub writable_dirs: Vec<PathBuf>,
    /// Whether a virtio-net device needs /dev/net/tun.
    pub tun: bool,
    /// Whether a path was relative (the jailed tern then starts in the same directory).
    pub relative: bool,
}

impl Plan {
    fn add(&mut self, path: &Path, access: Access, what: impl Into<String>) {
        self.relative |= path.is_relative();
        self.files.push(Need {
            path: path.to_path_buf(),
            access,
            what: what.into(),
        });
    }
}

fn jail(args: JailArgs) -> Result<ExitCode> {
    // Nothing the caller left open may reach the jail.
    sys::close_inherited_fds()?;
    // The jail's directories are 0755 whatever the caller's umask.
    // SAFETY: umask only sets this process's file creation mask.
    unsafe { libc::umask(0o022) };
    check_id(&args.id)?;
    if args.uid == 0 || args.gid == 0 {
        bail!("--uid and --gid must not be 0: the jail runs tern unprivileged");
    }
    if !args.chroot_base.is_absolute() {
        bail!(
            "--chroot-base {}: not an absolute path",
            args.chroot_base.display()
        );
    }
    if !args.chroot_base.is_dir() {
        bail!(
            "--chroot-base {}: not an existing directory",
            args.chroot_base.display()
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("tern jail must run as root (it creates namespaces, device nodes and cgroups)");
    }
    let cgroups = (args.cgroup.iter().map(|s| (s, false)))
        .chain(args.vcpu_cgroup.iter().map(|s| (s, true)))
        .map(|(s, vcpu)| cgroup::Setting::parse(s, vcpu))
        .collect::<Result<Vec<_>>>()?;
    let version = match args.cgroup_version.as_str() {
        "1" => cgroup::Version::V1,
        "2" => cgroup::Version::V2,
        _ => cgroup::Version::Auto,
    };
    let limits = resource_limits(&args.resource_limit)?;
    let netns = match &args.netns {
        Some(p) => Some(sys::open_netns(p)?),
        None => None,
    };
    let plan = plan(&args.command)?;

    let base = args
        .chroot_base
        .canonicalize()
        .with_context(|| format!("--chroot-base {}", args.chroot_base.display()))?;
    let mut jail = tree::Tree::create(&base, &args.id, args.uid, args.gid)?;
    // Until the jail's mounts exist, a failure removes what was built, so that the id can be
    // used again.
    let prepared = prepare(&args, &mut jail, &plan, &cgroups, version, &limits, netns);
    let (cwd, devnull, vcpu_fds) = match prepared {
        Ok(p) => p,
        Err(e) => {
            jail.remove();
            return Err(e);
        }
    };
    let pid_dir = jail.jail_dir_fd()?;
    jail.mount_and_pivot(&cwd)?;

    let command = run_command(&args, &vcpu_fds);
    let exec = sys::Exec::new(&jail.tern_path, &command, args.uid, args.gid)?;
    if args.no_new_pid_ns && !args.daemonize {
        // tern becomes this process.
        sys::write_pid_file(&pid_dir, std::process::id() as i32)?;
        drop(pid_dir);
        return Err(exec.run());
    }
    sys::fork_and_exec(exec, pid_dir, devnull, args.daemonize)
}

/// Fills the jail, applies cgroups and rlimits, joins the network namespace and enters the new
/// namespaces: returns the directory tern starts in, for a daemon /dev/null, and the thread
/// lists of the vCPU cgroups (inherited by tern).
fn prepare(
    args: &JailArgs,
    jail: &mut tree::Tree,
    plan: &Plan,
    cgroups: &[cgroup::Setting],
    version: cgroup::Version,
    limits: &[(sys::Resource, u64)],
    netns: Option<OwnedFd>,
) -> Result<(PathBuf, Option<OwnedFd>, Vec<OwnedFd>)> {
    jail.populate(plan)?;
    let cwd = if plan.relative {
        let cwd = std::env::current_dir().context("the current directory")?;
        jail.mkdirs(&cwd)?;
        cwd
    } else {
        PathBuf::from("/")
    };
    let vcpu_fds = cgroup::apply(cgroups, version, &args.id)?;
    for (resource, value) in limits {
        sys::set_rlimit(*resource, *value)?;
    }
    if let Some(fd) = &netns {
        sys::join_netns(fd, args.netns.as_deref().unwrap_or(Path::new("")))?;
    }
    sys::unshare_namespaces(!args.no_new_pid_ns)?;
    sys::set_hostname(&args.id)?;
    let devnull = if args.daemonize {
        Some(sys::open_dev_null()?)
    } else {
        None
    };
    Ok((cwd, devnull, vcpu_fds))
}

/// An id is 1 to 64 ASCII letters, digits and '-' (it becomes a directory and cgroup name).
fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 64 {
        bail!("--id '{id}': must be 1 to 64 characters");
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_alphanumeric() && *c != '-') {
        bail!("--id '{id}': '{c}' is not allowed (only ASCII letters, digits and '-')");
    }
    Ok(())
}

/// `--resource-limit` values as (resource, limit).
fn resource_limits(specs: &[String]) -> Result<Vec<(sys::Resource, u64)>> {
    let mut out = Vec::new();
    for s in specs {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| anyhow!("--resource-limit '{s}': expected RESOURCE=N"))?;
        let r = match k {
            "no-file" => sys::Resource::NoFile,
            "fsize" => sys::Resource::Fsize,
            _ => bail!("--resource-limit '{s}': unknown resource '{k}' (no-file or fsize)"),
        };
        let n: u64 = v
            .parse()
            .map_err(|_| anyhow!("--resource-limit '{s}': '{v}' is not a number"))?;
        out.retain(|(o, _)| *o != r);
        out.push((r, n));
    }
    if !out.iter().any(|(r, _)| *r == sys::Resource::NoFile) {
        out.push((sys::Resource::NoFile, DEFAULT_NO_FILE));
    }
    Ok(out)
}

/// The `run ARGS` tern is started with: as given, plus `--landlock` unless it is there
/// already or `--no-landlock` was given, and `--vcpu-cgroup-fd N` for each of `vcpu_fds`.
fn run_command(args: &JailArgs, vcpu_fds: &[OwnedFd]) -> Vec<String> {
    let mut command = args.command.clone();
    if !args.no_landlock && !command.iter().any(|a| a == "--landlock") {
        command.insert(1, "--landlock".to_string());
    }
    for fd in vcpu_fds {
        command.insert(1, format!("--vcpu-cgroup-fd={}", fd.as_raw_fd()));
    }
    command
}

/// What the `run ARGS` need, read with tern's own parser: the same arguments `tern run`
/// would take, the same configuration it would build.
fn plan(command: &[String]) -> Result<Plan> {
    if command.first().map(String::as_str) != Some("run") {
        bail!("tern jail runs `tern run`: give `-- run ARGS…` after its own flags");
    }
    let cli = super::Cli::try_parse_from(
        std::iter::once("tern").chain(command.iter().map(String::as_str)),
    )
    .map_err(|e| {
        let text = e.to_string();
        let first = text
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("error: ");
        anyhow!("the run arguments: {first}")
    })?;
    let super::Command::Run(args) = cli.cmd else {
        bail!("tern jail runs `tern run`: give `-- run ARGS…` after its own flags");
    };
    let mut plan = Plan::default();
    if let Some(sock) = &args.api_socket {
        plan.relative |= sock.is_relative();
        let abs = std::path::absolute(sock).context("--api-socket")?;
        let dir = abs
            .parent()
            .ok_or_else(|| anyhow!("--api-socket {}: no directory", sock.display()))?;
        plan.writable_dirs.push(dir.to_path_buf());
    }
    if let Some(c) = &args.config {
        plan.add(c, Access::Read, "the config file");
    }
    let restoring = args.restore.is_some();
    let config = if let Some(dir) = &args.restore {
        let opts = super::restore_options(dir, &args).map_err(|e| anyhow!(e))?;
        let restore = vmm::snapshot::open(&opts).map_err(|e| anyhow!(e))?;
        snapshot_files(&mut plan, dir, &restore.snapshot)?;
        Some(restore.snapshot.config)
    } else if args.api_only() {
        None
    } else {
        Some((*args).clone().into_config()?)
    };
    if let Some(c) = config {
        config_files(&mut plan, &c, restoring)?;
    }
    Ok(plan)
}

/// The files of a snapshot and of the snapshots it is a diff over.
fn snapshot_files(plan: &mut Plan, dir: &Path, snap: &vmm::snapshot::Snapshot) -> Result<()> {
    let dirs = snap
        .chain_dirs(dir)
        .map_err(|e| anyhow!("--restore {}: {e}", dir.display()))?;
    for d in dirs {
        for name in ["state.json", "memory.bin", "dirty.bin"] {
            let f = d.join(name);
            if name == "dirty.bin" && !f.exists() {
                continue;
            }
            plan.add(&f, Access::Read, format!("snapshot file {name}"));
        }
    }
    Ok(())
}

/// The files a VM configuration names. A restored VM reads its kernel and initrd only if the
/// guest reboots with `--on-reboot restart`: then they go in when they still exist.
fn config_files(plan: &mut Plan, c: &api::config::VmConfig, restoring: bool) -> Result<()> {
    use vmm::confinement::Use;
    for n in vmm::confinement::named_files(c).map_err(|e| anyhow!(e))? {
        let access = match n.usage {
            Use::Boot if restoring && !n.path.exists() => continue,
            Use::Boot | Use::Read => Access::Read,
            Use::ReadWrite => Access::ReadWrite,
            Use::Output => Access::Create,
        };
        plan.add(&n.path, access, n.what);
    }
    // tern makes the vsock's socket, and the host's listeners for guest connections sit
    // beside it: its directory is made in the jail, as the API socket's.
    if let Some(v) = &c.vsock {
        let abs = std::path::absolute(&v.socket).context("the vsock socket")?;
        let dir = abs
            .parent()
            .ok_or_else(|| anyhow!("vsock socket {}: no directory", v.socket.display()))?;
        plan.relative |= v.socket.is_relative();
        plan.writable_dirs.push(dir.to_path_buf());
    }
    plan.tun = !c.nets.is_empty();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(check_id("vm-1").is_ok());
        assert!(check_id(&"a".repeat(64)).is_ok());
        for bad in ["", "a/b", "..", "a b", "ü", &"a".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_new_pid_namespace_is_the_default_and_the_last_flag_wins() {
        let parse = |flags: &[&str]| {
            let mut a = vec!["tern", "jail", "--id", "a", "--uid", "1", "--gid", "1"];
            a.extend_from_slice(&["--chroot-base", "/srv"]);
            a.extend_from_slice(flags);
            a.extend_from_slice(&["--", "run", "--kernel", "/k"]);
            match super::super::Cli::try_parse_from(a).unwrap().cmd {
                super::super::Command::Jail(j) => {
                    assert_eq!(j.command, ["run", "--kernel", "/k"]);
                    !j.no_new_pid_ns
                }
                _ => unreachable!(),
            }
        };
        assert!(parse(&[]));
        assert!(parse(&["--new-pid-ns"]));
        assert!(!parse(&["--no-new-pid-ns"]));
        assert!(parse(&["--no-new-pid-ns", "--new-pid-ns"]));
        assert!(!parse(&["--new-pid-ns", "--no-new-pid-ns"]));
    }

    #[test]
    fn tern_is_told_the_vcpu_cgroup_descriptors_and_landlock() {
        let cli = super::super::Cli::try_parse_from([
            "tern",
            "jail",
            "--id",
            "a",
            "--uid",
            "1",
            "--gid",
            "1",
            "--chroot-base",
            "/srv",
            "--",
            "run",
            "--kernel",
            "/k",
        ])
        .unwrap();
        let super::super::Command::Jail(j) = cli.cmd else {
            unreachable!()
        };
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let n = fd.as_raw_fd();
        let want = [
            "run",
            &format!("--vcpu-cgroup-fd={n}"),
            "--landlock",
            "--kernel",
            "/k",
        ];
        assert_eq!(run_command(&j, &[fd]), want);
        // And tern's parser takes what the jailer writes.
        let run = std::iter::once("tern").chain(want.iter().copied());
        let super::super::Command::Run(r) = super::super::Cli::try_parse_from(run).unwrap().cmd
        else {
            unreachable!()
        };
        assert_eq!(r.vcpu_cgroup_fd, [n]);
    }

    #[test]
    fn limits() {
        let l = resource_limits(&["fsize=10".into(), "no-file=64".into()]).unwrap();
        assert_eq!(
            l,
            vec![(sys::Resource::Fsize, 10), (sys::Resource::NoFile, 64)]
        );
        let l = resource_limits(&[]).unwrap();
        assert_eq!(l, vec![(sys::Resource::NoFile, DEFAULT_NO_FILE)]);
        assert!(resource_limits(&["nproc=1".into()]).is_err());
        assert!(resource_limits(&["fsize=x".into()]).is_err());
    }

    #[test]
    fn the_run_arguments_are_read_by_tern_run_s_parser() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let p = plan(&args(&[
            "run",
            "--kernel",
            "/k",
            "--disk",
            "path=/d.img,readonly=on",
            "--serial",
            "file:/log/s.txt",
            "--api-socket",
            "/run/t/api.sock",
            "--net",
            "tap=tap0",
        ]))
        .unwrap();
        let got: Vec<_> = p
            .files
            .iter()
            .map(|n| (n.path.to_str().unwrap(), n.access))
            .collect();
        assert_eq!(
            got,
            [
                ("/k", Access::Read),
                ("/d.img", Access::Read),
                ("/log/s.txt", Access::Create)
            ]
        );
        assert_eq!(p.writable_dirs, [PathBuf::from("/run/t")]);
        assert!(p.tun && !p.relative);
        let e = plan(&args(&["info"])).unwrap_err().to_string();
        assert!(e.contains("-- run ARGS"), "{e}");
        let e = plan(&args(&["run", "--bogus"])).unwrap_err().to_string();
        assert!(e.contains("--bogus") && !e.contains('\n'), "{e}");
    }
}
