//! Host side of the nested rig: `cargo xtask rig`, `cargo xtask bench-boot`, `cargo xtask shell`.
//!
//! Builds the images, writes the run list, boots L1 (QEMU TCG with an emulated AMD-V CPU, see
//! docs in shared/design/TESTING.md §2), parses the agent's framed results from L1's console,
//! writes logs to `build/rig/`, prints a table.

use crate::debian;
use crate::images::{self, l1, Images};
use crate::l0_watch::{self, Stall};
use crate::scenarios::{self, KernelForm, Scenario, Vmm};
use crate::spec::{AgentSpec, MemSample, RunResult, RunSpec, FRAME};
use crate::util::{build_dir, human_bytes};
use anyhow::{bail, Context, Result};
use base64::Engine;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// L1 kernel command line. `quiet loglevel=3` keeps kernel chatter from interleaving with the
/// agent's framed lines.
const L1_CMDLINE: &str = "console=ttyS0 panic=-1 quiet loglevel=3";
/// L1 machine options. The default `pc` machine, without a NIC (no iPXE option ROM to load).
/// `-M microvm` reaches /init about a second sooner but hung in early boot (right after
/// "Poking KASLR") in 3 of 14 trials under TCG; `pc` never did.
const L1_MACHINE: &[&str] = &["-M", "pc", "-nic", "none"];
/// If L1 has not reached its /init after this long, it is killed and booted once more.
const L1_INIT_TIMEOUT: Duration = Duration::from_secs(60);
/// L1 memory (MiB).
const L1_MEMORY_MIB: u32 = 3072;
/// Allowance for L1 boot, module loading and the final log transfer.
const L1_OVERHEAD_SECS: u64 = 120;

/// Default tern binary: the workspace's release build.
pub fn default_tern() -> PathBuf {
    crate::util::release_tern()
}

fn rig_dir() -> PathBuf {
    build_dir().join("rig")
}

/// Options shared by the rig commands.
pub struct RigOptions {
    pub tern: PathBuf,
    pub keep_logs: Option<PathBuf>,
    /// Run each selected scenario this many times (interleaved: all of them once, then again).
    pub repeat: usize,
    /// At most this many runs per L1 boot (a fresh L1 for the next ones); all in one if None.
    pub per_l1: Option<usize>,
    /// The peers' binaries on this host (benchmarks only), put in L1 where their scenarios
    /// look for them.
    pub peers: Vec<(Vmm, PathBuf)>,
}

impl RigOptions {
    pub fn new(tern: PathBuf, keep_logs: Option<PathBuf>) -> RigOptions {
        RigOptions {
            tern,
            keep_logs,
            repeat: 1,
            per_l1: None,
            peers: Vec::new(),
        }
    }
}

/// One L1 freeze: L1 stopped answering (no console line, not even the agent's heartbeat) and
/// was killed.
#[derive(Debug, Clone)]
pub struct Freeze {
    /// The run L1 was busy with (or `(between runs)`).
    pub run: String,
    /// The VMM of that run, if it was one.
    pub vmm: Option<Vmm>,
    /// Which L1 boot of this rig run (1-based), and how many runs that L1 had finished before.
    pub l1_boot: usize,
    pub runs_before: usize,
    /// Seconds into the run when L1 was last heard from.
    pub last_heard_secs: f64,
    /// CPU seconds the L0 emulator used while L1 was silent (near 0: L1 waits for something
    /// that never comes; about the silence: it spins).
    pub l0_cpu_secs: Option<f64>,
    /// The L0 monitor's view of L1 at that moment (registers, local APIC) and the emulator's
    /// thread backtraces, if they could be had.
    pub diagnostics: Option<PathBuf>,
}

/// What a rig run produced.
pub struct RigRun {
    pub results: Vec<RunResult>,
    pub freezes: Vec<Freeze>,
    /// Times L1 went silent long enough for the rig to nudge it (see `l0_watch.rs`).
    pub stalls: Vec<Stall>,
    /// Runs that failed after a lost interrupt and ran again.
    pub reruns: usize,
    /// How many runs each VMM made (each run is one or more guest boots).
    pub runs_by_vmm: BTreeMap<&'static str, usize>,
    /// Lines in the runs' output where tern's seccomp filter stopped a call.
    pub seccomp_violations: Vec<String>,
}

impl RigRun {
    /// Freezes during runs of `vmm`.
    pub fn freezes_of(&self, vmm: Vmm) -> usize {
        self.freezes.iter().filter(|f| f.vmm == Some(vmm)).count()
    }

    /// One line for CI: how many times L1 froze, and under which VMM; then how often it went
    /// silent long enough to be nudged, and how often the nudge woke it.
    pub fn freeze_summary(&self) -> String {
        let runs = |k: &str| self.runs_by_vmm.get(k).copied().unwrap_or(0);
        let woke = self.stalls.iter().filter(|s| s.woken_by_key()).count();
        let lost = self.stalls.iter().filter(|s| s.lost_interrupt).count();
        format!(
            "L1 froze {} time(s): {} during tern runs ({} runs), {} during QEMU runs ({} runs){}; stalled {} time(s), {lost} with an interrupt lost, {woke} woken by a key press, {} run(s) ran again",
            self.freezes.len(),
            self.freezes_of(Vmm::Tern),
            runs("tern"),
            self.freezes_of(Vmm::Qemu),
            runs("qemu"),
            match self.freezes.iter().filter(|f| f.vmm.is_none()).count() {
                0 => String::new(),
                n => format!(", {n} between runs"),
            },
            self.stalls.len(),
            self.reruns,
        )
    }

    /// True if L1 froze during tern runs at least [`FREEZES_TO_FAIL`] times and more often,
    /// per run, than during QEMU runs (with no QEMU run at all, any rate counts as more).
    ///
    /// One freeze alone is not evidence against tern: the L0 emulator itself loses L1's timer
    /// interrupt now and then (see xtask/README.md, "L1 freezes"), about once in 265 runs with
    /// QEMU 10, so a CI rig pass of 24 tern runs meets one about one time in eleven. Two in one
    /// pass would happen by that chance about once in 250 passes.
    pub fn tern_froze_more(&self) -> bool {
        let t = self.freezes_of(Vmm::Tern);
        if t < FREEZES_TO_FAIL {
            return false;
        }
        let q = self.freezes_of(Vmm::Qemu) as f64;
        let tr = self.runs_by_vmm.get("tern").copied().unwrap_or(0).max(1) as f64;
        let qr = self.runs_by_vmm.get("qemu").copied().unwrap_or(0) as f64;
        qr == 0.0 || t as f64 / tr > q / qr
    }
}

/// Freezes during tern runs, in one rig run, from which tern is suspected (with a higher rate
/// than QEMU's).
pub const FREEZES_TO_FAIL: usize = 2;

/// One planned run: its spec for the agent and where it came from.
pub(crate) struct Planned {
    spec: RunSpec,
    scenario: Scenario,
}

/// The guest kernel and initrd a scenario boots, as L1 paths.
fn kernel_and_initrd(s: &Scenario) -> (&'static str, &'static str) {
    match s.kernel {
        _ if s.debian => (debian::in_l1::KERNEL, debian::in_l1::INITRD),
        KernelForm::BzImage => (l1::BZIMAGE, l1::INITRD),
        KernelForm::Vmlinux => (l1::VMLINUX, l1::INITRD),
    }
}

