//! A writer for the `newc` cpio format, the one Linux unpacks as an initramfs.
//!
//! Entries are collected first (so the archive is deterministic and parents come before
//! children: the kernel does not create missing parent directories), then written in one pass,
//! streaming file contents from disk.

use crate::util::Fingerprint;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Where an entry's content comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory.
    Dir,
    /// A host file (symlinks followed), copied as a regular file.
    File(PathBuf),
    /// Literal content.
    Bytes(Vec<u8>),
    /// A symbolic link to the given target.
    Symlink(String),
    /// A character device node (major, minor).
    CharDev(u32, u32),
}

/// One archive member.
#[derive(Debug, Clone)]
struct Entry {
    source: Source,
    mode: u32,
}

/// An initramfs under construction. Paths are archive paths without a leading slash.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

fn normalize(path: &str) -> Result<String> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("bad archive path {path:?}");
    }
    Ok(trimmed.to_string())
}

impl Archive {
    /// Adds (or replaces) an entry, creating its parent directories.
    pub fn add(&mut self, path: &str, source: Source, mode: u32) -> Result<()> {
        let path = normalize(path)?;
        let mut parent = String::new();
        for component in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|x| x.1)
            .unwrap_or(&[])
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                Some(Entry {
                    source: Source::Dir,
                    ..
                }) => {}
                Some(_) => bail!("{parent} is both a directory and a file in the archive"),
                None => {
                    self.entries.insert(
                        parent.clone(),
                        Entry {
                            source: Source::Dir,
                            mode: 0o755,
                        },
                    );
                }
            }
        }
        self.entries.insert(path, Entry { source, mode });
        Ok(())
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str) -> Result<()> {
        self.add(path, Source::Dir, 0o755)
    }

    /// Adds a host file; the mode's execute bits follow the host file.
    pub fn file(&mut self, path: &str, host: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(host).with_context(|| format!("cannot stat {}", host.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", host.display());
        }
        let mode = if meta.permissions().mode() & 0o111 != 0 {
            0o755
        } else {
            0o644
        };
        self.add(path, Source::File(host.to_path_buf()), mode)
    }

    /// Adds literal content.
    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Result<()> {
        self.add(path, Source::Bytes(data.into()), mode)
    }

    /// Adds a symlink.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.add(path, Source::Symlink(target.to_string()), 0o777)
    }

    /// True if the archive has an entry at `path`.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|p| self.entries.contains_key(&p))
    }

    /// A fingerprint of the archive's contents (file identities, not their bytes).
    pub fn fingerprint(&self) -> Result<Fingerprint> {
        let mut fp = Fingerprint::default();
        for (path, entry) in &self.entries {
            fp.str(path).bytes(&entry.mode.to_le_bytes());
            match &entry.source {
                Source::Dir => {
                    fp.str("d");
                }
                Source::File(host) => {
                    fp.str("f").file(host)?;
                }
                Source::Bytes(data) => {
                    fp.str("b").bytes(data);
                }
                Source::Symlink(target) => {
                    fp.str("l").str(target);
                }
                Source::CharDev(major, minor) => {
                    fp.str("c")
                        .bytes(&major.to_le_bytes())
                        .bytes(&minor.to_le_bytes());
                }
            }
        }
        Ok(fp)
    }

    /// Writes the archive; returns the number of bytes written.
    pub fn write_to(&self, out: &mut impl Write) -> Result<u64> {
        let mut w = CountingWriter {
            inner: out,
            count: 0,
        };
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let ino = ino as u32 + 1;
            match &entry.source {
                Source::Dir => {
                    write_entry(&mut w, path, ino, 0o040_000 | entry.mode, 2, (0, 0), &[])?
                }
                Source::Bytes(data) => {
                    write_entry(&mut w, path, ino, 0o100_000 | entry.mode, 1, (0, 0), data)?
                }
                Source::Symlink(target) => write_entry(
                    &mut w,
                    path,
                    ino,
                    0o120_000 | entry.mode,
                    1,
                    (0, 0),
                    target.as_bytes(),
                )?,
                Source::CharDev(major, minor) => write_entry(
                    &mut w,
                    path,
                    ino,
                    0o020_000 | entry.mode,
                    1,
                    (*major, *minor),
                    &[],
                )?,
                Source::File(host) => {
                    let file = std::fs::File::open(host)
                        .with_context(|| format!("cannot open {}", host.display()))?;
                    let size = file.metadata()?.len();
                    let size32 = u32::try_from(size)
                        .with_context(|| format!("{} is too large for cpio", host.display()))?;
                    write_header(&mut w, path, ino, 0o100_000 | entry.mode, 1, (0, 0), size32)?;
                    let copied = std::io::copy(&mut file.take(size), &mut w)
                        .with_context(|| format!("cannot read {}", host.display()))?;
                    if copied != size {
                        bail!("{} changed size while archiving", host.display());
                    }
                    pad4(&mut w)?;
                }
            }
        }
        write_entry(&mut w, "TRAILER!!!", 0, 0, 1, (0, 0), &[])?;
        // Pad the archive to 512 bytes like GNU cpio (harmless, and keeps concatenation easy).
        let rem = (w.count % 512) as usize;
        if rem != 0 {
            w.write_all(&vec![0u8; 512 - rem])?;
        }
        Ok(w.count)
    }
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn pad4<W: Write>(w: &mut CountingWriter<'_, W>) -> Result<()> {
    let rem = (w.count % 4) as usize;
    if rem != 0 {
        w.write_all(&[0u8; 3][..4 - rem])?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_entry<W: Write>(
    w: &mut CountingWriter<'_, W>,
    path: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    data: &[u8],
) -> Result<()> {
    let size = u32::try_from(data.len()).context("entry too large for cpio")?;
    write_header(w, path, ino, mode, nlink, rdev, size)?;
    w.write_all(data)?;
    pad4(w)
}

fn write_header<W: Write>(
    w: &mut CountingWriter<'_, W>,
    path: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    (rdev_major, rdev_minor): (u32, u32),
    size: u32,
) -> Result<()> {
    let namesize = path.len() as u32 + 1;
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize, check
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}\
         {rdev_major:08x}{rdev_minor:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, 0
    );
    w.write_all(header.as_bytes())?;
    w.write_all(path.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_newc() {
        let mut a = Archive::default();
        a.bytes("/init", "#!/bin/sh\n", 0o755).unwrap();
        a.symlink("bin/sh", "busybox").unwrap();
        a.add("dev/console", Source::CharDev(5, 1), 0o600).unwrap();
        let mut out = Vec::new();
        let n = a.write_to(&mut out).unwrap();
        assert_eq!(n as usize, out.len());
        assert_eq!(out.len() % 512, 0);
        let text = String::from_utf8_lossy(&out);
        // Parents come first: "bin" before "bin/sh", "dev" before "dev/console".
        let pos = |s: &str| text.find(s).unwrap();
        assert!(pos("bin\0") < pos("bin/sh\0"));
        assert!(pos("dev\0") < pos("dev/console\0"));
        assert!(text.contains("TRAILER!!!"));
        // Every header starts on a 4-byte boundary.
        for (i, _) in text.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
    }

    #[test]
    fn rejects_bad_paths_and_conflicts() {
        let mut a = Archive::default();
        assert!(a.bytes("../x", "", 0o644).is_err());
        assert!(a.bytes("", "", 0o644).is_err());
        a.bytes("f", "x", 0o644).unwrap();
        assert!(a.bytes("f/g", "x", 0o644).is_err());
    }
}
