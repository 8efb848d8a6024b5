//! The rig agent: runs inside L1 (as `/rig/xtask rig-agent /rig/scenarios.json`), runs each VMM
//! command with a hard timeout, measures it, and reports over L1's console in framed lines:
//!
//! ```text
//! @@RIG-AGENT-START <runs>
//! @@RIG-START <name>
//! @@RIG-LOG <name> <seq> <base64 of up to 57 output bytes>   (after the run, or live when
//!                                                          the run asks to `stream`)
//! @@RIG-RESULT <RunResult as one-line JSON>
//! @@RIG-DONE <runs>
//! ```
//!
//! Measurements, all from the agent's clock in L1:
//! - time to marker: spawn to the first output chunk completing the marker string;
//! - time to exit: spawn to `waitpid` returning (or to the kill at the timeout);
//! - VMM memory at the marker: `/proc/PID/smaps`, summing `Rss` over every mapping except those
//!   whose size is at least the guest memory size (taken as guest RAM); `VmHWM` from
//!   `/proc/PID/status` as well.

use crate::spec::{guest_facts, judge, AgentSpec, MemSample, RunResult, RunSpec, FRAME};
use anyhow::{Context, Result};
use base64::Engine;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Output kept per run; the rest is counted but dropped.
const LOG_CAP: usize = 8 << 20;
/// Raw bytes per `@@RIG-LOG` line (76 base64 characters).
const LOG_CHUNK: usize = 57;

/// How often the agent tells the host it is alive (the host's `L1_SILENCE` is much longer).
const HEARTBEAT: Duration = Duration::from_secs(2);

