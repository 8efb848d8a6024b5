//! The VM's cgroups: `tern/ID` under the jailer's own cgroup in each hierarchy a `--cgroup`
//! or `--vcpu-cgroup` file belongs to (v1: the hierarchy of the file's controller; v2: the
//! unified one), with the values written and the process moved in (tern inherits it, every
//! thread included).
//!
//! `--vcpu-cgroup` settings go to a child `tern/ID/vcpus` (in v2 a threaded cgroup, so only
//! threaded controllers), and the jailer opens its thread list (`tasks` in v1,
//! `cgroup.threads` in v2) for tern, which has each vCPU thread write its own id there: the
//! jailer opens it as root because v2 checks a migration against the opener's credentials,
//! and inside the jail tern could not open it anyway.
//!
//! Nested under the jailer's own cgroup rather than the hierarchy's root, so a jailer that
//! runs in a delegated or limited cgroup keeps its VMs inside it. The cgroups are left behind
//! when tern exits (as Firecracker's).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// Which cgroup hierarchy to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1, the hierarchy with the file's controller.
    V1,
    /// The unified (v2) hierarchy.
    V2,
    /// v2 where the controller is enabled there, else v1.
    Auto,
}

/// The v2 controllers a threaded cgroup can have (besides the core `cgroup.*` files).
const THREADED: &[&str] = &["cpu", "cpuset", "perf_event", "pids"];

/// One `--cgroup FILE=VALUE`, or `--vcpu-cgroup FILE=VALUE` (for `tern/ID/vcpus`).
#[derive(Debug)]
pub struct Setting {
    file: String,
    value: String,
    controller: String,
    vcpu: bool,
}

impl Setting {
    /// Parses `FILE=VALUE`; FILE is `controller.name` (letters, digits, '_' and '.'). `vcpu`:
    /// it came from `--vcpu-cgroup`.
    pub fn parse(s: &str, vcpu: bool) -> Result<Setting> {
        let flag = if vcpu { "--vcpu-cgroup" } else { "--cgroup" };
        let (file, value) = s
            .split_once('=')
            .ok_or_else(|| anyhow!("{flag} '{s}': expected FILE=VALUE"))?;
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
        let Some((controller, _)) = file.split_once('.') else {
            bail!("{flag} '{s}': '{file}' is not a controller file (e.g. cpu.max)");
        };
        if controller.is_empty() || !file.chars().all(ok) {
            bail!("{flag} '{s}': '{file}' is not a controller file (e.g. cpu.max)");
        }
        Ok(Setting {
            file: file.into(),
            value: value.into(),
            controller: controller.into(),
            vcpu,
        })
    }

    fn flag(&self) -> &'static str {
        if self.vcpu {
            "--vcpu-cgroup"
        } else {
            "--cgroup"
        }
    }
}

/// One cgroup to make: the jailer's own cgroup in a hierarchy, and what goes in `tern/ID` and
/// `tern/ID/vcpus`.
struct Group<'a> {
    parent: PathBuf,
    v2: bool,
    settings: Vec<&'a Setting>,
}

impl Group<'_> {
    /// Its `--cgroup` (false) or `--vcpu-cgroup` (true) settings.
    fn of(&self, vcpu: bool) -> impl Iterator<Item = &Setting> {
        self.settings
            .iter()
            .copied()
            .filter(move |s| s.vcpu == vcpu)
    }

    /// The controllers of `settings` that have to be enabled in v2 (not the core files).
    fn controllers<'s>(settings: impl Iterator<Item = &'s Setting>) -> Vec<&'s str> {
        settings
            .map(|s| s.controller.as_str())
            .filter(|c| *c != "cgroup")
            .collect()
    }
}

