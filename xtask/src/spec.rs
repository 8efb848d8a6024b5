//! What the host tells the rig agent (a list of runs) and what the agent reports back, plus the
//! serial-line framing between them. Shared by both sides.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Prefix of every framed line the agent writes to L1's console.
pub const FRAME: &str = "@@RIG-";

/// The file the agent reads inside L1.
pub const SPEC_PATH_IN_L1: &str = "/rig/scenarios.json";

/// The list of runs for one L1 boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentSpec {
    pub runs: Vec<RunSpec>,
}

/// One VMM invocation inside L1.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSpec {
    /// Unique name (scenario name, with `#N` for repeated bench runs).
    pub name: String,
    /// Full command line, paths already resolved for L1.
    pub argv: Vec<String>,
    /// Hard timeout; the VMM's process group is killed after it.
    pub timeout_secs: u64,
    /// Output substring whose first appearance is timed (and triggers the RSS sample).
    pub marker: String,
    /// Another output substring whose first appearance is timed, such as a boot loader's first
    /// line (empty: none).
    #[serde(default)]
    pub stage: String,
    /// Guest RAM size; mappings at least this large are counted as guest RAM, not VMM overhead.
    pub guest_mem_bytes: u64,
    pub expect: Expect,
    /// Send the output to the host as it comes (for demos) instead of after the run.
    #[serde(default)]
    pub stream: bool,
    /// Send the VMM one SIGTERM when its output first contains this (e.g. to press tern's
    /// power button once the guest is ready for it).
    #[serde(default)]
    pub sigterm_after: Option<String>,
    /// Sample the process's memory at the marker. Off when the process is an L1-side script
    /// that runs the VMM as a child (its own RSS would be taken for the VMM's).
    #[serde(default = "yes")]
    pub measure_memory: bool,
    /// Files the agent writes, as (L1 path, contents), before it starts the run (untimed).
    #[serde(default)]
    pub files: Vec<(String, String)>,
}

fn yes() -> bool {
    true
}

/// What a passing run looks like.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Expect {
    pub exit: ExitExpect,
    /// The marker must appear.
    pub marker_required: bool,
    /// Substrings that must appear in the output.
    pub require: Vec<String>,
    /// Substrings that must not appear in the output.
    pub forbid: Vec<String>,
}

/// Expected way for the VMM process to end (a timeout always fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitExpect {
    /// Exit with exactly this code.
    Code(i32),
    /// Exit with a non-zero code (not killed by a signal).
    NonZero,
    /// Exit with any code (not killed by a signal).
    AnyCode,
}

/// VMM memory at the marker moment, from `/proc/PID/smaps` (KiB).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MemSample {
    /// Rss of every mapping except guest RAM: the VMM's own footprint.
    pub vmm_rss_kib: u64,
    /// Rss of the mappings taken as guest RAM (size >= guest memory size).
    pub guest_rss_kib: u64,
    /// Number of mappings taken as guest RAM.
    pub guest_mappings: u32,
    /// `VmHWM` from `/proc/PID/status` (peak Rss, guest RAM included).
    pub hwm_kib: u64,
    /// `vmm_rss_kib` by kind of mapping, largest first: a file's name or `[heap]`, `[stack]`,
    /// `anon`…, with the mapping's permissions (`r-xp` is code).
    #[serde(default)]
    pub parts: Vec<(String, u64)>,
}

/// The agent's report for one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub name: String,
    /// The run could not start (or the agent failed around it).
    pub error: Option<String>,
    /// Milliseconds from spawn to the first output line containing the marker.
    pub marker_ms: Option<u64>,
    /// Milliseconds from spawn to the first output containing the stage string.
    #[serde(default)]
    pub stage_ms: Option<u64>,
    /// Milliseconds from spawn to process exit (or to the kill on timeout).
    pub exit_ms: Option<u64>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub mem: Option<MemSample>,
    /// `TERN-GUEST-KEY=VALUE` lines the guest printed.
    pub guest_facts: BTreeMap<String, String>,
    pub pass: bool,
    /// Why it failed (empty when it passed).
    pub reasons: Vec<String>,
    /// Output length and FNV-1a hash, to check the log survived the serial link.
    pub log_len: usize,
    pub log_fnv: u64,
    /// The output was longer than the agent keeps.
    pub log_truncated: bool,
}