/// Writes one framed line to stdout in a single `write`.
fn frame(kind: &str, body: &str) {
    let line = format!("{FRAME}{kind} {body}\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// Entry point of `xtask rig-agent SPEC`.
pub fn main(spec_path: &str) -> Result<()> {
    let spec: AgentSpec = serde_json::from_slice(
        &std::fs::read(spec_path).with_context(|| format!("cannot read {spec_path}"))?,
    )
    .with_context(|| format!("cannot parse {spec_path}"))?;
    frame("AGENT-START", &spec.runs.len().to_string());
    // A sign of life every 2 s: the host nudges L1 after 6 s of silence (l0_watch.rs) and takes
    // a long one for a frozen L1.
    std::thread::spawn(|| loop {
        std::thread::sleep(HEARTBEAT);
        let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
        frame("HB", uptime.split_whitespace().next().unwrap_or("?"));
    });
    let kvm = std::path::Path::new("/dev/kvm").exists();
    for run in &spec.runs {
        frame("START", &run.name);
        let (mut result, output) = if kvm {
            execute(run)
        } else {
            (
                RunResult {
                    name: run.name.clone(),
                    error: Some("/dev/kvm missing in L1 (kvm-amd did not load)".to_string()),
                    ..Default::default()
                },
                Vec::new(),
            )
        };
        let text = String::from_utf8_lossy(&output);
        result.guest_facts = guest_facts(&text);
        judge(&run.expect, &mut result, &text);
        result.log_len = output.len();
        result.log_fnv = crate::util::fnv(&output);
        if !run.stream {
            send_log(&run.name, 0, &output);
        }
        frame(
            "RESULT",
            &serde_json::to_string(&result).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
        );
    }
    frame("DONE", &spec.runs.len().to_string());
    Ok(())
}

/// Sends `data` as `@@RIG-LOG` frames numbered from `seq`; returns the next number.
fn send_log(name: &str, mut seq: usize, data: &[u8]) -> usize {
    let engine = base64::engine::general_purpose::STANDARD;
    for chunk in data.chunks(LOG_CHUNK) {
        frame("LOG", &format!("{name} {seq} {}", engine.encode(chunk)));
        seq += 1;
    }
    seq
}

/// What the output reader thread hands back.
struct Captured {
    output: Vec<u8>,
    truncated: bool,
    marker_ms: Option<u64>,
    stage_ms: Option<u64>,
    mem: Option<MemSample>,
}

/// Runs one VMM command; returns the result (unjudged) and its combined output.
fn execute(run: &RunSpec) -> (RunResult, Vec<u8>) {
    let mut result = RunResult {
        name: run.name.clone(),
        ..Default::default()
    };
    let Some(program) = run.argv.first() else {
        result.error = Some("empty argv".to_string());
        return (result, Vec::new());
    };
    if !std::path::Path::new(program).exists() {
        result.error = Some(format!("{program} not found in L1"));
        return (result, Vec::new());
    }
    for (path, contents) in &run.files {
        let path = std::path::Path::new(path);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(path, contents));
        if let Err(e) = written {
            result.error = Some(format!("cannot write {}: {e}", path.display()));
            return (result, Vec::new());
        }
    }
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => {
            result.error = Some(format!("pipe: {e}"));
            return (result, Vec::new());
        }
    };
    let start = Instant::now();
    let spawned = (|| -> std::io::Result<std::process::Child> {
        let mut cmd = Command::new(program);
        cmd.args(&run.argv[1..])
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer)
            .process_group(0);
        cmd.spawn()
        // `cmd` (and with it the parent's copies of the pipe's write end) is dropped here, so
        // the reader sees EOF once the VMM and its children are gone.
    })();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            result.error = Some(format!("cannot start {program}: {e}"));
            return (result, Vec::new());
        }
    };
    let pid = child.id() as i32;

    let marker = run.marker.clone().into_bytes();
    // None: do not sample memory (the process is a script, not the VMM).
    let guest_mem = run.measure_memory.then_some(run.guest_mem_bytes);
    let stream = run.stream.then(|| run.name.clone());
    let sigterm_after = run.sigterm_after.clone().map(String::into_bytes);
    let stage = (!run.stage.is_empty()).then(|| run.stage.clone().into_bytes());
    let reader_thread = std::thread::spawn(move || {
        capture(
            reader,
            start,
            pid,
            &marker,
            guest_mem,
            stream.as_deref(),
            sigterm_after.as_deref(),
            stage.as_deref(),
        )
    });

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send((status, Instant::now()));
    });
    let timeout = Duration::from_secs(run.timeout_secs);
    let waited = rx.recv_timeout(timeout);
    // Kill the whole process group: on timeout the VMM, and in any case anything it left
    // behind holding the output pipe open.
    // SAFETY: kill(2) with a negative pid signals our child's process group; no memory is
    // involved. ESRCH (already gone) is fine.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let waited = match waited {
        Ok(w) => Ok(w),
        Err(_) => {
            result.timed_out = true;
            // Reap it now that it is killed.
            rx.recv_timeout(Duration::from_secs(10))
        }
    };
    match waited {
        Ok((Ok(status), at)) => {
            use std::os::unix::process::ExitStatusExt;
            result.exit_ms = Some(at.duration_since(start).as_millis() as u64);
            result.exit_code = status.code();
            if !result.timed_out {
                result.signal = status.signal();
            }
        }
        Ok((Err(e), _)) => result.error = Some(format!("waitpid: {e}")),
        Err(_) => result.error = Some("process did not die after SIGKILL".to_string()),
    }
    let captured = reader_thread.join().unwrap_or(Captured {
        output: b"(output reader thread failed)".to_vec(),
        truncated: true,
        marker_ms: None,
        stage_ms: None,
        mem: None,
    });
    result.marker_ms = captured.marker_ms;
    result.stage_ms = captured.stage_ms;
    result.mem = captured.mem;
    result.log_truncated = captured.truncated;
    (result, captured.output)
}

/// Reads the VMM's output until EOF, timing the marker and sampling memory when it appears,
/// and timing the stage string.
#[allow(clippy::too_many_arguments)]
fn capture(
    mut pipe: std::io::PipeReader,
    start: Instant,
    pid: i32,
    marker: &[u8],
    guest_mem: Option<u64>,
    stream: Option<&str>,
    mut sigterm_after: Option<&[u8]>,
    mut stage: Option<&[u8]>,
) -> Captured {
    let mut c = Captured {
        output: Vec::new(),
        truncated: false,
        marker_ms: None,
        stage_ms: None,
        mem: None,
    };
    let mut buf = [0u8; 16384];
    // Bytes seen so far (including dropped ones) and a window for finding the marker across
    // read boundaries.
    let mut window: Vec<u8> = Vec::new();
    let mut seq = 0;
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = Instant::now();
        let chunk = &buf[..n];
        if c.marker_ms.is_none() && !marker.is_empty() {
            window.extend_from_slice(chunk);
            if window.windows(marker.len()).any(|w| w == marker) {
                c.marker_ms = Some(now.duration_since(start).as_millis() as u64);
                if let Some(guest_mem) = guest_mem {
                    c.mem = sample_memory(pid, guest_mem).ok();
                }
                window = Vec::new();
            } else {
                let keep = marker.len().saturating_sub(1).min(window.len());
                window.drain(..window.len() - keep);
            }
        }
        if let Some(name) = stream {
            seq = send_log(name, seq, chunk);
        }
        let room = LOG_CAP.saturating_sub(c.output.len());
        if room < n {
            c.truncated = true;
        }
        c.output.extend_from_slice(&chunk[..n.min(room)]);
        if let Some(s) = stage {
            if found_in_new(&c.output, n, s) {
                c.stage_ms = Some(now.duration_since(start).as_millis() as u64);
                stage = None;
            }
        }
        if let Some(trigger) = sigterm_after {
            if found_in_new(&c.output, n, trigger) {
                // SAFETY: kill(2) on our own child's pid; no memory is involved.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
                sigterm_after = None;
            }
        }
    }
    c
}

