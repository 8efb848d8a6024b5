//! Fetching and unpacking Debian packages with the host's apt (`apt-get download`,
//! `dpkg-deb -x`), cached under `build/debs/`.

use crate::util::{ensure_tool, run_capture, run_status};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// A concrete package version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
}

/// An unpacked package.
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub package: Package,
    /// The root of the unpacked tree (`build/debs/<name>/`).
    pub root: PathBuf,
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Runs an apt query; on failure (e.g. empty package lists on a fresh machine) runs
/// `apt-get update` once and retries.
fn apt_query(args: &[&str]) -> Result<String> {
    let attempt = || run_capture(Command::new("apt-cache").args(args));
    match attempt() {
        Ok(out) if !out.trim().is_empty() => Ok(out),
        first => {
            if APT_UPDATED.swap(true, Ordering::SeqCst) {
                return first;
            }
            eprintln!(
                "[xtask] apt-cache {} failed; running apt-get update",
                args.join(" ")
            );
            run_status(Command::new("apt-get").arg("update"))?;
            attempt()
        }
    }
}

/// The candidate version of a (real) package.
fn candidate(name: &str) -> Result<Package> {
    let out = apt_query(&["show", "--no-all-versions", name])
        .with_context(|| format!("Debian package {name} not found"))?;
    let version = out
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .with_context(|| format!("no Version for {name} in apt-cache show"))?;
    Ok(Package {
        name: name.to_string(),
        version: version.trim().to_string(),
    })
}

/// Resolves a meta-package such as `linux-image-amd64` to the versioned package it depends on
/// (the first dependency whose name starts with `prefix`); a real package resolves to itself.
pub fn resolve(name: &str, prefix: Option<&str>) -> Result<Package> {
    let cache = crate::util::build_dir()
        .join("debs")
        .join(format!("{name}.resolved"));
    let resolved = (|| -> Result<Package> {
        let Some(prefix) = prefix else {
            return candidate(name);
        };
        let out = apt_query(&[
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            name,
        ])?;
        let dep = out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .map(|d| d.trim().trim_start_matches('<').trim_end_matches('>'))
            .find(|d| d.starts_with(prefix) && *d != name)
            .with_context(|| format!("{name} has no dependency named {prefix}*"))?;
        candidate(dep)
    })();
    match resolved {
        Ok(pkg) => {
            std::fs::create_dir_all(cache.parent().unwrap_or(Path::new(".")))?;
            std::fs::write(&cache, format!("{}\n{}\n", pkg.name, pkg.version))?;
            Ok(pkg)
        }
        Err(e) => {
            // Offline: fall back to the last resolution if its package is still cached.
            if let Ok(text) = std::fs::read_to_string(&cache) {
                let mut lines = text.lines();
                if let (Some(n), Some(v)) = (lines.next(), lines.next()) {
                    eprintln!(
                        "[xtask] warning: cannot resolve {name} ({e:#}); using cached {n} {v}"
                    );
                    return Ok(Package {
                        name: n.to_string(),
                        version: v.to_string(),
                    });
                }
            }
            Err(e)
        }
    }
}

fn deb_path(pkg: &Package) -> PathBuf {
    let version = pkg.version.replace(':', "%3a");
    crate::util::build_dir()
        .join("debs")
        .join(format!("{}_{}_amd64.deb", pkg.name, version))
}

/// Downloads (if not cached) and unpacks (if not already unpacked) a package.
pub fn fetch_and_unpack(pkg: &Package) -> Result<Unpacked> {
    let debs = crate::util::build_dir().join("debs");
    std::fs::create_dir_all(&debs)?;
    let deb = deb_path(pkg);
    if !deb.exists() {
        ensure_tool("apt-get", "apt")?;
        let tmp = debs.join(".download");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        eprintln!("[xtask] downloading {} {}", pkg.name, pkg.version);
        let spec = format!("{}={}", pkg.name, pkg.version);
        let download = || {
            run_capture(
                Command::new("apt-get")
                    .args(["download", "-q", &spec])
                    .current_dir(&tmp),
            )
        };
        if download().is_err() {
            if !APT_UPDATED.swap(true, Ordering::SeqCst) {
                run_status(Command::new("apt-get").arg("update"))?;
            }
            download()?;
        }
        let got: Vec<_> = std::fs::read_dir(&tmp)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "deb"))
            .collect();
        let [file] = got.as_slice() else {
            bail!("apt-get download {spec} produced {} .deb files", got.len());
        };
        std::fs::rename(file, &deb)?;
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let root = debs.join(&pkg.name);
    let marker = root.join(".unpacked-from");
    let deb_name = deb
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(deb_name.as_str()) {
        ensure_tool("dpkg-deb", "dpkg")?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        eprintln!("[xtask] unpacking {deb_name}");
        run_status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        std::fs::write(&marker, &deb_name)?;
    }
    Ok(Unpacked {
        package: pkg.clone(),
        root,
    })
}

