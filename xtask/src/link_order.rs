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
    let map = tern.with_file_name("tern.map");
    let map_text = std::fs::read_to_string(&map).with_context(|| {
        format!(
            "cannot read {} (the release link writes it; see crates/tern/build.rs)",
            map.display()
        )
    })?;
    let sections = rodata_sections(&map_text);
    if sections.is_empty() {
        bail!("{} lists no input section of .rodata", map.display());
    }
    // Beside the binary, not in /tmp: the copy must be on a block device (tmpfs has no
    // read-ahead to turn off).
    let dir = tern
        .parent()
        .context("tern has no directory")?
        .join(format!("link-order.{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let elf = std::fs::read(tern).with_context(|| format!("cannot read {}", tern.display()))?;
    let entry = elf
        .get(0x18..0x20)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .context("tern is not an ELF file")?;
    let result = (|| -> Result<_> {
        let names = profile(&valgrind, tern, probe, &dir)?;
        let reads = data_profile(&valgrind, tern, entry, probe, &dir, &sections)?;
        let pages = touched_pages(tern, probe, &dir)?;
        Ok((names, reads, pages))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let (mut names, reads, pages) = result?;
    let all_pages: HashSet<u64> = pages.iter().flatten().copied().collect();
    let functions = functions(tern)?;
    names.extend(functions_on(&elf, &functions, &all_pages)?);
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

    let delta = load_delta(&elf, false)?;
    let hot = hot_sections(&sections, &reads, &pages, delta);
    let bytes: u64 = hot.iter().map(|&i| sections[i].size).sum();
    let script = workspace_root().join("crates/tern/rodata-order.ld");
    write_atomic(&script, |f| {
        f.write_all(rodata_script(&sections, &hot).as_bytes())?;
        Ok(())
    })?;
    println!(
        "{}: {} input sections, {} KiB",
        script.display(),
        hot.len(),
        bytes / 1024
    );
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
    for i in 0..WORKLOADS.len() {
        let out = dir.join(format!("callgrind.{i}"));
        let tool = [
            "--tool=callgrind".to_string(),
            "--demangle=no".to_string(),
            format!("--callgrind-out-file={}", out.display()),
        ];
        let weight = under_valgrind(
            valgrind,
            &tool,
            tern,
            probe,
            i,
            &dir.join(format!("api.{i}")),
        )?;
        let text = std::fs::read_to_string(&out)
            .with_context(|| format!("cannot read {}", out.display()))?;
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

/// Runs workload `i` under valgrind with `tool`'s options (`--seccomp off` unless the workload
/// sets it: valgrind cannot apply filters; `sock` for an API socket) and checks that the probe
/// passed, which the seccomp run does not (it stops where applying the first filter fails).
/// Returns the weight of what the run saw: what the seccomp run reaches (the filters' set-up)
/// runs at every default start, so it ranks with what every workload runs.
fn under_valgrind(
    valgrind: &Path,
    tool: &[String],
    tern: &Path,
    probe: &Path,
    i: usize,
    sock: &Path,
) -> Result<usize> {
    let (cmdline, extra) = WORKLOADS[i];
    let mut cmd = Command::new(valgrind);
    cmd.args(tool)
        .arg(tern)
        .args(tern_args(probe, &(cmdline, extra), sock));
    if !extra.contains(&"--seccomp") {
        cmd.args(["--seccomp", "off"]);
    }
    let output = cmd
        .output()
        .with_context(|| format!("cannot run {}", valgrind.display()))?;
    let seccomp = extra.contains(&"on");
    if !seccomp && !String::from_utf8_lossy(&output.stdout).contains("probe: done status=0") {
        bail!(
            "the probe did not pass under valgrind {} ({cmdline}): {}",
            tool[0],
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(if seccomp { WORKLOADS.len() } else { 1 })
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

/// The pages (file offsets) of `tern` that real runs of the workloads, seccomp on, faulted in:
/// the code they executed and the data they (or the kernel, on their behalf) read; one set per
/// workload.
fn touched_pages(tern: &Path, probe: &Path, dir: &Path) -> Result<Vec<HashSet<u64>>> {
    let copy = dir.join("tern");
    std::fs::copy(tern, &copy)?;
    std::fs::File::open(&copy)?.sync_all()?;
    let _ra = ReadAhead::off_for(&copy)?;
    let mut pages = Vec::new();
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
        pages.push(cached_pages(&f)?.into_iter().collect());
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

/// The functions of the ELF image `elf` that lie (partly) on the pages at file offsets `pages`.
fn functions_on(elf: &[u8], functions: &[Function], pages: &HashSet<u64>) -> Result<Vec<String>> {
    let delta = load_delta(elf, true)?;
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

/// For the `PT_LOAD` segment of `elf` that is executable (`exec`) or not (the first read-only
/// one): its address minus its file offset.
fn load_delta(elf: &[u8], exec: bool) -> Result<u64> {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .map(|i| phoff + i * phentsize)
        .find(|&ph| {
            let flags = u32_at(ph + 4);
            // PF_X 1, PF_W 2, PF_R 4.
            u32_at(ph) == 1 && if exec { flags & 1 != 0 } else { flags == 4 }
        })
        .map(|ph| u64_at(ph + 16) - u64_at(ph + 8))
        .context("no such segment")
}

/// An input section of tern's read-only data, from the link map.
struct Section {
    addr: u64,
    size: u64,
    /// How a linker script names it: `*(NAME)`, or `*MEMBER(NAME)` for a C library object.
    pattern: String,
}

/// Sections larger than this go after the others: one hot word in a big table should not
/// push the small hot constants apart.
const LARGE: u64 = 16 * 1024;

/// The input sections placed in `.rodata` and `.rodata.hot`, from an lld map (`-Map`): lines
/// `VMA LMA SIZE ALIGN OUT` for an output section, `VMA LMA SIZE ALIGN         FILE:(NAME)`
/// for an input section, and symbols further in.
fn rodata_sections(map: &str) -> Vec<Section> {
    let mut out = Vec::new();
    let mut in_rodata = false;
    for line in map.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 {
            continue;
        }
        let (Ok(addr), Ok(size)) = (u64::from_str_radix(f[0], 16), u64::from_str_radix(f[2], 16))
        else {
            continue;
        };
        let rest = f[4..].join(" ");
        // An output section's name follows its alignment after one space; input sections and
        // symbols are indented further.
        let at = line.find(f[4]).unwrap_or(0);
        let output = at - line[..at].trim_end_matches(' ').len() == 1;
        match rest.split_once(":(") {
            None if output && f.len() == 5 => {
                in_rodata = matches!(f[4], ".rodata" | ".rodata.hot");
            }
            Some((file, name)) if in_rodata && size > 0 => {
                let name = name.trim_end_matches(')');
                // An archive member is FILE.a(MEMBER.o); the script matches "FILE.a:MEMBER.o".
                let pattern = match file.rsplit_once('(') {
                    Some((_, member)) if !file.starts_with('<') => {
                        format!("*{}({name})", member.trim_end_matches(')'))
                    }
                    _ => format!("*({name})"),
                };
                out.push(Section {
                    addr,
                    size,
                    pattern,
                });
            }
            _ => {}
        }
    }
    out.sort_by_key(|s| s.addr);
    out
}

/// The index in `sections` (sorted by address) of the section holding `addr`.
fn section_at(sections: &[Section], addr: u64) -> Option<usize> {
    let i = sections
        .partition_point(|s| s.addr <= addr)
        .checked_sub(1)?;
    (addr < sections[i].addr + sections[i].size).then_some(i)
}

/// Runs every workload under valgrind's lackey, which traces every load and store; for each
/// section of read-only data, in how many workloads tern read it (the seccomp run counting as
/// all of them, as in [`profile`]). What the kernel reads (the seccomp filters a thread
/// applies, for one) does not show here: [`hot_sections`] adds it from real runs.
fn data_profile(
    valgrind: &Path,
    tern: &Path,
    entry: u64,
    probe: &Path,
    dir: &Path,
    sections: &[Section],
) -> Result<Vec<usize>> {
    use std::io::BufRead;
    let mut reads = vec![0usize; sections.len()];
    for i in 0..WORKLOADS.len() {
        let log = dir.join(format!("lackey.{i}"));
        let tool = [
            "--tool=lackey".to_string(),
            "--trace-mem=yes".to_string(),
            format!("--log-file={}", log.display()),
        ];
        let weight = under_valgrind(
            valgrind,
            &tool,
            tern,
            probe,
            i,
            &dir.join(format!("lk.{i}")),
        )?;
        let mut hit = vec![false; sections.len()];
        // tern is position-independent: the first instruction traced is its entry point.
        let mut base = None;
        let file =
            std::fs::File::open(&log).with_context(|| format!("cannot read {}", log.display()))?;
        for line in std::io::BufReader::new(file).lines() {
            let line = line?;
            let Some((kind, rest)) = line.split_at_checked(3) else {
                continue;
            };
            let Some(addr) = rest
                .trim_start()
                .split(',')
                .next()
                .and_then(|a| u64::from_str_radix(a, 16).ok())
            else {
                continue;
            };
            match (kind, base) {
                ("I  ", None) => base = Some(addr.wrapping_sub(entry)),
                (" L " | " S " | " M ", Some(b)) => {
                    if let Some(s) = section_at(sections, addr.wrapping_sub(b)) {
                        hit[s] = true;
                    }
                }
                _ => {}
            }
        }
        let _ = std::fs::remove_file(&log);
        for (r, h) in reads.iter_mut().zip(hit) {
            *r += if h { weight } else { 0 };
        }
    }
    Ok(reads)
}

/// The sections of read-only data to place first, in order: those lackey saw read, and every
/// section on a page that a real run faulted in (`pages`: file offsets, one set per workload;
/// `delta`: address minus file offset) where lackey saw nothing read, which is what the kernel
/// read. Most-read first, the large ones last (the largest first).
fn hot_sections(
    sections: &[Section],
    reads: &[usize],
    pages: &[HashSet<u64>],
    delta: u64,
) -> Vec<usize> {
    let mut weight = reads.to_vec();
    for set in pages {
        let mut found = HashSet::new();
        for &page in set {
            let (lo, hi) = (page + delta, page + delta + 4096);
            let first = sections.partition_point(|s| s.addr + s.size <= lo);
            let on: Vec<usize> = (first..sections.len())
                .take_while(|&i| sections[i].addr < hi)
                .collect();
            if on.iter().all(|&i| reads[i] == 0) {
                found.extend(on);
            }
        }
        for i in found {
            weight[i] += 1;
        }
    }
    let mut hot: Vec<usize> = (0..sections.len()).filter(|&i| weight[i] > 0).collect();
    hot.sort_by_key(|&i| {
        let s = &sections[i];
        if s.size > LARGE {
            (1, std::cmp::Reverse(s.size as usize))
        } else {
            (0, std::cmp::Reverse(weight[i]))
        }
    });
    let mut seen = HashSet::new();
    hot.retain(|&i| seen.insert(sections[i].pattern.as_str()));
    hot
}

/// The linker script that gathers `hot` into `.rodata.hot`, before `.rodata`.
fn rodata_script(sections: &[Section], hot: &[usize]) -> String {
    let mut s = String::from(
        "/* Written by `cargo xtask link-order`: the read-only data tern's runs read, placed\n   \
         together (crates/tern/build.rs). */\nSECTIONS\n{\n  .rodata.hot : {\n",
    );
    for &i in hot {
        s.push_str("    ");
        s.push_str(&sections[i].pattern);
        s.push('\n');
    }
    s.push_str("  }\n}\nINSERT BEFORE .rodata;\n");
    s
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as lld writes them: an output section, its input sections (from tern's object, the
    /// linker's merged constants and a C library member), a symbol, and the next output section.
    const MAP: &str = "             VMA              LMA     Size Align Out     In      Symbol
            3c00             3c00    7ff14   128 .rodata
            3c00             3c00     21a0    16         <internal>:(.rodata.cst16)
            5da0             5da0       48     4         /t/deps/tern-1.rcgu.o:(.rodata..Lanon.ab.7)
            5de8             5de8     5000     4         /t/deps/tern-1.rcgu.o:(.rodata._RNvCs1_4tern4main)
            5de8             5de8        0     1                 .Lsym
            ade8             ade8     dd8c    32         /usr/lib/libc.a(C-ctype.o):(.rodata)
           18b74            18b74       10     4         /t/deps/tern-1.rcgu.o:(.rodata..Lanon.ab.9)
           83b14            83b14     f824     4 .eh_frame_hdr
           83b14            83b14     f824     4         <internal>:(.eh_frame_hdr)
";

    #[test]
    fn the_map_gives_rodata_input_sections_and_their_script_names() {
        let s = rodata_sections(MAP);
        let got: Vec<(u64, u64, &str)> = s
            .iter()
            .map(|s| (s.addr, s.size, s.pattern.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (0x3c00, 0x21a0, "*(.rodata.cst16)"),
                (0x5da0, 0x48, "*(.rodata..Lanon.ab.7)"),
                (0x5de8, 0x5000, "*(.rodata._RNvCs1_4tern4main)"),
                (0xade8, 0xdd8c, "*C-ctype.o(.rodata)"),
                (0x18b74, 0x10, "*(.rodata..Lanon.ab.9)"),
            ]
        );
        assert_eq!(section_at(&s, 0x5da0 + 0x47), Some(1));
        assert_eq!(section_at(&s, 0x5da0 + 0x48), Some(2));
        assert_eq!(section_at(&s, 0x3bff), None);
        assert_eq!(section_at(&s, 0x18b84), None);
    }

    #[test]
    fn hot_sections_come_most_read_first_and_large_last() {
        let s = rodata_sections(MAP);
        // lackey: main read in one workload, .Lanon.ab.9 in two, the C library table in one.
        let reads = [0, 0, 1, 3, 2];
        // A real run faulted in the page of .Lanon.ab.7 (nothing read there by lackey: the
        // kernel's read) and a page of main's (already explained).
        let pages = vec![HashSet::from([0x5000]), HashSet::from([0x9000])];
        let hot = hot_sections(&s, &reads, &pages, 0);
        // 0x5000..0x6000 holds cst16's tail, .Lanon.ab.7 and main's start: main was read, so
        // that page adds nothing; 0x9000 is main's alone. main (20 KiB) and the C library's
        // table (55 KiB) are large: they come last, the larger first.
        assert_eq!(hot, [4, 3, 2]);
        let none = hot_sections(&s, &[0; 5], &pages, 0);
        // Unexplained pages bring in every section on them, the large ones last.
        assert_eq!(none, [0, 1, 2]);
        let script = rodata_script(&s, &hot);
        assert!(script.contains(
            "  .rodata.hot : {\n    *(.rodata..Lanon.ab.9)\n    *C-ctype.o(.rodata)\n    *(.rodata._RNvCs1_4tern4main)\n  }\n}\nINSERT BEFORE .rodata;\n"
        ));
    }
}