/// Applies `expect` to a finished run, filling `pass` and `reasons`.
pub fn judge(expect: &Expect, result: &mut RunResult, output: &str) {
    let mut reasons = Vec::new();
    if let Some(e) = &result.error {
        reasons.push(e.clone());
    }
    if result.timed_out {
        reasons.push("timed out (killed)".to_string());
    } else if let Some(sig) = result.signal {
        reasons.push(format!("killed by signal {sig}"));
    } else if let Some(code) = result.exit_code {
        let ok = match expect.exit {
            ExitExpect::Code(want) => code == want,
            ExitExpect::NonZero => code != 0,
            ExitExpect::AnyCode => true,
        };
        if !ok {
            reasons.push(format!("exit code {code}, expected {:?}", expect.exit));
        }
    } else if result.error.is_none() {
        reasons.push("no exit status".to_string());
    }
    if expect.marker_required && result.marker_ms.is_none() && result.error.is_none() {
        reasons.push("marker never appeared".to_string());
    }
    // Forbidden output first, quoting the first line that has it: it usually says what went
    // wrong (`TERN-GUEST-ERROR=...`, a script's `...-FAIL ...: why`).
    for needle in &expect.forbid {
        if let Some(pos) = output.find(needle.as_str()) {
            let start = output[..pos].rfind('\n').map_or(0, |i| i + 1);
            let end = output[pos..].find('\n').map_or(output.len(), |i| pos + i);
            let line: String = output[start..end].trim().chars().take(300).collect();
            reasons.push(format!("output contains {needle:?}: {line:?}"));
        }
    }
    let missing: Vec<&String> = expect
        .require
        .iter()
        .filter(|needle| !output.contains(needle.as_str()))
        .collect();
    match missing.as_slice() {
        [] => {}
        [one] => reasons.push(format!("output lacks {one:?}")),
        [first, second] => {
            reasons.push(format!("output lacks {first:?}"));
            reasons.push(format!("output lacks {second:?}"));
        }
        [first, rest @ ..] => reasons.push(format!(
            "output lacks {first:?} and {} more required strings",
            rest.len()
        )),
    }
    result.pass = reasons.is_empty();
    result.reasons = reasons;
}

/// Collects `TERN-GUEST-KEY=VALUE` facts from guest output.
pub fn guest_facts(output: &str) -> BTreeMap<String, String> {
    let mut facts = BTreeMap::new();
    for line in output.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(pos) = line.find("TERN-GUEST-") {
            let rest = &line[pos + "TERN-GUEST-".len()..];
            if let Some((key, value)) = rest.split_once('=') {
                if !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    let value = value.split_whitespace().next().unwrap_or("");
                    facts.insert(key.to_string(), value.to_string());
                }
            }
        }
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect(exit: ExitExpect) -> Expect {
        Expect {
            exit,
            marker_required: true,
            require: vec!["NPROC=2".into()],
            forbid: vec!["Kernel panic".into()],
        }
    }

    #[test]
    fn judging() {
        let mut r = RunResult {
            exit_code: Some(0),
            marker_ms: Some(5),
            ..Default::default()
        };
        judge(&expect(ExitExpect::Code(0)), &mut r, "TERN-GUEST-NPROC=2\n");
        assert!(r.pass, "{:?}", r.reasons);
        judge(&expect(ExitExpect::NonZero), &mut r, "TERN-GUEST-NPROC=2\n");
        assert!(!r.pass);
        judge(
            &expect(ExitExpect::Code(0)),
            &mut r,
            "TERN-GUEST-NPROC=1\nKernel panic\n",
        );
        assert_eq!(r.reasons.len(), 2);
        let mut t = RunResult {
            timed_out: true,
            ..Default::default()
        };
        judge(&expect(ExitExpect::AnyCode), &mut t, "");
        assert!(!t.pass);
    }

    #[test]
    fn facts() {
        let f = guest_facts("junk\r\n[  1.0] TERN-GUEST-NPROC=2\r\nTERN-GUEST-UPTIME=10.42 \nTERN-GUEST-INIT-REACHED\n");
        assert_eq!(f.get("NPROC").map(String::as_str), Some("2"));
        assert_eq!(f.get("UPTIME").map(String::as_str), Some("10.42"));
        assert_eq!(f.len(), 2);
    }
}