/// Substitutes the L1 paths and the scenario's parameters into its argv template.
fn resolve_argv(s: &Scenario) -> Vec<String> {
    let (kernel, initrd) = kernel_and_initrd(s);
    let cmdline = s.cmdline();
    let vars = [
        ("{tern}", l1::TERN.to_string()),
        ("{qemu}", l1::QEMU.to_string()),
        ("{qemu_data}", l1::QEMU_DATA.to_string()),
        ("{kernel}", kernel.to_string()),
        ("{bzimage}", l1::BZIMAGE.to_string()),
        ("{vmlinux}", l1::VMLINUX.to_string()),
        ("{initrd}", initrd.to_string()),
        ("{cmdline}", cmdline),
        ("{cpus}", s.cpus.to_string()),
        ("{memory_mib}", s.memory_mib.to_string()),
        ("{firecracker}", l1::FIRECRACKER.to_string()),
        ("{cloud_hypervisor}", l1::CLOUD_HYPERVISOR.to_string()),
        ("{fc_config}", s.firecracker_config_path()),
    ];
    s.argv_template()
        .into_iter()
        .map(|mut arg| {
            for (key, value) in &vars {
                arg = arg.replace(key, value);
            }
            arg
        })
        .collect()
}

pub(crate) fn plan(s: &Scenario, name: String) -> Planned {
    Planned {
        spec: RunSpec {
            name,
            argv: resolve_argv(s),
            timeout_secs: s.timeout_secs,
            marker: s.marker.to_string(),
            stage: s.stage.to_string(),
            guest_mem_bytes: u64::from(s.memory_mib) << 20,
            expect: s.expect.clone(),
            // Streamed so that what the guest printed survives an L1 freeze.
            stream: s.debian,
            sigterm_after: s.sigterm_after.map(str::to_string),
            measure_memory: s.l1_script.is_none(),
            files: if s.vmm == Vmm::Firecracker {
                let (kernel, initrd) = kernel_and_initrd(s);
                vec![(
                    s.firecracker_config_path(),
                    s.firecracker_config(kernel, initrd),
                )]
            } else {
                Vec::new()
            },
        },
        scenario: s.clone(),
    }
}

/// `cargo xtask rig --list`.
/// Whether a scenario named `name` is selected by `--filter`: a comma-separated list of
/// substrings, or of exact names after `=`, any of which may match (no filter selects all).
fn matches_filter(name: &str, filter: Option<&str>) -> bool {
    filter.is_none_or(|f| {
        f.split(',').any(|part| match part.strip_prefix('=') {
            Some(exact) => name == exact,
            None => name.contains(part),
        })
    })
}

pub fn list(group: &str, filter: Option<&str>) {
    println!(
        "{:<24} {:<6} {:<9} {:>4} {:>5} {:<22} {:<8} cmdline",
        "scenario", "vmm", "kernel", "cpus", "mem", "groups", "timeout"
    );
    for s in scenarios::all() {
        let selected = s.in_group(group) && matches_filter(s.name, filter);
        println!(
            "{}{:<23} {:<6} {:<9} {:>4} {:>4}M {:<22} {:<8} {}",
            if selected { "*" } else { " " },
            s.name,
            format!("{:?}", s.vmm).to_lowercase(),
            format!("{:?}", s.kernel).to_lowercase(),
            s.cpus,
            s.memory_mib,
            s.groups.join(","),
            format!("{}s", s.timeout_secs),
            s.cmdline()
        );
    }
    println!(
        "(* = selected by --group {group}{})",
        filter.map(|f| format!(" --filter {f}")).unwrap_or_default()
    );
}

/// `cargo xtask rig`: fails if any selected scenario fails.
pub fn rig(opts: &RigOptions, group: &str, filter: Option<&str>) -> Result<()> {
    let run = rig_run(opts, group, filter)?;
    let failed = run.results.iter().filter(|r| !r.pass).count();
    let passed = run.results.len() - failed;
    println!("{}", run.freeze_summary());
    if failed > 0 {
        bail!("{failed} of {} runs failed", passed + failed);
    }
    if run.tern_froze_more() {
        bail!("L1 froze at least twice during tern runs, more often per run than during QEMU runs");
    }
    println!("all {passed} runs passed");
    Ok(())
}

/// Runs the selected scenarios (each `opts.repeat` times, interleaved); errors only when the
/// rig itself cannot run (no scenario selected, images cannot be built, L1 cannot start).
pub fn rig_run(opts: &RigOptions, group: &str, filter: Option<&str>) -> Result<RigRun> {
    let selected: Vec<Scenario> = scenarios::all()
        .into_iter()
        .filter(|s| s.in_group(group) && matches_filter(s.name, filter))
        .collect();
    if selected.is_empty() {
        bail!(
            "no scenario matches --group {group} --filter {}",
            filter.unwrap_or("(none)")
        );
    }
    let repeat = opts.repeat.max(1);
    let mut planned = Vec::new();
    for i in 1..=repeat {
        for s in &selected {
            let name = if repeat == 1 {
                s.name.to_string()
            } else {
                format!("{}#{i}", s.name)
            };
            planned.push(plan(s, name));
        }
    }
    run_planned(opts, planned, false)
}

/// `cargo xtask demo` on an emulation-backed host: boots the Debian guest with tern inside the
/// rig, printing the guest's console live. (Called from ci.rs.)
#[allow(dead_code)]
pub fn demo(opts: &RigOptions) -> Result<()> {
    let s = scenarios::demo();
    let results = run_planned(opts, vec![plan(&s, s.name.to_string())], true)?.results;
    if results.iter().any(|r| !r.pass) {
        bail!("the demo guest did not boot cleanly (see the table above)");
    }
    Ok(())
}

