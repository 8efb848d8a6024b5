//! `cargo xtask link-order`: regenerates `crates/tern/link-order.txt`, the functions a release
//! tern is linked with first (crates/tern/build.rs says why). It runs the release tern under
//! valgrind's callgrind on the probe guest's workloads, collects every function that ran, in
//! any thread, and keeps those in tern's symbol table: first those that ran in the most
//! workloads (start, the exit loop and teardown run in all of them), and among equals in the
//! order callgrind first names them. A VM then maps the code every VM runs as one stretch,
//! and only the code of the devices and the API it uses beyond it. valgrind does not know
//! seccomp: the workloads run with `--seccomp off`, and one more run with seccomp on covers
//! the start, up to where installing the filters fails.
//!
//! What runs only under the filters (the calls they refuse send std and the C library down
//! other paths) is found from real runs: a copy of tern, dropped from the page cache, runs
//! each workload with the block device's read-ahead at 0, so that the kernel reads exactly the
//! pages of code that fault; the pages the copy then has in the page cache (`mincore`) are the
//! ones the run executed, and every function on them is added after callgrind's. The device's
//! read-ahead is set back at once (this needs root).

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{ensure_tool, run_capture, workspace_root, write_atomic};

/// The probe's command lines, each with the extra `tern run` flags it needs.
const WORKLOADS: [(&str, &[&str]); 6] = [
    ("probe.run=hello", &[]),
    ("probe.run=exits probe.exits=2000", &[]),
    (
        "probe.run=vrng probe.vrng_chunk=4096 probe.vrng_bytes=65536",
        &["--transport", "mmio", "--rng"],
    ),
    (
        "probe.run=vrng probe.vrng_chunk=4096 probe.vrng_bytes=65536",
        &["--transport", "pci", "--rng"],
    ),
    ("probe.run=hello", &["--api-socket", "@SOCK"]),
    ("probe.run=hello", &["--seccomp", "on"]),
];

pub fn run(tern: &Path, probe: &Path) -> Result<()> {
    let valgrind = ensure_tool("valgrind", "valgrind")?;
    // Beside the binary, not in /tmp: the copy must be on a block device (tmpfs has no
    // read-ahead to turn off).
    let dir = tern
        .parent()
        .context("tern has no directory")?
        .join(format!("link-order.{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = profile(&valgrind, tern, probe, &dir);
    let touched = result.and_then(|names| Ok((names, touched_pages(tern, probe, &dir)?)));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut names, pages) = touched?;
    let functions = functions(tern)?;
    names.extend(functions_on(tern, &functions, &pages)?);
    let symbols: HashSet<&str> = functions.iter().map(|f| f.name.as_str()).collect();
    let mut seen = HashSet::new();
    let order: Vec<&String> = names
        .iter()
        .filter(|n| symbols.contains(n.as_str()) && seen.insert(n.as_str()))
        .collect();
    if order.len() < 100 {
        bail!(
            "only {} of tern's functions ran under callgrind: is the binary stripped?",
            order.len()
        );
    }
    let out = workspace_root().join("crates/tern/link-order.txt");
    write_atomic(&out, |f| {
        for n in &order {
            writeln!(f, "{n}")?;
        }
        Ok(())
    })?;
    println!("{}: {} functions", out.display(), order.len());
    Ok(())
}

/// Runs every workload under callgrind; the function names of all its output files, those that
/// ran in more workloads first (the seccomp run's counting as all of them), and among equals
/// in the order they were first named.
fn profile(valgrind: &Path, tern: &Path, probe: &Path, dir: &Path) -> Result<Vec<String>> {
    // Each name once, in the order first named.
    let mut names = Vec::new();
    // For each name: in how many workloads it ran, and the workload last counted.
    let mut runs: std::collections::HashMap<String, (usize, usize)> = Default::default();
    for (i, (cmdline, extra)) in WORKLOADS.iter().enumerate() {
        let out = dir.join(format!("callgrind.{i}"));
        let sock = dir.join(format!("api.{i}"));
        let mut cmd = Command::new(valgrind);
        cmd.args(["--tool=callgrind", "--demangle=no"])
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(tern)
            .args(tern_args(probe, &(cmdline, extra), &sock));
        if !extra.contains(&"--seccomp") {
            cmd.args(["--seccomp", "off"]);
        }
        let output = cmd
            .output()
            .with_context(|| format!("cannot run {}", valgrind.display()))?;
        let seccomp = extra.contains(&"on");
        if !seccomp && !String::from_utf8_lossy(&output.stdout).contains("probe: done status=0") {
            bail!(
                "the probe did not pass under callgrind ({cmdline}): {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let text = std::fs::read_to_string(&out)
            .with_context(|| format!("cannot read {}", out.display()))?;
        // What the seccomp run reaches (the filters' set-up) runs at every default start:
        // it ranks with the code every workload runs.
        let weight = if seccomp { WORKLOADS.len() } else { 1 };
        for line in text.lines() {
            let rest = line
                .strip_prefix("fn=(")
                .or_else(|| line.strip_prefix("cfn=("));
            if let Some((_, name)) = rest.and_then(|r| r.split_once(") ")) {
                let seen = runs.entry(name.to_string()).or_insert((0, usize::MAX));
                if seen.1 != i {
                    if seen.0 == 0 {
                        names.push(name.to_string());
                    }
                    *seen = (seen.0 + weight, i);
                }
            }
        }
    }
    // A stable sort keeps the first-named order among names that ran equally often.
    names.sort_by_key(|n| std::cmp::Reverse(runs[n].0));
    Ok(names)
}

/// The `tern run` command line of workload `w`: the probe's, then the workload's own flags
/// (`@SOCK` standing for `sock`).
fn tern_args(probe: &Path, w: &(&str, &[&str]), sock: &Path) -> Vec<std::ffi::OsString> {
    let probe = probe.display().to_string();
    let mut a: Vec<std::ffi::OsString> = crate::bench_probe::probe_run_args(&probe, w.0)
        .into_iter()
        .map(Into::into)
        .collect();
    for x in w.1 {
        a.push(if *x == "@SOCK" { sock.into() } else { x.into() });
    }
    a
}

/// Sets a block device's read-ahead, and sets it back when dropped.
struct ReadAhead {
    path: std::path::PathBuf,
    old: String,
}

impl ReadAhead {
    /// Read-ahead 0 for the device holding `file`.
    fn off_for(file: &Path) -> Result<ReadAhead> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(file)?.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let base = std::path::PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let path = [base.join("queue"), base.join("../queue")]
            .into_iter()
            .map(|q| q.join("read_ahead_kb"))
            .find(|p| p.exists())
            .with_context(|| format!("no read_ahead_kb for block device {major}:{minor}"))?;
        let old = std::fs::read_to_string(&path)?.trim().to_string();
        std::fs::write(&path, "0").with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "link-order: {} is 0 while tern runs (it was {old}; if interrupted, write {old} back)",
            path.display()
        );
        Ok(ReadAhead { path, old })
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.old);
    }
}