impl Unpacked {
    /// For a kernel image package: (kernel release, path of /boot/vmlinuz-*, modules dir).
    pub fn kernel(&self) -> Result<(String, PathBuf, PathBuf)> {
        let boot = self.root.join("boot");
        let vmlinuz = std::fs::read_dir(&boot)
            .with_context(|| format!("{} has no /boot", self.package.name))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .with_context(|| format!("{} has no /boot/vmlinuz-*", self.package.name))?;
        let release = vmlinuz
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .trim_start_matches("vmlinuz-")
            .to_string();
        // bookworm ships /lib/modules, later releases /usr/lib/modules.
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|dir| self.root.join(dir).join(&release))
            .find(|p| p.is_dir())
            .with_context(|| format!("{} has no lib/modules/{release}", self.package.name))?;
        Ok((release, vmlinuz, modules))
    }
}

/// Debian's backports suite for this release, where the rig's L0 emulator comes from.
const BACKPORTS_LINE: &str = "deb http://deb.debian.org/debian bookworm-backports main";

/// apt options that make apt see only bookworm-backports, through lists kept under
/// `build/debs/backports-apt/` (the host's own apt configuration is not touched).
fn backports_apt(cmd: &mut Command) -> Result<&mut Command> {
    let dir = crate::util::build_dir().join("debs/backports-apt");
    std::fs::create_dir_all(dir.join("lists/partial"))?;
    let list = dir.join("sources.list");
    if std::fs::read_to_string(&list).ok().as_deref() != Some(&format!("{BACKPORTS_LINE}\n")) {
        std::fs::write(&list, format!("{BACKPORTS_LINE}\n"))?;
    }
    Ok(cmd
        .arg("-o")
        .arg(format!("Dir::Etc::sourcelist={}", list.display()))
        .args(["-o", "Dir::Etc::sourceparts=-", "-o"])
        .arg(format!("Dir::State::Lists={}", dir.join("lists").display())))
}

/// Downloads and unpacks `packages` at the version bookworm-backports has for the first of
/// them, all into one tree (`build/debs/<tree>/`); returns its root. The package lists are
/// refreshed once a day.
pub fn fetch_backports(tree: &str, packages: &[&str]) -> Result<PathBuf> {
    ensure_tool("apt-get", "apt")?;
    let debs = crate::util::build_dir().join("debs");
    let lists = debs.join("backports-apt/lists");
    let fresh = std::fs::read_dir(&lists)
        .ok()
        .and_then(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
                .max()
        })
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age.as_secs() < 86_400);
    let madison = |update: bool| -> Result<String> {
        if update {
            eprintln!("[xtask] reading bookworm-backports' package list");
            run_capture(backports_apt(&mut Command::new("apt-get"))?.args(["update", "-q"]))
                .context("apt-get update for bookworm-backports failed")?;
        }
        run_capture(backports_apt(&mut Command::new("apt-cache"))?.args(["madison", packages[0]]))
    };
    let pick = |out: &str| {
        out.lines()
            .filter(|l| l.contains("bookworm-backports"))
            .filter_map(|l| l.split('|').nth(1).map(|v| v.trim().to_string()))
            .next()
    };
    let version = match madison(!fresh).ok().as_deref().and_then(pick) {
        Some(v) => v,
        None => madison(true)
            .ok()
            .as_deref()
            .and_then(pick)
            .with_context(|| format!("bookworm-backports has no {}", packages[0]))?,
    };
    let root = debs.join(tree);
    let marker = root.join(".unpacked-from");
    let want = format!("{} {version}", packages.join(" "));
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(root);
    }
    let tmp = debs.join(format!(".download-{tree}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    eprintln!(
        "[xtask] downloading {} {version} from bookworm-backports",
        packages.join(", ")
    );
    let specs: Vec<String> = packages.iter().map(|p| format!("{p}={version}")).collect();
    run_capture(
        backports_apt(&mut Command::new("apt-get"))?
            .args(["download", "-q"])
            .args(&specs)
            .current_dir(&tmp),
    )
    .with_context(|| format!("apt-get download {} failed", specs.join(" ")))?;
    ensure_tool("dpkg-deb", "dpkg")?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    for entry in std::fs::read_dir(&tmp)? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|x| x == "deb") {
            run_status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::write(&marker, &want)?;
    Ok(root)
}