/// `cargo xtask bench-boot`: interleaved boots of the same guest under tern, QEMU and the
/// peers in `opts`, medians and ratios to QEMU.
pub fn bench(
    opts: &RigOptions,
    runs: usize,
    kernel: KernelForm,
    cpus: u32,
    guest_decompress: bool,
) -> Result<()> {
    let peers: Vec<Vmm> = opts.peers.iter().map(|(v, _)| *v).collect();
    if !peers.is_empty() && kernel != KernelForm::Vmlinux {
        bail!("Firecracker and Cloud Hypervisor boot only an ELF vmlinux: add --kernel vmlinux");
    }
    let set = scenarios::bench_set(kernel, cpus, guest_decompress, &peers);
    let mut planned = Vec::new();
    for i in 1..=runs.max(1) {
        for s in &set {
            planned.push(plan(s, format!("{}#{i}", s.name)));
        }
    }
    let results = run_planned(opts, planned, false)?.results;
    /// Medians of one VMM's passing runs: time to init, to exit, RSS, guest uptime (ms, KiB).
    /// `mem`: the memory sample of the passing run whose RSS is nearest the median.
    struct Stats<'a> {
        name: &'static str,
        rows: [Option<f64>; 4],
        passed: usize,
        mem: Option<&'a MemSample>,
    }
    let stats: Vec<Stats> = set
        .iter()
        .map(|s| {
            let prefix = format!("{}#", s.name);
            let ok: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.name.starts_with(&prefix) && r.pass)
                .collect();
            let med = |f: &dyn Fn(&RunResult) -> Option<f64>| {
                median(ok.iter().filter_map(|r| f(r)).collect())
            };
            let rss = med(&|r| r.mem.as_ref().map(|m| m.vmm_rss_kib as f64));
            let off = |m: &MemSample| (m.vmm_rss_kib as f64 - rss.unwrap_or(0.0)).abs();
            Stats {
                name: s.name.trim_start_matches("bench-"),
                rows: [
                    med(&|r| r.marker_ms.map(|v| v as f64)),
                    med(&|r| r.exit_ms.map(|v| v as f64)),
                    rss,
                    med(&|r| {
                        r.guest_facts
                            .get("UPTIME")
                            .and_then(|u| u.parse::<f64>().ok())
                            .map(|s| s * 1000.0)
                    }),
                ],
                passed: ok.len(),
                mem: ok
                    .iter()
                    .filter_map(|r| r.mem.as_ref())
                    .min_by(|a, b| off(a).total_cmp(&off(b))),
            }
        })
        .collect();
    let fmt_s = |v: Option<f64>| v.map_or("-".to_string(), |ms| format!("{:.2}s", ms / 1000.0));
    let fmt_m =
        |v: Option<f64>| v.map_or("-".to_string(), |kib| human_bytes((kib * 1024.0) as u64));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
        _ => "n/a".to_string(),
    };
    // stats[1] is QEMU's (bench_set puts tern, QEMU, then the peers).
    let qemu = &stats[1];
    println!();
    println!(
        "bench-boot: {:?} kernel{}, {cpus} vCPU(s), medians of passing runs ({})",
        kernel,
        if guest_decompress {
            " (tern --decompress guest)"
        } else {
            ""
        },
        stats
            .iter()
            .map(|s| format!("{} {}/{runs}", s.name, s.passed))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut head = format!("{:<22}", "");
    for (i, s) in stats.iter().enumerate() {
        head.push_str(&format!(" {:>10}", s.name));
        if i != 1 {
            head.push_str(&format!(" {:>10}", format!("{}/qemu", s.name)));
        }
    }
    println!("{head}");
    let labels = [
        "time to guest init",
        "time to exit",
        "RSS excl. guest RAM",
        "guest uptime at report",
    ];
    for (row, label) in labels.iter().enumerate() {
        let fmt = |v: Option<f64>| if row == 2 { fmt_m(v) } else { fmt_s(v) };
        let mut line = format!("{label:<22}");
        for (i, s) in stats.iter().enumerate() {
            line.push_str(&format!(" {:>10}", fmt(s.rows[row])));
            if i != 1 {
                line.push_str(&format!(" {:>10}", ratio(s.rows[row], qemu.rows[row])));
            }
        }
        println!("{line}");
    }
    if !peers.is_empty() {
        println!("(Firecracker's guest ends with a reboot, the others' with a power-off)");
    }
    println!("RSS excl. guest RAM by mapping, KiB, in each VMM's passing run nearest its median:");
    for st in &stats {
        let Some(mem) = st.mem else {
            continue;
        };
        let parts: Vec<String> = mem
            .parts
            .iter()
            .take(8)
            .map(|(kind, kib)| format!("{kind} {kib}"))
            .collect();
        println!(
            "  {:<10} {}: {}",
            st.name,
            mem.vmm_rss_kib,
            parts.join(", ")
        );
    }
    if let Some(s) = stats.iter().find(|s| s.passed == 0) {
        bail!("no passing {} runs: no ratio", s.name);
    }
    Ok(())
}

pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Events parsed from L1's console.
enum Event {
    L1Init(String),
    /// The agent's periodic sign of life.
    Heartbeat,
    AgentStart,
    Start(String),
    Log(String, Vec<u8>),
    Result(Box<RunResult>),
    Done,
    AgentExit(String),
    Warn(String),
    Garbled(String),
    Eof,
}

