//! Small helpers: running host commands, content fingerprints for caching, paths.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The target tern is built for (`.cargo/config.toml` names it, so cargo's outputs sit under
/// `target/x86_64-unknown-linux-gnu/`).
pub const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// The release tern binary, under `target/` or `$CARGO_TARGET_DIR` when set.
pub fn release_tern() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("target"), PathBuf::from);
    workspace_root()
        .join(target)
        .join(TRIPLE)
        .join("release/tern")
}

/// `build/` under the workspace root (gitignored), or `$TERN_BUILD_DIR` when set (so two rig
/// runs on one checkout do not overwrite each other's images and logs).
pub fn build_dir() -> PathBuf {
    match std::env::var_os("TERN_BUILD_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("build"),
    }
}

/// Runs a command, failing with its stderr if it exits non-zero; returns stdout.
pub fn run_capture(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with inherited output, failing if it exits non-zero.
pub fn run_status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Finds an executable in `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// True if `path` is a regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Makes sure `tool` is on `PATH`, installing Debian package `package` with apt-get if not.
pub fn ensure_tool(tool: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = which(tool) {
        return Ok(path);
    }
    eprintln!("[xtask] {tool} not found; installing Debian package {package}");
    apt_install(&[package])?;
    which(tool).with_context(|| format!("{tool} still missing after installing {package}"))
}

/// `apt-get install -y PACKAGES`, running `apt-get update` first if the install fails.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let install = || {
        run_status(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_ok() {
        return Ok(());
    }
    run_status(Command::new("apt-get").arg("update"))?;
    install()
}

/// 64-bit FNV-1a, stable across Rust versions (unlike `DefaultHasher`), for cache stamps.
#[derive(Clone)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Fingerprint(0xcbf2_9ce4_8422_2325)
    }
}

impl Fingerprint {
    /// Mixes in bytes.
    pub fn bytes(&mut self, data: &[u8]) -> &mut Self {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Length separator so ("ab","c") != ("a","bc").
        for b in (data.len() as u64).to_le_bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// Mixes in a string.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Mixes in a file's identity (path, size, modification time) — cheap, not its content.
    pub fn file(&mut self, path: &Path) -> Result<&mut Self> {
        use std::os::unix::fs::MetadataExt;
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
        self.str(&path.to_string_lossy());
        self.bytes(&meta.len().to_le_bytes());
        self.bytes(&meta.mtime().to_le_bytes());
        self.bytes(&meta.mtime_nsec().to_le_bytes());
        Ok(self)
    }

    /// The hash as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }

    /// The raw value.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// FNV-1a of one buffer (used to check logs survived the serial link).
pub fn fnv(data: &[u8]) -> u64 {
    Fingerprint::default().bytes(data).value()
}

/// A cached build step: `output` is up to date if it exists and its stamp file holds `key`.
pub struct Stamp {
    path: PathBuf,
    key: String,
}

impl Stamp {
    /// The stamp for `output` (stored as `output.stamp`).
    pub fn new(output: &Path, key: String) -> Stamp {
        let mut name = output.file_name().unwrap_or_default().to_os_string();
        name.push(".stamp");
        Stamp {
            path: output.with_file_name(name),
            key,
        }
    }

    /// True if `output` exists and was built from the same inputs.
    pub fn fresh(&self, output: &Path) -> bool {
        output.exists() && std::fs::read_to_string(&self.path).is_ok_and(|k| k.trim() == self.key)
    }

    /// Records that `output` is built from the current inputs.
    pub fn commit(&self) -> Result<()> {
        std::fs::write(&self.path, &self.key)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Writes a file atomically (temp file + rename) so an interrupted build never leaves a
/// half-written output that looks complete.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("partial");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    write(&mut file)?;
    file.sync_all().ok();
    drop(file);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// Human-readable byte count.
pub fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20))
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// The first line `program arg` prints on stdout (empty if it cannot run): a version line.
pub fn first_line_of(program: &Path, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}
