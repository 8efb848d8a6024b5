//! `cargo xtask link-order`: regenerates `crates/tern/link-order.txt`, the functions a release
//! tern is linked with first (crates/tern/build.rs says why). It runs the release tern under
//! valgrind's callgrind on the probe guest's workloads, collects every function that ran, in
//! any thread, and keeps those in tern's symbol table, in the order callgrind first names
//! them. valgrind does not know seccomp: the workloads run with `--seccomp off`, and one more
//! run with seccomp on covers the building of the filters, up to where installing them fails.

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
    let dir = std::env::temp_dir().join(format!("tern-link-order-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = profile(&valgrind, tern, probe, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let names = result?;
    let symbols = text_symbols(tern)?;
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

/// Runs every workload under callgrind; the function names of all its output files, in order.
fn profile(valgrind: &Path, tern: &Path, probe: &Path, dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for (i, (cmdline, extra)) in WORKLOADS.iter().enumerate() {
        let out = dir.join(format!("callgrind.{i}"));
        let sock = dir.join(format!("api.{i}"));
        let mut cmd = Command::new(valgrind);
        cmd.args(["--tool=callgrind", "--demangle=no"])
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(tern)
            .args(["run", "--kernel"])
            .arg(probe)
            .args(["--memory", "64M", "--cpus", "1", "--serial", "stdio"])
            .args(["--cmdline", cmdline]);
        if !extra.contains(&"--seccomp") {
            cmd.args(["--seccomp", "off"]);
        }
        for a in extra.iter() {
            if *a == "@SOCK" {
                cmd.arg(&sock);
            } else {
                cmd.arg(a);
            }
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
        for line in text.lines() {
            let rest = line
                .strip_prefix("fn=(")
                .or_else(|| line.strip_prefix("cfn=("));
            if let Some((_, name)) = rest.and_then(|r| r.split_once(") ")) {
                names.push(name.to_string());
            }
        }
    }
    Ok(names)
}

/// The names of the functions in `binary`'s symbol table.
fn text_symbols(binary: &Path) -> Result<HashSet<String>> {
    let nm = run_capture(Command::new("nm").arg(binary)).context("nm")?;
    Ok(nm
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            let (_, kind, name) = (p.next()?, p.next()?, p.next()?);
            matches!(kind, "t" | "T").then(|| name.to_string())
        })
        .collect())
}