fn parse_line(line: &str) -> Option<Event> {
    // A kernel message may have been glued in front of a frame: look for the prefix anywhere.
    let pos = line.find(FRAME)?;
    let rest = &line[pos + FRAME.len()..];
    let (kind, body) = rest.split_once(' ').unwrap_or((rest, ""));
    let engine = base64::engine::general_purpose::STANDARD;
    Some(match kind {
        "L1-INIT" => Event::L1Init(body.to_string()),
        "L1-WARN" => Event::Warn(body.to_string()),
        "L1-AGENT-EXIT" => Event::AgentExit(body.to_string()),
        "AGENT-START" => Event::AgentStart,
        "HB" => Event::Heartbeat,
        "START" => Event::Start(body.to_string()),
        "DONE" => Event::Done,
        "LOG" => {
            let mut parts = body.splitn(3, ' ');
            let (Some(name), Some(_seq), Some(data)) = (parts.next(), parts.next(), parts.next())
            else {
                return Some(Event::Garbled(line.to_string()));
            };
            match engine.decode(data.trim()) {
                Ok(bytes) => Event::Log(name.to_string(), bytes),
                Err(_) => Event::Garbled(line.to_string()),
            }
        }
        "RESULT" => match serde_json::from_str::<RunResult>(body) {
            Ok(r) => Event::Result(Box::new(r)),
            Err(_) => Event::Garbled(line.to_string()),
        },
        _ => Event::Garbled(line.to_string()),
    })
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Builds images, runs the planned scenarios in one L1 boot, reports. With `live`, the agent
/// streams each VMM's output as it comes and it is echoed here (for demos; it perturbs timing).
pub(crate) fn run_planned(opts: &RigOptions, planned: Vec<Planned>, live: bool) -> Result<RigRun> {
    let tern = opts.tern.is_file().then_some(opts.tern.as_path());
    if tern.is_none() && planned.iter().any(|p| p.scenario.needs_tern()) {
        eprintln!(
            "[rig] tern binary not found at {} (build it with `cargo build --release -p tern` or pass --tern): tern scenarios will fail",
            opts.tern.display()
        );
    }
    let dir = rig_dir();
    std::fs::create_dir_all(&dir)?;
    // Logs of an earlier run would be mistaken for this one's.
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path
            .extension()
            .is_some_and(|e| e == "log" || e == "json" || e == "txt")
        {
            let _ = std::fs::remove_file(&path);
        }
    }
    let debian_disk = if planned.iter().any(|p| p.scenario.debian) {
        Some(debian::build()?)
    } else {
        None
    };
    let vmm_of: BTreeMap<String, Vmm> = planned
        .iter()
        .map(|p| (p.spec.name.clone(), p.scenario.vmm))
        .collect();
    let mut runs_by_vmm: BTreeMap<&'static str, usize> = BTreeMap::new();
    for p in &planned {
        *runs_by_vmm.entry(vmm_key(p.scenario.vmm)).or_default() += 1;
    }

    // Runs that cannot start are failed here, without booting L1 for them.
    let mut results: BTreeMap<String, RunResult> = BTreeMap::new();
    let mut to_run = Vec::new();
    for p in &planned {
        let missing_peer = matches!(p.scenario.vmm, Vmm::Firecracker | Vmm::CloudHypervisor)
            && !opts.peers.iter().any(|(v, _)| *v == p.scenario.vmm);
        let cannot_start = if missing_peer {
            Some(format!("no {:?} binary was given", p.scenario.vmm))
        } else if p.scenario.needs_tern() && tern.is_none() {
            Some(format!("tern binary not found at {}", opts.tern.display()))
        } else {
            None
        };
        if let Some(why) = cannot_start {
            results.insert(
                p.spec.name.clone(),
                RunResult {
                    name: p.spec.name.clone(),
                    error: Some(why.clone()),
                    reasons: vec![why],
                    ..Default::default()
                },
            );
        } else {
            let mut spec = p.spec.clone();
            spec.stream |= live;
            to_run.push(spec);
        }
    }
    let mut logs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut notes: Vec<String> = Vec::new();
    let mut freezes: Vec<Freeze> = Vec::new();
    // L1 (nested SVM under TCG) may freeze for good mid-run. A frozen L1 is killed and a fresh
    // one runs the runs that have no result yet; a run during which L1 froze twice fails.
    let mut froze_in: BTreeMap<String, u32> = BTreeMap::new();
    // Silences the rig ended with a key press (l0_watch.rs), whether L1 woke or not.
    let mut stalls: Vec<Stall> = Vec::new();
    let mut retried_after_stall: std::collections::BTreeSet<String> = Default::default();
    // Results set aside for a rerun (kept if the rerun never happens), and the seccomp lines
    // of those first attempts.
    let mut rerun_from: BTreeMap<String, RunResult> = BTreeMap::new();
    let mut stalled_violations: Vec<String> = Vec::new();
    let mut l1_boot = 0;
    // Built once for every L1 boot (not at all if no run can start).
    let imgs = if to_run.is_empty() {
        None
    } else {
        Some(images::build()?)
    };
    loop {
        let mut remaining: Vec<RunSpec> = to_run
            .iter()
            .filter(|r| !results.contains_key(&r.name))
            .cloned()
            .collect();
        if remaining.is_empty() {
            break;
        }
        if let Some(n) = opts.per_l1 {
            remaining.truncate(n.max(1));
        }
        l1_boot += 1;
        let before = results.len();
        let Some(imgs) = &imgs else {
            break;
        };
        let spec = AgentSpec {
            runs: remaining.clone(),
        };
        let spec_json = serde_json::to_string_pretty(&spec)?;
        std::fs::write(dir.join("scenarios.json"), &spec_json)?;
        let programs: Vec<(&str, &Path)> = opts
            .peers
            .iter()
            .map(|(vmm, host)| {
                let in_l1 = if *vmm == Vmm::Firecracker {
                    l1::FIRECRACKER
                } else {
                    l1::CLOUD_HYPERVISOR
                };
                (in_l1, host.as_path())
            })
            .collect();
        let initrd = images::build_l1_initrd(imgs, tern, &programs, &spec_json)?;
        let budget = L1_OVERHEAD_SECS + remaining.iter().map(|r| r.timeout_secs + 5).sum::<u64>();
        let timeouts: BTreeMap<String, u64> = remaining
            .iter()
            .map(|r| (r.name.clone(), r.timeout_secs))
            .collect();
        let outcome = run_l1(
            &L1Boot {
                imgs,
                initrd: &initrd,
                debian_disk: debian_disk.as_deref(),
                budget: Duration::from_secs(budget),
                timeouts: &timeouts,
                number: l1_boot,
            },
            &mut L1Sink {
                results: &mut results,
                logs: &mut logs,
                notes: &mut notes,
                stalls: &mut stalls,
                live,
            },
        )?;
        // A run that failed after L1 lost an interrupt under it may have failed for the stall
        // (everything in L1 waited): it gets one more try on a fresh L1, as a frozen one does.
        // Only for the known emulator fault: the dump showed the lost interrupt and L1 spoke
        // right after the key press. The first attempt's failure stays in the notes, and its
        // seccomp violations count.
        let mut requeued = false;
        for st in stalls.iter().filter(|st| st.l1_boot == l1_boot) {
            let name = &st.run;
            let Some(failed) = results.get(name).filter(|r| !r.pass) else {
                continue;
            };
            if st.lost_interrupt && st.woken_by_key() && retried_after_stall.insert(name.clone()) {
                eprintln!("[rig] {name} failed after L1 lost an interrupt under it; it runs again");
                notes.push(format!(
                    "{name} failed after L1 lost an interrupt under it (L1 boot {l1_boot}) and ran again; the first attempt: {}",
                    failed.reasons.join("; ")
                ));
                requeued = true;
                if let Some(log) = logs.remove(name) {
                    stalled_violations.extend(seccomp_lines(
                        &format!("{name} (attempt before a rerun)"),
                        &log,
                    ));
                    let path = dir.join(format!("{}.stalled-{l1_boot}.log", sanitize(name)));
                    std::fs::write(&path, &log)?;
                }
                if let Some(r) = results.remove(name) {
                    rerun_from.insert(name.clone(), r);
                }
            }
        }
        match outcome {
            Some(mut freeze) => {
                freeze.vmm = vmm_of.get(&freeze.run).copied();
                let name = freeze.run.clone();
                eprintln!(
                    "[rig] L1 froze during {name} (L1 boot {l1_boot}, after {} finished run(s) in it); booting a fresh L1 for what is left",
                    freeze.runs_before
                );
                if let Some(log) = logs.remove(&name) {
                    let path = dir.join(format!("{}.froze-{l1_boot}.log", sanitize(&name)));
                    std::fs::write(&path, &log)?;
                }
                freezes.push(freeze);
                if vmm_of.contains_key(&name) {
                    let n = froze_in.entry(name.clone()).or_default();
                    *n += 1;
                    if *n >= 2 {
                        results.insert(
                            name.clone(),
                            RunResult {
                                name: name.clone(),
                                error: Some("L1 froze twice while running this".into()),
                                reasons: vec!["L1 froze twice while running this".into()],
                                ..Default::default()
                            },
                        );
                    }
                }
                if freezes.len() > to_run.len() + 2 {
                    notes.push("L1 froze more often than there are runs; giving up".into());
                    break;
                }
            }
            // An L1 that ran but gave no new result will not do better next time.
            None if results.len() == before && !requeued => break,
            None => {}
        }
    }

    // Reports, in plan order.
    let mut ordered = Vec::new();
    let mut seccomp_violations = stalled_violations;
    for p in &planned {
        let name = &p.spec.name;
        let mut r = results
            .remove(name)
            .or_else(|| {
                // A rerun that never ran: the first attempt's failure stands.
                rerun_from.remove(name).map(|mut r| {
                    r.reasons
                        .push("its rerun after the stall never ran".to_string());
                    r
                })
            })
            .unwrap_or_else(|| RunResult {
                name: name.clone(),
                reasons: vec![
                    "no result from the rig (L1 died or timed out before it ran)".to_string(),
                ],
                ..Default::default()
            });
        let log = logs.remove(name).unwrap_or_default();
        seccomp_violations.extend(seccomp_lines(name, &log));
        if r.log_len > 0 && (log.len() != r.log_len || crate::util::fnv(&log) != r.log_fnv) {
            notes.push(format!(
                "{name}: log damaged in transfer ({} of {} bytes received)",
                log.len(),
                r.log_len
            ));
        }
        let path = dir.join(format!("{}.log", sanitize(name)));
        let mut text = format!("# {name}\n# argv: {:?}\n", p.spec.argv);
        text.push_str(&format!("# result: {}\n", serde_json::to_string(&r)?));
        text.push_str(&String::from_utf8_lossy(&log));
        std::fs::write(&path, text)?;
        if r.error.is_some() && r.reasons.is_empty() {
            r.reasons.push(r.error.clone().unwrap_or_default());
        }
        ordered.push(r);
    }
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&ordered)?,
    )?;
    if let Some(keep) = &opts.keep_logs {
        std::fs::create_dir_all(keep)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_file() {
                std::fs::copy(&path, keep.join(path.file_name().unwrap_or_default()))?;
            }
        }
    }
    print_table(&ordered);
    for note in &notes {
        println!("note: {note}");
    }
    for f in &freezes {
        println!(
            "L1 FROZE during {} ({}), L1 boot {} after {} finished run(s) in it, last heard {:.0}s into the run, L0 CPU while silent: {}{}",
            f.run,
            f.vmm.map_or("no VMM", vmm_key),
            f.l1_boot,
            f.runs_before,
            f.last_heard_secs,
            f.l0_cpu_secs
                .map_or("unknown".to_string(), |c| format!("{c:.1}s")),
            f.diagnostics
                .as_ref()
                .map_or(String::new(), |p| format!(", diagnostics {}", p.display()))
        );
    }
    for s in stalls.iter_mut() {
        s.vmm = vmm_of.get(&s.run).copied();
        println!(
            "L1 STALLED during {} ({}), L1 boot {}, silent from {:.0}s into the run, L0 CPU while silent: {}; {}{}",
            s.run,
            s.vmm.map_or("no VMM", vmm_key),
            s.l1_boot,
            s.last_heard_secs,
            s.l0_cpu_secs
                .map_or("unknown".to_string(), |c| format!("{c:.1}s")),
            match (s.sent, s.woke_after_secs) {
                (false, _) => "the L0 monitor could not be reached".to_string(),
                (true, Some(w)) if w < 0.0 => {
                    format!("L1 spoke again {:.2}s before the key press", -w)
                }
                (true, Some(w)) => format!("L1 spoke again {w:.2}s after a key press"),
                (true, None) => "a key press did not wake it".to_string(),
            } + if s.lost_interrupt {
                " (the dump shows an interrupt pending in its APIC, none in service)"
            } else {
                " (the dump shows no pending interrupt)"
            },
            s.diagnostics
                .as_ref()
                .map_or(String::new(), |p| format!(", diagnostics {}", p.display()))
        );
    }
    println!("logs: {}", dir.display());
    Ok(RigRun {
        results: ordered,
        freezes,
        stalls,
        reruns: retried_after_stall.len(),
        runs_by_vmm,
        seccomp_violations,
    })
}

