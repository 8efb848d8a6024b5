//! `cargo xtask fuzz`: builds the libFuzzer targets of `fuzz/` with coverage instrumentation
//! on stable Rust (no cargo-fuzz, no nightly), replays the committed regression inputs, then
//! fuzzes each target for a bounded time over a corpus seeded from `fuzz/seeds/`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::util::{build_dir, workspace_root};

/// The instrumentation cargo-fuzz asks rustc for with `--sanitizer none`: libFuzzer's inline
/// 8-bit counters, PC table and comparison tracing, all stable `-C` options. Debug assertions
/// and overflow checks make arithmetic mistakes crash.
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];

// The target is passed explicitly so RUSTFLAGS reach only the targets, not build scripts and
// proc macros.
use crate::util::TRIPLE;

/// What to run.
pub struct FuzzOptions {
    /// One target, or all of them.
    pub target: Option<String>,
    /// Fuzzing time per target.
    pub seconds: u64,
    /// Stop a target after this many runs (whichever of time and runs comes first).
    pub runs: Option<u64>,
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// The targets: `fuzz/fuzz_targets/*.rs`, sorted.
pub fn targets() -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".rs"))
                .map(String::from)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Builds every target (release, instrumented) into build/fuzz-target; returns the directory
/// holding the binaries.
fn build() -> Result<PathBuf> {
    let target_dir = build_dir().join("fuzz-target");
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--locked",
            "--bins",
            "--target",
            TRIPLE,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(fuzz_dir())
        .env("RUSTFLAGS", RUSTFLAGS.join(" "))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .context("cannot run cargo build for fuzz/")?;
    if !st.success() {
        bail!("building the fuzz targets failed ({st})");
    }
    Ok(target_dir.join(TRIPLE).join("release"))
}

/// The files directly in `dir` (none when it does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What one libFuzzer run reported.
#[derive(Default)]
struct Stats {
    runs: u64,
    exec_per_sec: u64,
    cov: u64,
    features: u64,
    artifact: Option<String>,
}

/// Runs `bin` with `args`, its output going to `log`; returns whether it exited 0, and what
/// it reported.
fn run_fuzzer(bin: &Path, args: &[String], log: &Path) -> Result<(bool, Stats)> {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let mut out =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut stats = Stats::default();
    let stderr = child.stderr.take().context("stderr")?;
    for line in BufReader::new(stderr).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).into_owned();
        use std::io::Write;
        writeln!(out, "{line}")?;
        let field = |key: &str| -> Option<u64> {
            let rest = line.split(key).nth(1)?;
            rest.split_whitespace()
                .next()?
                .trim_end_matches("Mb")
                .parse()
                .ok()
        };
        if line.starts_with('#') {
            stats.cov = field("cov: ").unwrap_or(stats.cov);
            stats.features = field("ft: ").unwrap_or(stats.features);
        }
        if let Some(n) = field("stat::number_of_executed_units: ") {
            stats.runs = n;
        }
        if let Some(n) = field("stat::average_exec_per_sec: ") {
            stats.exec_per_sec = n;
        }
        if let Some(p) = line.split("Test unit written to ").nth(1) {
            stats.artifact = Some(p.trim().to_string());
        }
    }
    let ok = child.wait()?.success();
    remove_stale_scratch();
    Ok((ok, stats))
}

/// Removes the scratch directories (`tern-fuzz-WHAT-PID`, on /dev/shm or in the temporary
/// directory) of target processes that are gone: a target keeps its files for its whole life
/// and cannot remove them when it crashes.
fn remove_stale_scratch() {
    for base in [PathBuf::from("/dev/shm"), std::env::temp_dir()] {
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("tern-fuzz-")
                .and_then(|rest| rest.rsplit('-').next())
                .and_then(|p| p.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            // SAFETY: signal 0 only checks whether the process exists.
            let gone = unsafe { libc::kill(pid, 0) } != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            if gone {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `cargo xtask fuzz`.
pub fn run(opts: &FuzzOptions) -> Result<()> {
    let all = targets()?;
    let chosen: Vec<String> = match &opts.target {
        Some(t) if all.contains(t) => vec![t.clone()],
        Some(t) => bail!("no fuzz target {t}; there are: {}", all.join(", ")),
        None => all,
    };
    let started = Instant::now();
    let bins = build()?;
    println!("fuzz targets built in {:.0?}", started.elapsed());
    let work = build_dir().join("fuzz");
    let mut failures = Vec::new();
    println!(
        "{:<16} {:>12} {:>9} {:>6} {:>7}  result",
        "target", "runs", "exec/s", "cov", "ft"
    );
    for name in &chosen {
        let bin = bins.join(name);
        let logs = work.join("logs");
        let artifacts = work.join("artifacts").join(name);
        let corpus = work.join("corpus").join(name);
        for d in [&logs, &artifacts, &corpus] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let prefix = format!("-artifact_prefix={}/", artifacts.display());

        // Committed regression inputs first: each must run clean.
        let regressions = files(&fuzz_dir().join("regressions").join(name));
        if !regressions.is_empty() {
            let log = logs.join(format!("{name}.regressions.log"));
            let mut args = vec![
                prefix.clone(),
                "-timeout=20".into(),
                "-rss_limit_mb=2048".into(),
            ];
            args.extend(regressions.iter().map(|p| p.display().to_string()));
            let (ok, stats) = run_fuzzer(&bin, &args, &log)?;
            if !ok {
                println!("{}", tail(&log, 30));
                let input = stats.artifact.unwrap_or_else(|| "(see the log)".into());
                println!(
                    "FUZZ FAILURE: target {name}: a committed regression input fails again: {input} (log {})",
                    log.display()
                );
                failures.push(name.clone());
                continue;
            }
        }

        let log = logs.join(format!("{name}.log"));
        let mut args = vec![
            prefix,
            format!("-max_total_time={}", opts.seconds),
            "-timeout=10".into(),
            "-rss_limit_mb=2048".into(),
            "-print_final_stats=1".into(),
        ];
        if let Some(r) = opts.runs {
            args.push(format!("-runs={r}"));
        }
        args.push(corpus.display().to_string());
        let seeds = fuzz_dir().join("seeds").join(name);
        if seeds.is_dir() {
            args.push(seeds.display().to_string());
        }
        let (ok, stats) = run_fuzzer(&bin, &args, &log)?;
        let result = if ok { "ok" } else { "FAILED" };
        println!(
            "{name:<16} {:>12} {:>9} {:>6} {:>7}  {result}",
            stats.runs, stats.exec_per_sec, stats.cov, stats.features
        );
        if !ok {
            println!("{}", tail(&log, 30));
            let input = stats
                .artifact
                .unwrap_or_else(|| "(none written; see the log)".into());
            println!(
                "FUZZ FAILURE: target {name} crashed or hung; input: {input} (log {})",
                log.display()
            );
            failures.push(name.clone());
        }
    }
    println!("fuzzing took {:.0?} in all", started.elapsed());
    if !failures.is_empty() {
        bail!(
            "fuzz targets failed: {} (add each input to fuzz/regressions/TARGET/ with the fix; see fuzz/README.md)",
            failures.join(", ")
        );
    }
    Ok(())
}