/// Whether `needle` occurs in the last `n` bytes of `output` (the chunk just appended) or
/// across the boundary before them. Callers look for a first occurrence only and stop there.
fn found_in_new(output: &[u8], n: usize, needle: &[u8]) -> bool {
    let from = output.len().saturating_sub(n + needle.len());
    output[from..].windows(needle.len()).any(|w| w == needle)
}

/// Reads `/proc/PID/smaps` and `/proc/PID/status`.
fn sample_memory(pid: i32, guest_mem: u64) -> Result<MemSample> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut sample = smaps_split(&smaps, guest_mem);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    sample.hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(sample)
}

/// Splits smaps Rss into guest RAM (mappings with Size >= `guest_mem`) and the rest, and the
/// rest by kind of mapping ([`MemSample::parts`]).
pub fn smaps_split(smaps: &str, guest_mem: u64) -> MemSample {
    let mut sample = MemSample::default();
    let mut parts = std::collections::BTreeMap::<String, u64>::new();
    // The mapping being read: its kind, Size and Rss.
    let mut mapping: Option<(String, u64, u64)> = None;
    let mut flush = |m: Option<(String, u64, u64)>, sample: &mut MemSample| {
        let Some((kind, size, rss)) = m else { return };
        if guest_mem > 0 && size * 1024 >= guest_mem {
            sample.guest_rss_kib += rss;
            sample.guest_mappings += 1;
        } else {
            sample.vmm_rss_kib += rss;
            *parts.entry(kind).or_default() += rss;
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first.ends_with(':') {
            let value: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if let Some((_, size, rss)) = mapping.as_mut() {
                match first {
                    "Size:" => *size = value,
                    "Rss:" => *rss = value,
                    _ => {}
                }
            }
        } else if first.contains('-') && first.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            // A mapping header: "start-end perms offset dev inode [path]".
            flush(mapping.take(), &mut sample);
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("anon");
            let name = path.rsplit('/').next().unwrap_or(path);
            mapping = Some((format!("{name} {perms}"), 0, 0));
        }
    }
    flush(mapping, &mut sample);
    let mut parts: Vec<(String, u64)> = parts.into_iter().filter(|p| p.1 > 0).collect();
    parts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    sample.parts = parts;
    sample
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_in_new_sees_the_new_chunk_and_across_its_boundary() {
        assert!(found_in_new(b"abc rig-grub: loading", 8, b"loading"));
        assert!(found_in_new(b"rig-grub: loading", 3, b"loading"));
        assert!(!found_in_new(b"loading then more text", 10, b"loading"));
        assert!(!found_in_new(b"xy", 2, b"loading"));
    }

    #[test]
    fn smaps_guest_ram_is_excluded() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 00:10 1234 /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
Pss:                 800 kB
7f0000000000-7f0010200000 rw-p 00000000 00:00 0
Size:             264192 kB
Rss:              100000 kB
7f0020000000-7f0020021000 rw-p 00000000 00:00 0 [heap]
Size:                132 kB
Rss:                  64 kB
VmFlags: rd wr mr mw me ac
";
        let s = smaps_split(smaps, 256 << 20);
        assert_eq!(s.vmm_rss_kib, 864);
        assert_eq!(s.guest_rss_kib, 100_000);
        assert_eq!(s.guest_mappings, 1);
        assert_eq!(
            s.parts,
            [
                ("qemu-system-x86_64 r-xp".to_string(), 800),
                ("[heap] rw-p".to_string(), 64)
            ]
        );
    }
}