/// How a line tern writes when its seccomp filter stops a call begins.
pub const SECCOMP_LINE: &str = "tern: seccomp: ";

/// The lines of a run's output where tern's seccomp filter stopped a call, as `LABEL: line`.
fn seccomp_lines(label: &str, log: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(log)
        .lines()
        .filter(|l| l.contains(SECCOMP_LINE))
        .map(|l| format!("{label}: {}", l.trim()))
        .collect()
}

fn vmm_key(vmm: Vmm) -> &'static str {
    match vmm {
        Vmm::Tern => "tern",
        Vmm::Qemu => "qemu",
        Vmm::Firecracker => "fc",
        Vmm::CloudHypervisor => "ch",
    }
}

fn print_table(results: &[RunResult]) {
    let secs =
        |ms: Option<u64>| ms.map_or("-".to_string(), |v| format!("{:.2}s", v as f64 / 1000.0));
    println!();
    println!(
        "{:<24} {:<7} {:>9} {:>9} {:>9} {:>11} {:>11} {:>5} {:>6} {:>7}  reasons",
        "scenario",
        "verdict",
        "stage",
        "marker",
        "exit",
        "vmm-rss",
        "guest-rss",
        "code",
        "nproc",
        "g-upt"
    );
    for r in results {
        println!(
            "{:<24} {:<7} {:>9} {:>9} {:>9} {:>11} {:>11} {:>5} {:>6} {:>7}  {}",
            r.name,
            if r.pass { "PASS" } else { "FAIL" },
            secs(r.stage_ms),
            secs(r.marker_ms),
            secs(r.exit_ms),
            r.mem
                .as_ref()
                .map_or("-".to_string(), |m| human_bytes(m.vmm_rss_kib * 1024)),
            r.mem
                .as_ref()
                .map_or("-".to_string(), |m| human_bytes(m.guest_rss_kib * 1024)),
            r.exit_code.map_or_else(
                || r.signal.map_or("-".to_string(), |s| format!("sig{s}")),
                |c| c.to_string()
            ),
            r.guest_facts.get("NPROC").map_or("-", String::as_str),
            r.guest_facts.get("UPTIME").map_or("-", String::as_str),
            r.reasons.join("; ")
        );
    }
}

/// The L0 emulator that runs L1 and its firmware search path: `TERN_RIG_L0_QEMU` if set (to
/// try another QEMU build; give its `-L` in `TERN_RIG_L0_ARGS`), otherwise QEMU from
/// bookworm-backports ([`images::l0_emulator`]).
fn l0_qemu(imgs: &Images) -> (PathBuf, Vec<PathBuf>) {
    match std::env::var_os("TERN_RIG_L0_QEMU") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), Vec::new()),
        _ => (
            imgs.l0_qemu.clone(),
            vec![imgs.l0_data.clone(), PathBuf::from("/usr/share/seabios")],
        ),
    }
}

/// An environment override of the rig's L1 set-up, or `default`.
fn rig_env(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// L1's CPU model: an EPYC with AMD-V and nested paging. `TERN_RIG_L1_CPU` overrides it.
const L1_CPU: &str = "EPYC,+svm,+npt";

/// The L1 QEMU command line. `TERN_RIG_L1_APPEND` adds to L1's kernel command line (e.g.
/// `kvm_amd.vgif=0`) and `TERN_RIG_L0_ARGS` (split at spaces) to the emulator's arguments.
fn l1_command(
    imgs: &Images,
    initrd: &Path,
    extra_cmdline: &str,
    debian_disk: Option<&Path>,
    monitor: Option<&Path>,
) -> Command {
    let (qemu, data) = l0_qemu(imgs);
    let mut cmd = Command::new(qemu);
    cmd.env("LD_PRELOAD", &imgs.l0_preload);
    for dir in data {
        cmd.arg("-L").arg(dir);
    }
    cmd.args(L1_MACHINE)
        .args(["-accel", "tcg", "-cpu"])
        .arg(rig_env("TERN_RIG_L1_CPU", L1_CPU))
        .args(["-smp", "1", "-m"])
        .arg(L1_MEMORY_MIB.to_string())
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(&imgs.l1_kernel)
        .arg("-initrd")
        .arg(initrd);
    let mut cmdline = format!("{L1_CMDLINE} {}", rig_env("TERN_RIG_L1_APPEND", ""));
    if let Some(disk) = debian_disk {
        let mut drive = std::ffi::OsString::from("file=");
        drive.push(disk);
        drive.push(",format=raw,if=virtio,readonly=on");
        cmd.arg("-drive").arg(drive);
        cmdline.push_str(" rig.debian=1");
    }
    if let Some(sock) = monitor {
        let mut spec = std::ffi::OsString::from("unix:");
        spec.push(sock);
        spec.push(",server=on,wait=off");
        cmd.arg("-monitor").arg(spec);
    }
    cmd.args(rig_env("TERN_RIG_L0_ARGS", "").split_whitespace());
    cmdline.push(' ');
    cmdline.push_str(extra_cmdline);
    cmd.arg("-append")
        .arg(cmdline.split_whitespace().collect::<Vec<_>>().join(" "));
    cmd
}

/// Where `boot_l1` puts what it learns.
struct L1Sink<'a> {
    results: &'a mut BTreeMap<String, RunResult>,
    logs: &'a mut BTreeMap<String, Vec<u8>>,
    notes: &'a mut Vec<String>,
    stalls: &'a mut Vec<Stall>,
    /// Echo guest output to stdout as it arrives.
    live: bool,
}