/// The pages (file offsets) of `tern` that real runs of the workloads, seccomp on, executed.
fn touched_pages(tern: &Path, probe: &Path, dir: &Path) -> Result<HashSet<u64>> {
    let copy = dir.join("tern");
    std::fs::copy(tern, &copy)?;
    std::fs::File::open(&copy)?.sync_all()?;
    let _ra = ReadAhead::off_for(&copy)?;
    let mut pages = HashSet::new();
    for (i, w) in WORKLOADS.iter().enumerate() {
        let f = std::fs::File::open(&copy)?;
        use std::os::fd::AsRawFd;
        // SAFETY: advice on our own descriptor; it drops clean cached pages only.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let out = Command::new(&copy)
            .args(tern_args(probe, w, &dir.join(format!("real.{i}"))))
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).contains("probe: done status=0") {
            bail!(
                "the probe did not pass ({}): {}",
                w.0,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        pages.extend(cached_pages(&f)?);
    }
    Ok(pages)
}

/// The offsets of the pages of `f` in the page cache.
fn cached_pages(f: &std::fs::File) -> Result<Vec<u64>> {
    use std::os::fd::AsRawFd;
    let len = f.metadata()?.len() as usize;
    // SAFETY: a fresh read-only shared mapping of the whole file, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `vec` has one byte per page of the mapping.
    let r = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, len) };
    if r != 0 {
        bail!("mincore: {}", std::io::Error::last_os_error());
    }
    Ok((0..vec.len() as u64)
        .filter(|i| vec[*i as usize] & 1 != 0)
        .map(|i| i * 4096)
        .collect())
}

/// The functions of `binary` that lie (partly) on the pages at file offsets `pages`.
fn functions_on(
    binary: &Path,
    functions: &[Function],
    pages: &HashSet<u64>,
) -> Result<Vec<String>> {
    let elf = std::fs::read(binary)?;
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    // The executable PT_LOAD segment: file offset = address - (p_vaddr - p_offset).
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    let delta = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .find(|&ph| {
            let kind = u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap());
            let flags = u32::from_le_bytes(elf[ph + 4..ph + 8].try_into().unwrap());
            kind == 1 && flags & 1 != 0
        })
        .map(|ph| u64_at(ph + 16) - u64_at(ph + 8))
        .context("no executable segment")?;
    let mut out = Vec::new();
    for f in functions {
        let Some(s) = f.size else { continue };
        let (first, last) = (
            (f.addr - delta) / 4096,
            (f.addr - delta + s.max(1) - 1) / 4096,
        );
        if (first..=last).any(|p| pages.contains(&(p * 4096))) {
            out.push(f.name.clone());
        }
    }
    Ok(out)
}

/// A function in a binary's symbol table.
struct Function {
    addr: u64,
    /// Its size, where the symbol table gives one.
    size: Option<u64>,
    name: String,
}

/// The functions in `binary`'s symbol table (`nm -S`).
fn functions(binary: &Path) -> Result<Vec<Function>> {
    let nm = run_capture(Command::new("nm").arg("-S").arg(binary)).context("nm")?;
    Ok(nm
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, size, kind, name) = match f[..] {
                [a, s, k, n] => (a, Some(s), k, n),
                [a, k, n] => (a, None, k, n),
                _ => return None,
            };
            if !matches!(kind, "t" | "T") {
                return None;
            }
            Some(Function {
                addr: u64::from_str_radix(addr, 16).ok()?,
                size: size.map(|s| u64::from_str_radix(s, 16)).transpose().ok()?,
                name: name.to_string(),
            })
        })
        .collect())
}
