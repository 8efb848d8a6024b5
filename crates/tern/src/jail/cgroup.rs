//! The VM's cgroups: `tern/ID` under the jailer's own cgroup in each hierarchy a `--cgroup`
//! file belongs to (v1: the hierarchy of the file's controller; v2: the unified one), with the
//! values written and the process moved in (tern inherits it, every thread included).
//!
//! Nested under the jailer's own cgroup rather than the hierarchy's root, so a jailer that
//! runs in a delegated or limited cgroup keeps its VMs inside it. Per-thread placement of vCPU
//! threads is not done. The cgroups are left behind when tern exits (as Firecracker's).

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

/// One `--cgroup FILE=VALUE`.
#[derive(Debug)]
pub struct Setting {
    file: String,
    value: String,
    controller: String,
}

impl Setting {
    /// Parses `FILE=VALUE`; FILE is `controller.name` (letters, digits, '_' and '.').
    pub fn parse(s: &str) -> Result<Setting> {
        let (file, value) = s
            .split_once('=')
            .ok_or_else(|| anyhow!("--cgroup '{s}': expected FILE=VALUE"))?;
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
        let Some((controller, _)) = file.split_once('.') else {
            bail!("--cgroup '{s}': '{file}' is not a controller file (e.g. cpu.max)");
        };
        if controller.is_empty() || !file.chars().all(ok) {
            bail!("--cgroup '{s}': '{file}' is not a controller file (e.g. cpu.max)");
        }
        Ok(Setting {
            file: file.into(),
            value: value.into(),
            controller: controller.into(),
        })
    }
}

/// One cgroup to make: the jailer's own cgroup in a hierarchy, and what goes in `tern/ID`.
struct Group<'a> {
    parent: PathBuf,
    v2: bool,
    settings: Vec<&'a Setting>,
}

/// Creates the cgroups, writes the settings and moves this process in. Nothing without
/// `--cgroup`.
pub fn apply(settings: &[Setting], version: Version, id: &str) -> Result<()> {
    if settings.is_empty() {
        return Ok(());
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("/proc/self/mounts")?;
    let own = std::fs::read_to_string("/proc/self/cgroup").context("/proc/self/cgroup")?;
    let hier = Hierarchies::read(&mounts, &own);
    let mut groups: Vec<Group> = Vec::new();
    for s in settings {
        let v2 = hier
            .v2
            .as_ref()
            .filter(|d| s.controller == "cgroup" || enabled(d, &s.controller));
        let v1 = hier.v1.iter().find(|(c, _)| c.contains(&s.controller));
        let (parent, is_v2) = match (version, v2, v1) {
            (Version::V2 | Version::Auto, Some(d), _) => (d.clone(), true),
            (Version::V1 | Version::Auto, _, Some((_, d))) => (d.clone(), false),
            (Version::V2, None, _) => bail!(
                "--cgroup {}: the {} controller is not enabled in cgroup v2{}",
                s.file,
                s.controller,
                hier.v2
                    .as_ref()
                    .map(|d| format!(" ({})", d.display()))
                    .unwrap_or_else(|| " (not mounted)".into())
            ),
            _ => bail!(
                "--cgroup {}: no cgroup hierarchy has the {} controller",
                s.file,
                s.controller
            ),
        };
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
    for g in &groups {
        let tern = g.parent.join("tern");
        let leaf = tern.join(id);
        if g.v2 {
            for s in &g.settings {
                if s.controller != "cgroup" {
                    enable(&g.parent, &s.controller)?;
                }
            }
        }
        mkdir(&tern)?;
        if g.v2 {
            for s in &g.settings {
                if s.controller != "cgroup" {
                    enable(&tern, &s.controller)?;
                }
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
        for s in &g.settings {
            let f = leaf.join(&s.file);
            std::fs::write(&f, &s.value)
                .map_err(|e| anyhow!("cannot write '{}' to {}: {e}", s.value, f.display()))?;
        }
        leaves.push(leaf);
    }
    let pid = std::process::id().to_string();
    for leaf in leaves {
        let f = leaf.join("cgroup.procs");
        std::fs::write(&f, &pid)
            .map_err(|e| anyhow!("cannot move into {}: {e}", leaf.display()))?;
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
        let s = Setting::parse("cpu.max=50000 100000").unwrap();
        assert_eq!(
            (s.file.as_str(), s.value.as_str(), s.controller.as_str()),
            ("cpu.max", "50000 100000", "cpu")
        );
        for bad in ["cpu.max", "max=1", "../x.y=1", "cpu/max.x=1", ".max=1"] {
            assert!(Setting::parse(bad).is_err(), "{bad}");
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