/// One L1 boot's inputs.
struct L1Boot<'a> {
    imgs: &'a Images,
    initrd: &'a Path,
    debian_disk: Option<&'a Path>,
    budget: Duration,
    timeouts: &'a BTreeMap<String, u64>,
    /// Which L1 boot of the rig run this is (1-based).
    number: usize,
}

/// Boots L1 with the agent and collects results and logs; boots it a second time if the first
/// boot never reaches /init (a rare early-boot hang under TCG).
/// Returns the freeze, if L1 froze.
fn run_l1(boot: &L1Boot, sink: &mut L1Sink) -> Result<Option<Freeze>> {
    for attempt in 1..=2 {
        match boot_l1(boot, sink)? {
            L1Outcome::Ran => return Ok(None),
            L1Outcome::Froze(f) => return Ok(Some(*f)),
            L1Outcome::NoInit if attempt == 1 => {
                eprintln!(
                    "[rig] L1 did not reach /init within {}s; booting it again",
                    L1_INIT_TIMEOUT.as_secs()
                );
                sink.notes
                    .push("L1's first boot hung before /init and was retried".to_string());
            }
            L1Outcome::NoInit => sink
                .notes
                .push("L1 never reached /init (twice)".to_string()),
        }
    }
    Ok(None)
}

enum L1Outcome {
    /// L1 reached /init (whatever happened next).
    Ran,
    /// L1 was killed for not reaching /init in time.
    NoInit,
    /// L1 stopped responding and was killed.
    Froze(Box<Freeze>),
}

/// How long past a run's own timeout L1 may go on without reporting it before it counts as
/// frozen (the agent kills a run at its timeout and reports).
const L1_FREEZE_GRACE: Duration = Duration::from_secs(45);
/// The agent prints a heartbeat every few seconds (`agent.rs`); an L1 silent this long has
/// frozen.
const L1_SILENCE: Duration = Duration::from_secs(45);

fn boot_l1(boot: &L1Boot, sink: &mut L1Sink) -> Result<L1Outcome> {
    let console_path = rig_dir().join(format!("l1-console-{}.txt", boot.number));
    let mut console = std::fs::File::create(&console_path)?;
    let monitor = rig_dir().join("l1-monitor.sock");
    let _ = std::fs::remove_file(&monitor);
    let mut cmd = l1_command(boot.imgs, boot.initrd, "", boot.debian_disk, Some(&monitor));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!(
        "[rig] booting L1 #{} (QEMU TCG, budget {}s)",
        boot.number,
        boot.budget.as_secs()
    );
    let start = Instant::now();
    let mut child = cmd.spawn().context("cannot start L1 QEMU")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("no L1 stdout")?;
    let stderr = child.stderr.take().context("no L1 stderr")?;
    // Each line with when it arrived (a stall's wake-up is timed from these stamps).
    let (tx, rx) = mpsc::channel::<(Option<Event>, String, Instant)>();
    let tx_err = tx.clone();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&raw);
                    let line = line.trim_end_matches(['\r', '\n']).to_string();
                    if tx.send((parse_line(&line), line, Instant::now())).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send((Some(Event::Eof), String::new(), Instant::now()));
    });
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx_err.send((None, format!("[l1-qemu-stderr] {line}"), Instant::now()));
        }
    });

    let deadline = start + boot.budget;
    let mut init_reached = false;
    let mut agent_started = false;
    let mut done = false;
    let mut finished_runs = 0;
    let mut current: Option<(String, Instant)> = None;
    let mut last_heard = Instant::now();
    let mut cpu_at_last_heard = l0_watch::cpu_secs(pid);
    let mut froze: Option<Freeze> = None;
    // The nudge sent in the current silence, if any, and when.
    let mut nudged: Option<(Stall, Instant)> = None;
    let seconds_into_run = |current: &Option<(String, Instant)>, last_heard: Instant| {
        current.as_ref().map_or(0.0, |(_, at)| {
            last_heard.saturating_duration_since(*at).as_secs_f64()
        })
    };
    let run_name = |current: &Option<(String, Instant)>| {
        current
            .as_ref()
            .map_or("(between runs)".to_string(), |(n, _)| n.clone())
    };
    loop {
        let now = Instant::now();
        let limit = if init_reached {
            deadline
        } else {
            deadline.min(start + L1_INIT_TIMEOUT)
        };
        // The agent kills a run at its timeout and reports; silence well past that, or no
        // heartbeat for L1_SILENCE, means L1 itself is stuck.
        let overdue_at = current.as_ref().map(|(name, at)| {
            *at + Duration::from_secs(boot.timeouts.get(name).copied().unwrap_or(120))
                + L1_FREEZE_GRACE
        });
        let silent_at = (agent_started && !done).then_some(last_heard + L1_SILENCE);
        let freeze_at = match (overdue_at, silent_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let cpu_since_heard = || match (l0_watch::cpu_secs(pid), cpu_at_last_heard) {
            (Some(now), Some(then)) => Some(now - then),
            _ => None,
        };
        if freeze_at.is_some_and(|f| now >= f) {
            let cpu = cpu_since_heard();
            let diagnostics = l0_watch::save_diagnostics(
                &monitor,
                pid,
                true,
                rig_dir().join(format!("freeze-l1-{}.txt", boot.number)),
            )
            .path;
            if let Some((stall, _)) = nudged.take() {
                sink.stalls.push(stall);
            }
            froze = Some(Freeze {
                run: run_name(&current),
                vmm: None,
                l1_boot: boot.number,
                runs_before: finished_runs,
                last_heard_secs: seconds_into_run(&current, last_heard),
                l0_cpu_secs: cpu,
                diagnostics,
            });
            break;
        }
        // A long silence may be the emulator's lost interrupt: save what L0 sees, then send
        // L1 a key press, whose interrupt brings the lost one back (l0_watch.rs).
        let nudge_at = (agent_started && !done && nudged.is_none())
            .then_some(last_heard + l0_watch::NUDGE_AFTER);
        if nudge_at.is_some_and(|n| now >= n) {
            let l0_cpu_secs = cpu_since_heard();
            let number = sink.stalls.len() + 1;
            let diagnostics = l0_watch::save_diagnostics(
                &monitor,
                pid,
                false,
                rig_dir().join(format!("stall-l1-{}-{number}.txt", boot.number)),
            );
            let sent_at = l0_watch::nudge(&monitor);
            eprintln!(
                "[rig] {:6.1}s L1 silent for {}s{}; {}",
                start.elapsed().as_secs_f64(),
                l0_watch::NUDGE_AFTER.as_secs(),
                if diagnostics.lost_interrupt {
                    " (an interrupt pending in its APIC, none in service)"
                } else {
                    ""
                },
                if sent_at.is_some() {
                    "sent it a key press"
                } else {
                    "the L0 monitor could not be reached"
                }
            );
            let stall = Stall {
                run: run_name(&current),
                vmm: None,
                l1_boot: boot.number,
                last_heard_secs: seconds_into_run(&current, last_heard),
                l0_cpu_secs,
                sent: sent_at.is_some(),
                lost_interrupt: diagnostics.lost_interrupt,
                woke_after_secs: None,
                diagnostics: diagnostics.path,
            };
            nudged = Some((stall, sent_at.unwrap_or_else(Instant::now)));
            continue;
        }
        let limit = [freeze_at, nudge_at]
            .into_iter()
            .flatten()
            .fold(limit, |l, f| f.min(l));
        if now >= limit {
            if init_reached {
                sink.notes.push(format!(
                    "L1 hit the overall timeout ({}s) and was killed",
                    boot.budget.as_secs()
                ));
            }
            break;
        }
        let Ok((event, line, arrived)) = rx.recv_timeout(limit - now) else {
            continue;
        };
        // The emulator's own end is not L1 speaking.
        if event.is_some() && !matches!(event, Some(Event::Eof)) {
            last_heard = Instant::now();
            cpu_at_last_heard = l0_watch::cpu_secs(pid);
            if let Some((mut stall, at)) = nudged.take() {
                let woke = if arrived >= at {
                    arrived.duration_since(at).as_secs_f64()
                } else {
                    -at.duration_since(arrived).as_secs_f64()
                };
                eprintln!(
                    "[rig] {:6.1}s L1 spoke again {:.2}s {} the key press",
                    start.elapsed().as_secs_f64(),
                    woke.abs(),
                    if woke < 0.0 { "before" } else { "after" }
                );
                stall.woke_after_secs = Some(woke);
                sink.stalls.push(stall);
            }
        }
        let t = start.elapsed().as_secs_f64();
        if !matches!(event, Some(Event::Log(..) | Event::Heartbeat)) {
            let _ = writeln!(console, "{line}");
        }
        match event {
            Some(Event::Eof) => break,
            Some(Event::Heartbeat) => {}
            Some(Event::L1Init(info)) => {
                init_reached = true;
                eprintln!("[rig] {t:6.1}s L1 init reached ({info})");
            }
            Some(Event::AgentStart) => {
                agent_started = true;
                eprintln!("[rig] {t:6.1}s agent started");
            }
            Some(Event::Warn(w)) => {
                eprintln!("[rig] {t:6.1}s L1 warning: {w}");
                sink.notes.push(format!("L1: {w}"));
            }
            Some(Event::Start(name)) => {
                eprintln!("[rig] {t:6.1}s running {name}");
                current = Some((name, Instant::now()));
            }
            Some(Event::Log(name, bytes)) => {
                if sink.live {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&bytes);
                    let _ = out.flush();
                }
                sink.logs.entry(name).or_default().extend(bytes);
            }
            Some(Event::Result(r)) => {
                finished_runs += 1;
                let took = current
                    .take()
                    .map_or(0.0, |(_, at)| at.elapsed().as_secs_f64());
                eprintln!(
                    "[rig] {t:6.1}s {} {} (marker {}, exit {}, {took:.1}s incl. transfer){}",
                    r.name,
                    if r.pass { "PASS" } else { "FAIL" },
                    r.marker_ms
                        .map_or("-".into(), |v| format!("{:.2}s", v as f64 / 1000.0)),
                    r.exit_ms
                        .map_or("-".into(), |v| format!("{:.2}s", v as f64 / 1000.0)),
                    if r.pass {
                        String::new()
                    } else {
                        format!(": {}", r.reasons.join("; "))
                    }
                );
                sink.results.insert(r.name.clone(), *r);
            }
            Some(Event::Done) => {
                eprintln!("[rig] {t:6.1}s agent done");
                done = true;
            }
            Some(Event::AgentExit(code)) if code.trim() != "0" => {
                sink.notes
                    .push(format!("rig agent exited with status {code}"));
            }
            Some(Event::Garbled(l)) => sink.notes.push(format!("garbled frame: {l}")),
            Some(Event::AgentExit(_)) | None => {}
        }
    }
    // A nudge still waiting for an answer when the loop ended: L1 never spoke again.
    if let Some((stall, _)) = nudged.take() {
        sink.stalls.push(stall);
    }
    // L1 powers itself off after the agent; give it a moment, then make sure it is gone.
    let grace = Instant::now() + Duration::from_secs(if done { 20 } else { 0 });
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() >= grace {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(&monitor);
    // Drain whatever is left (console lines after the loop ended).
    while let Ok((_, line, _)) = rx.try_recv() {
        let _ = writeln!(console, "{line}");
    }
    eprintln!(
        "[rig] L1 finished after {:.1}s (console: {})",
        start.elapsed().as_secs_f64(),
        console_path.display()
    );
    if !init_reached {
        return Ok(L1Outcome::NoInit);
    }
    if let Some(f) = froze {
        return Ok(L1Outcome::Froze(Box::new(f)));
    }
    if !done {
        sink.notes.push(format!(
            "the agent did not finish; see {} for L1's console",
            console_path.display()
        ));
    }
    Ok(L1Outcome::Ran)
}