/// Creates the cgroups, writes the settings and moves this process in; returns the thread
/// lists of the `vcpus` cgroups, open for writing and left open across `execve`. Nothing
/// without settings.
pub fn apply(settings: &[Setting], version: Version, id: &str) -> Result<Vec<OwnedFd>> {
    if settings.is_empty() {
        return Ok(Vec::new());
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("/proc/self/mounts")?;
    let own = std::fs::read_to_string("/proc/self/cgroup").context("/proc/self/cgroup")?;
    let hier = Hierarchies::read(&mounts, &own);
    let mut groups: Vec<Group> = Vec::new();
    for s in settings {
        let threaded = s.controller == "cgroup" || THREADED.contains(&s.controller.as_str());
        if s.vcpu && !threaded && version == Version::V2 {
            bail!("{}", not_threaded(s));
        }
        let v2 = hier
            .v2
            .as_ref()
            .filter(|d| s.controller == "cgroup" || enabled(d, &s.controller));
        let v1 = hier.v1.iter().find(|(c, _)| c.contains(&s.controller));
        let (parent, is_v2) = match (version, v2, v1) {
            (Version::V2 | Version::Auto, Some(d), _) => (d.clone(), true),
            (Version::V1 | Version::Auto, _, Some((_, d))) => (d.clone(), false),
            (Version::V2, None, _) => bail!(
                "{} {}: the {} controller is not enabled in cgroup v2{}",
                s.flag(),
                s.file,
                s.controller,
                hier.v2
                    .as_ref()
                    .map(|d| format!(" ({})", d.display()))
                    .unwrap_or_else(|| " (not mounted)".into())
            ),
            _ => bail!(
                "{} {}: no cgroup hierarchy has the {} controller",
                s.flag(),
                s.file,
                s.controller
            ),
        };
        if s.vcpu && is_v2 && !threaded {
            bail!("{}", not_threaded(s));
        }
        match groups.iter_mut().find(|g| g.parent == parent) {
            Some(g) => g.settings.push(s),
            None => groups.push(Group {
                parent,
                v2: is_v2,
                settings: vec![s],
            }),
        }
    }
    let mut leaves = Vec::new();
    let mut threads = Vec::new();
    for g in &groups {
        let tern = g.parent.join("tern");
        let leaf = tern.join(id);
        if g.v2 {
            for c in Group::controllers(g.settings.iter().copied()) {
                enable(&g.parent, c)?;
            }
        }
        mkdir(&tern)?;
        if g.v2 {
            for c in Group::controllers(g.settings.iter().copied()) {
                enable(&tern, c)?;
            }
        }
        mkdir(&leaf)?;
        if !g.v2 && g.settings.iter().any(|s| s.controller == "cpuset") {
            // A v1 cpuset takes no task until it has CPUs and memory nodes: its parent's.
            for f in ["cpuset.cpus", "cpuset.mems"] {
                inherit(&g.parent, &tern, f)?;
                inherit(&tern, &leaf, f)?;
            }
        }
        // vcpus is made before tern/ID's values are written (cgroup.max.depth=0, say, would
        // forbid it) and given its own after them (v1 refuses a parent a CPU quota or cpuset
        // smaller than its child's).
        let vcpus = g.of(true).next().is_some();
        if vcpus {
            make_vcpus(g, &leaf)?;
        }
        write_settings(&leaf, g.of(false))?;
        if vcpus {
            threads.push(fill_vcpus(g, &leaf)?);
        }
        leaves.push(leaf);
    }
    let pid = std::process::id().to_string();
    for leaf in leaves {
        let f = leaf.join("cgroup.procs");
        std::fs::write(&f, &pid)
            .map_err(|e| anyhow!("cannot move into {}: {e}", leaf.display()))?;
    }
    Ok(threads)
}

/// The refusal of a v2 `--vcpu-cgroup` setting of a domain controller.
fn not_threaded(s: &Setting) -> String {
    format!(
        "--vcpu-cgroup {}: {} is not a threaded controller; in cgroup v2 vCPU threads can only \
         have settings of {} (or cgroup.* files)",
        s.file,
        s.controller,
        THREADED.join(", ")
    )
}

/// Makes `leaf/vcpus`: in v2 a threaded cgroup, with its controllers enabled for it.
fn make_vcpus(g: &Group, leaf: &Path) -> Result<()> {
    let dir = leaf.join("vcpus");
    mkdir(&dir)?;
    if g.v2 {
        let f = dir.join("cgroup.type");
        std::fs::write(&f, "threaded")
            .map_err(|e| anyhow!("cannot make {} threaded: {e}", dir.display()))?;
        // Threaded controllers may be enabled in a threaded root that has processes.
        for c in Group::controllers(g.of(true)) {
            enable(leaf, c)?;
        }
    }
    Ok(())
}

/// Writes the `--vcpu-cgroup` settings to `leaf/vcpus` and opens its thread list for tern.
fn fill_vcpus(g: &Group, leaf: &Path) -> Result<OwnedFd> {
    let dir = leaf.join("vcpus");
    if !g.v2 && g.of(true).any(|s| s.controller == "cpuset") {
        for f in ["cpuset.cpus", "cpuset.mems"] {
            inherit(leaf, &dir, f)?;
        }
    }
    write_settings(&dir, g.of(true))?;
    let list = dir.join(if g.v2 { "cgroup.threads" } else { "tasks" });
    let fd: OwnedFd = std::fs::OpenOptions::new()
        .write(true)
        .open(&list)
        .map_err(|e| anyhow!("cannot open {}: {e}", list.display()))?
        .into();
    // Inherited by tern across execve.
    // SAFETY: fcntl on a descriptor this function owns.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
        bail!(
            "{}: F_SETFD: {}",
            list.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(fd)
}

fn write_settings<'s>(dir: &Path, settings: impl Iterator<Item = &'s Setting>) -> Result<()> {
    for s in settings {
        let f = dir.join(&s.file);
        std::fs::write(&f, &s.value)
            .map_err(|e| anyhow!("cannot write '{}' to {}: {e}", s.value, f.display()))?;
    }
    Ok(())
}

/// The jailer's own cgroup directory in each mounted hierarchy.
struct Hierarchies {
    /// (controllers, own cgroup directory) of each v1 hierarchy.
    v1: Vec<(Vec<String>, PathBuf)>,
    /// The own cgroup directory in the unified hierarchy.
    v2: Option<PathBuf>,
}

impl Hierarchies {
    fn read(mounts: &str, own: &str) -> Hierarchies {
        let mut h = Hierarchies {
            v1: Vec::new(),
            v2: None,
        };
        // "hierarchy-id:controllers:path"
        let own: Vec<(&str, &str)> = own
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ':');
                let _ = f.next()?;
                Some((f.next()?, f.next()?))
            })
            .collect();
        for m in mounts.lines() {
            let f: Vec<&str> = m.split_whitespace().collect();
            let [_, dir, fstype, opts, ..] = f[..] else {
                continue;
            };
            let dir = Path::new(dir);
            match fstype {
                "cgroup2" => {
                    if let Some((_, p)) = own.iter().find(|(c, _)| c.is_empty()) {
                        h.v2 = Some(under(dir, p));
                    }
                }
                "cgroup" => {
                    let ctl: Vec<String> = opts.split(',').map(String::from).collect();
                    let path = own.iter().find(|(c, _)| {
                        !c.is_empty() && c.split(',').all(|c| ctl.iter().any(|o| o == c))
                    });
                    if let Some((_, p)) = path {
                        h.v1.push((ctl, under(dir, p)));
                    }
                }
                _ => {}
            }
        }
        h
    }
}

