//! Landlock (through the `landlock` crate): once tern has set itself up, it can reach only the
//! paths its configuration names and the directories the user allows, whatever a compromised
//! thread asks for. The ruleset is applied to the main thread before any other thread starts,
//! so every thread inherits it.
//!
//! [`check`] tells, before tern opens a path, whether the sandbox lets it: a request for a path
//! outside gets one line saying so, instead of a bare "permission denied" from deep inside.

use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};

/// The newest Landlock ABI whose rights tern asks for (5: `ioctl` on device files). On an
/// older kernel the rights it lacks are left out (best effort); on one without Landlock
/// nothing is restricted, and [`restrict`] says so.
const TARGET: ABI = ABI::V5;

/// One path tern may reach: a file (exactly it) or a directory (everything beneath).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// The path (made absolute and free of `.` and `..` by [`restrict`]).
    pub path: PathBuf,
    /// Whether tern may change it (write, create, remove beneath it), or only read it.
    pub write: bool,
}

impl Allowed {
    /// `path`, read-only.
    pub fn read(path: impl Into<PathBuf>) -> Self {
        Allowed {
            path: path.into(),
            write: false,
        }
    }

    /// `path`, read-write.
    pub fn write(path: impl Into<PathBuf>) -> Self {
        Allowed {
            path: path.into(),
            write: true,
        }
    }
}

/// What [`restrict`] achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every right tern asked to handle is enforced.
    Enforced,
    /// The kernel's Landlock is older than tern's target: some rights are not handled.
    Partial,
    /// The kernel has no Landlock (or it is disabled): nothing is restricted.
    Unavailable,
}

/// The allowed paths once [`restrict`] has run.
static ALLOWED: OnceLock<Vec<Allowed>> = OnceLock::new();

/// `p` made absolute (from the current directory), with `.` and `..` resolved lexically and
/// symbolic links resolved where the path exists.
fn normalize(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    // The longest part that exists, with its links resolved, and the rest as named.
    let mut existing = out.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return out,
        }
    }
    let mut r = existing.canonicalize().unwrap_or(existing);
    for n in rest.iter().rev() {
        r.push(n);
    }
    r
}

fn rights(path: &Path, write: bool, abi: ABI) -> BitFlags<AccessFs> {
    let meta = std::fs::metadata(path).ok();
    let is_dir = meta.as_ref().is_some_and(|m| m.is_dir());
    let is_device = meta.as_ref().is_some_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_char_device() || m.file_type().is_block_device()
    });
    if is_dir {
        return if write {
            AccessFs::from_all(abi)
        } else {
            AccessFs::from_read(abi)
        };
    }
    let mut r: BitFlags<AccessFs> = AccessFs::ReadFile.into();
    if write {
        r |= AccessFs::WriteFile | AccessFs::Truncate;
    }
    if is_device {
        r |= AccessFs::IoctlDev;
    }
    r & AccessFs::from_file(abi)
}

/// Restricts the calling thread, and every thread it starts from now on, to `allowed`. Paths
/// that do not exist are skipped (whatever names them fails to open them anyway, with its own
/// error). Once per process.
pub fn restrict(allowed: &[Allowed]) -> Result<Outcome, String> {
    let allowed: Vec<Allowed> = allowed
        .iter()
        .map(|a| Allowed {
            path: normalize(&a.path),
            write: a.write,
        })
        .collect();
    let err = |e: landlock::RulesetError| format!("Landlock: {e}");
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(TARGET))
        .map_err(err)?
        .create()
        .map_err(err)?;
    for a in &allowed {
        let Ok(fd) = PathFd::new(&a.path) else {
            continue;
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, rights(&a.path, a.write, TARGET)))
            .map_err(err)?;
    }
    let status = ruleset.restrict_self().map_err(err)?;
    ALLOWED
        .set(allowed)
        .map_err(|_| "Landlock: the sandbox is set already".to_string())?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Outcome::Enforced,
        RulesetStatus::PartiallyEnforced => Outcome::Partial,
        RulesetStatus::NotEnforced => Outcome::Unavailable,
    })
}

/// Whether [`restrict`] has run (in this process, tern is confined to its allowed paths).
pub fn active() -> bool {
    ALLOWED.get().is_some()
}

/// Whether the sandbox lets tern reach `path` (to change it, with `write`): `Ok` when there is
/// no sandbox or a rule covers it, else one line naming the path and how to allow it.
pub fn check(path: &Path, write: bool) -> Result<(), String> {
    let Some(allowed) = ALLOWED.get() else {
        return Ok(());
    };
    let p = normalize(path);
    if allowed
        .iter()
        .any(|a| p.starts_with(&a.path) && (a.write || !write))
    {
        return Ok(());
    }
    Err(format!(
        "{} is outside tern's sandbox (--landlock): allow its directory with --allow-path DIR{}",
        path.display(),
        if write { "" } else { "[:ro]" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_absolute_and_lexically_clean() {
        let p = normalize(Path::new("/nonexistent-tern/a/../b/./c"));
        assert_eq!(p, PathBuf::from("/nonexistent-tern/b/c"));
        let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
        assert_eq!(normalize(Path::new("x-missing")), cwd.join("x-missing"));
    }
}