/// `cargo xtask shell`: boot L1 interactively (console on this terminal) with the guest images
/// and tools, to poke at things by hand.
pub fn shell(tern: &Path) -> Result<()> {
    let imgs = images::build()?;
    let tern = tern.is_file().then_some(tern);
    let spec_json = serde_json::to_string_pretty(&AgentSpec { runs: Vec::new() })?;
    let initrd = images::build_l1_initrd(&imgs, tern, &[], &spec_json)?;
    eprintln!("[rig] booting L1 with a shell (Ctrl-A X quits QEMU)");
    let status = l1_command(&imgs, &initrd, "rig.l1=shell", None, None)
        .status()
        .context("cannot start L1 QEMU")?;
    if !status.success() {
        bail!("L1 QEMU exited with {status}");
    }
    Ok(())
}

/// Prints what `cargo xtask images` built.
pub fn print_images(imgs: &Images, l1_initrd: &Path) {
    let size = |p: &Path| std::fs::metadata(p).map_or("?".to_string(), |m| human_bytes(m.len()));
    println!("L0 emulator   {}", imgs.l0_qemu.display());
    println!(
        "L1 kernel     {} ({}, {})",
        imgs.l1_kernel.display(),
        imgs.l1_release,
        size(&imgs.l1_kernel)
    );
    println!(
        "guest bzImage {} ({}, {})",
        imgs.vmlinuz_cloud.display(),
        imgs.guest_release,
        size(&imgs.vmlinuz_cloud)
    );
    println!(
        "guest vmlinux {} ({})",
        imgs.vmlinux_cloud.display(),
        size(&imgs.vmlinux_cloud)
    );
    println!(
        "guest initrd  {} ({})",
        imgs.guest_initrd.display(),
        size(&imgs.guest_initrd)
    );
    println!(
        "L1 initrd     {} ({})",
        l1_initrd.display(),
        size(l1_initrd)
    );
}