/// Cgroup `path` (as /proc/self/cgroup shows it) of the hierarchy mounted at `mount`.
fn under(mount: &Path, path: &str) -> PathBuf {
    match path.trim_start_matches('/') {
        "" => mount.to_path_buf(),
        p => mount.join(p),
    }
}

/// Whether v2 controller `c` is available to the children of `dir`.
fn enabled(dir: &Path, c: &str) -> bool {
    std::fs::read_to_string(dir.join("cgroup.controllers"))
        .map(|s| s.split_whitespace().any(|w| w == c))
        .unwrap_or(false)
}

/// Enables v2 controller `c` for the children of `dir`.
fn enable(dir: &Path, c: &str) -> Result<()> {
    let f = dir.join("cgroup.subtree_control");
    let on = std::fs::read_to_string(&f).unwrap_or_default();
    if on.split_whitespace().any(|w| w == c) {
        return Ok(());
    }
    std::fs::write(&f, format!("+{c}")).map_err(|e| {
        anyhow!(
            "cannot enable the {c} controller in {} ({e}; a cgroup with processes of its own \
             cannot give domain controllers to its children)",
            f.display()
        )
    })
}

fn mkdir(d: &Path) -> Result<()> {
    match std::fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(anyhow!("cannot create cgroup {}: {e}", d.display())),
    }
}

/// Copies `file` from `from` to `to` when `to`'s is empty.
fn inherit(from: &Path, to: &Path, file: &str) -> Result<()> {
    let cur = std::fs::read_to_string(to.join(file)).unwrap_or_default();
    if !cur.trim().is_empty() {
        return Ok(());
    }
    let v = std::fs::read_to_string(from.join(file))
        .with_context(|| format!("{}", from.join(file).display()))?;
    std::fs::write(to.join(file), v.trim()).with_context(|| format!("{}", to.join(file).display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings() {
        let s = Setting::parse("cpu.max=50000 100000", false).unwrap();
        assert_eq!(
            (s.file.as_str(), s.value.as_str(), s.controller.as_str()),
            ("cpu.max", "50000 100000", "cpu")
        );
        for bad in ["cpu.max", "max=1", "../x.y=1", "cpu/max.x=1", ".max=1"] {
            assert!(Setting::parse(bad, false).is_err(), "{bad}");
            let e = Setting::parse(bad, true).unwrap_err().to_string();
            assert!(e.starts_with("--vcpu-cgroup '"), "{e}");
        }
    }

    #[test]
    fn hierarchies_of_a_hybrid_host() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
            cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        let own = "4:memory:/a/b\n1:cpu:/\n0::/u\n";
        let h = Hierarchies::read(mounts, own);
        assert_eq!(h.v2, Some(PathBuf::from("/sys/fs/cgroup/unified/u")));
        let dirs: Vec<_> = h.v1.iter().map(|(_, d)| d.to_str().unwrap()).collect();
        assert_eq!(dirs, ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/memory/a/b"]);
    }
}