/// The core run list, used by `cargo xtask images` to build a default L1 initramfs.
pub fn default_spec_json() -> Result<String> {
    let runs = scenarios::all()
        .iter()
        .filter(|s| s.in_group("core"))
        .map(|s| plan(s, s.name.to_string()).spec)
        .collect();
    Ok(serde_json::to_string_pretty(&AgentSpec { runs })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn freeze(vmm: Option<Vmm>) -> Freeze {
        Freeze {
            run: "r".into(),
            vmm,
            l1_boot: 1,
            runs_before: 0,
            last_heard_secs: 0.0,
            l0_cpu_secs: None,
            diagnostics: None,
        }
    }

    fn rig_run(freezes: Vec<Freeze>, tern_runs: usize, qemu_runs: usize) -> RigRun {
        RigRun {
            results: Vec::new(),
            freezes,
            stalls: Vec::new(),
            reruns: 0,
            seccomp_violations: Vec::new(),
            runs_by_vmm: [("tern", tern_runs), ("qemu", qemu_runs)]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn tern_freezes_are_judged_per_run_against_qemu_freezes() {
        // No freeze, or only QEMU's: fine.
        assert!(!rig_run(vec![], 20, 4).tern_froze_more());
        assert!(!rig_run(vec![freeze(Some(Vmm::Qemu))], 20, 4).tern_froze_more());
        // One tern freeze is the L0 emulator's base rate: fine, however few QEMU runs.
        assert!(!rig_run(vec![freeze(Some(Vmm::Tern))], 20, 4).tern_froze_more());
        assert!(!rig_run(vec![freeze(Some(Vmm::Tern))], 20, 0).tern_froze_more());
        // Two with none under QEMU fail.
        let two = || vec![freeze(Some(Vmm::Tern)), freeze(Some(Vmm::Tern))];
        assert!(rig_run(two(), 20, 4).tern_froze_more());
        assert!(rig_run(two(), 20, 0).tern_froze_more());
        // 2 in 20 tern runs is a lower rate than 1 in 4 QEMU runs; 2 in 4 is not.
        let two_tern = || {
            vec![
                freeze(Some(Vmm::Tern)),
                freeze(Some(Vmm::Tern)),
                freeze(Some(Vmm::Qemu)),
            ]
        };
        assert!(!rig_run(two_tern(), 20, 4).tern_froze_more());
        assert!(rig_run(two_tern(), 4, 4).tern_froze_more());
        // A freeze between runs belongs to neither VMM, and the summary says so.
        let between = rig_run(vec![freeze(None), freeze(Some(Vmm::Qemu))], 3, 2);
        assert!(!between.tern_froze_more());
        assert_eq!(
            between.freeze_summary(),
            "L1 froze 2 time(s): 0 during tern runs (3 runs), 1 during QEMU runs (2 runs), 1 between runs; stalled 0 time(s), 0 with an interrupt lost, 0 woken by a key press, 0 run(s) ran again"
        );
    }

    #[test]
    fn stalls_are_counted_apart_from_freezes() {
        let stall = |woke: Option<f64>| Stall {
            run: "r".into(),
            vmm: Some(Vmm::Tern),
            l1_boot: 1,
            last_heard_secs: 3.0,
            l0_cpu_secs: Some(0.4),
            sent: true,
            lost_interrupt: woke.is_some(),
            woke_after_secs: woke,
            diagnostics: None,
        };
        let mut run = rig_run(vec![freeze(Some(Vmm::Tern))], 20, 4);
        // Woken right after the key, before it (during the dump), long after it, never.
        run.stalls = vec![
            stall(Some(0.2)),
            stall(Some(-0.3)),
            stall(Some(4.0)),
            stall(None),
        ];
        run.reruns = 1;
        assert!(run.stalls[0].woken_by_key());
        assert!(!run.stalls[1].woken_by_key() && !run.stalls[2].woken_by_key());
        // A stall a key press ended is the emulator's lost interrupt, not a freeze.
        assert!(!run.tern_froze_more());
        assert_eq!(
            run.freeze_summary(),
            "L1 froze 1 time(s): 1 during tern runs (20 runs), 0 during QEMU runs (4 runs); stalled 4 time(s), 3 with an interrupt lost, 1 woken by a key press, 1 run(s) ran again"
        );
    }

    #[test]
    fn heartbeats_parse() {
        assert!(matches!(
            parse_line("@@RIG-HB 123.45"),
            Some(Event::Heartbeat)
        ));
    }

    #[test]
    fn frames_parse() {
        let r = RunResult {
            name: "x".into(),
            pass: true,
            ..Default::default()
        };
        let line = format!(
            "[ 12.3] junk{FRAME}RESULT {}",
            serde_json::to_string(&r).unwrap()
        );
        assert!(matches!(parse_line(&line), Some(Event::Result(r)) if r.name == "x" && r.pass));
        assert!(
            matches!(parse_line("@@RIG-LOG a 0 aGVsbG8="), Some(Event::Log(n, b)) if n == "a" && b == b"hello")
        );
        assert!(matches!(
            parse_line("@@RIG-LOG a 0 !!!"),
            Some(Event::Garbled(_))
        ));
        assert!(parse_line("plain console line").is_none());
    }

    #[test]
    fn argv_resolution() {
        let s = scenarios::all()
            .into_iter()
            .find(|s| s.name == "qemu-vmlinux-pvh")
            .unwrap();
        let argv = resolve_argv(&s);
        assert_eq!(argv[0], l1::QEMU);
        assert!(argv.iter().any(|a| a == l1::VMLINUX));
        assert!(argv.iter().any(|a| a.contains("rig.action=poweroff")));
        assert!(!argv.iter().any(|a| a.contains('{')));
    }

    #[test]
    fn peers_boot_the_same_guest() {
        let set = scenarios::bench_set(
            KernelForm::Vmlinux,
            2,
            false,
            &[Vmm::Firecracker, Vmm::CloudHypervisor],
        );
        let names: Vec<_> = set.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "bench-tern",
                "bench-qemu",
                "bench-tern-pci",
                "bench-fc",
                "bench-ch"
            ]
        );
        let tern = resolve_argv(&set[0]);
        assert!(tern.windows(2).any(|w| w == ["--transport", "mmio"]));
        assert!(!resolve_argv(&set[2]).iter().any(|a| a == "--transport"));
        let fc = plan(&set[3], "bench-fc#1".into()).spec;
        assert_eq!(fc.argv[0], l1::FIRECRACKER);
        let (path, json) = &fc.files[0];
        assert!(fc.argv.contains(path));
        let cfg: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(cfg["boot-source"]["kernel_image_path"], l1::VMLINUX);
        assert_eq!(cfg["boot-source"]["initrd_path"], l1::INITRD);
        assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
        let args = cfg["boot-source"]["boot_args"].as_str().unwrap();
        assert!(args.contains("rig.action=reboot"), "{args}");
        let ch = plan(&set[4], "bench-ch#1".into()).spec;
        assert_eq!(ch.argv[0], l1::CLOUD_HYPERVISOR);
        assert!(ch.argv.iter().any(|a| a == "boot=2"));
        assert!(ch.argv.iter().any(|a| a.contains("rig.action=poweroff")));
        assert!(!ch.argv.iter().chain(&fc.argv).any(|a| a.contains('{')));
        // The same guest: kernel command lines differ only in how the guest ends.
        let qemu = plan(&set[1], "bench-qemu#1".into()).spec;
        let cmdline = |argv: &[String], flag: &str| {
            argv.iter()
                .skip_while(|a| *a != flag)
                .nth(1)
                .cloned()
                .unwrap()
        };
        assert_eq!(
            cmdline(&qemu.argv, "-append"),
            cmdline(&ch.argv, "--cmdline")
        );
        assert_eq!(
            args.replace("rig.action=reboot", "rig.action=poweroff"),
            cmdline(&ch.argv, "--cmdline")
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
