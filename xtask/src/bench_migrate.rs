//! `cargo xtask bench-migrate`: live migration, tern vs QEMU on the same guest, side by side on
//! the host's /dev/kvm, interleaved, medians.
//!
//! The guest is the probe's `count` scenario (a ring-3 counter printing
//! `probe: count tick=K value=V` every [`TICK_MS`] ms) with a quarter of its RAM filled with a
//! pattern (`probe.count_mem_mb`) and, for a dirty rate R > 0, an eighth of its RAM rewritten at
//! R MiB/s of distinct pages (`probe.count_dirty_mb`, `probe.count_dirty_rate_mb`). For each
//! guest size, dirty rate and transport (`unix:` socket, or `tcp:` on 127.0.0.1) and each run,
//! each VMM in turn (tern and QEMU alternating which goes first):
//!
//! - starts a destination waiting for the VM (tern: `tern run --incoming URL --serial
//!   file:DST`; QEMU: the source's command line plus `-incoming URL`, its serial port in a file
//!   of its own),
//! - boots the source with its serial port in a file and waits for [`WARM_TICKS`] ticks,
//! - asks for the migration with the same downtime limit (tern: `PUT /v1/vm/migrate/send`;
//!   QEMU: QMP `migrate-set-parameters` `downtime-limit` and `max-bandwidth` 100 GiB/s, since
//!   tern's stream has no limit by default and QEMU's would, then `migrate`), and polls the
//!   source every [`POLL`] until it reports the end (`GET /v1/vm/migrate`, `query-migrate`),
//! - waits for the guest to finish counting on the destination.
//!
//! A thread tails both serial files (the source's, then the destination's) every millisecond
//! and stamps each complete line when it first sees it, the same way for both VMMs. The
//! downtime the guest shows is the largest gap between consecutive tick lines from the
//! migration request on. Every run is checked and fails loudly otherwise: ticks 1, 2, 3… with no
//! gap or repeat across the two files (a line the switch-over cut in two is joined), the value
//! only growing, the destination ticking, and the guest's final report there with `mem=ok`
//! (and `dirty=ok`) and `status=0`.
//!
//! With `--baseline PATH` and/or `--baseline-args "ARGS"` (bench_terns.rs), a baseline tern
//! migrates in the same runs (its extra arguments go to both of its `tern run`s), reported in
//! `baseline` and `tern/baseline` columns. Files live in one directory under /tmp, removed at the
//! end (stale ones from killed runs at the start).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use api::migrate::{MigrationState, MigrationStatus, MigrationUrl, SendOptions};
use serde_json::{json, Value};

use crate::bench_probe::median;
use crate::bench_snapshot::{
    cell, http, ms, path_str, qemu_args, remove_stale_scratch, tail, tern_start, Proc, Qmp,
    Scratch, QEMU_MACHINE, QEMU_MAX_BANDWIDTH,
};
use crate::bench_terns::{describe, has_baseline, run_terns, Tern};

/// The guest's tick period, and so the resolution of the downtime the guest shows. (At 5 ms
/// the probe spent most of its time printing on this host's emulated ring 0 exits and could no
/// longer keep a 100 MiB/s dirty rate.)
const TICK_MS: u64 = 10;
/// Ticks the source counts (and dirties memory) before the migration starts.
const WARM_TICKS: usize = 30;
/// How often the source's migration status is polled, for both VMMs.
const POLL: Duration = Duration::from_millis(5);
/// The downtime limit both VMMs get (tern's default).
const DOWNTIME_MS: u64 = api::migrate::DEFAULT_DOWNTIME_MS;
/// Time allowed for a boot (including the memory fill) to reach its warm-up ticks.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Time allowed for a migration to finish.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
const SCRATCH_PARENT: &str = "/tmp";
const SCRATCH_PREFIX: &str = "tern-bench-migrate-";
const MIB: f64 = (1u64 << 20) as f64;

/// A migration transport.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Transport {
    /// A Unix stream socket.
    Unix,
    /// TCP on 127.0.0.1.
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        }
    }
}

/// What to measure.
pub struct Options {
    /// Guest sizes in MiB.
    pub sizes_mib: Vec<u64>,
    /// Guest dirty rates in MiB/s (0: the guest rewrites nothing).
    pub dirty: Vec<u64>,
    pub transports: Vec<Transport>,
    /// Interleaved runs per combination.
    pub runs: usize,
}

/// One combination measured.
#[derive(Clone, Copy)]
struct Case {
    size_mib: u64,
    dirty: u64,
    transport: Transport,
}

impl Case {
    fn label(&self) -> String {
        format!(
            "{} MiB guest, dirty {} MiB/s, {}",
            self.size_mib,
            self.dirty,
            self.transport.name()
        )
    }

    /// How long the guest counts (ms): the boot's warm-up, the migration and a margin. Too
    /// short fails loudly (the guest ends on the source).
    fn count_ms(&self) -> u64 {
        5000 + 4 * self.size_mib
    }

    fn pattern_mib(&self) -> u64 {
        self.size_mib / 4
    }

    fn dirty_region_mib(&self) -> u64 {
        self.size_mib / 8
    }

    fn cmdline(&self) -> String {
        let mut s = format!(
            "probe.run=count probe.count_ms={} probe.count_tick_ms={TICK_MS} probe.count_mem_mb={}",
            self.count_ms(),
            self.pattern_mib()
        );
        if self.dirty > 0 {
            s += &format!(
                " probe.count_dirty_mb={} probe.count_dirty_rate_mb={}",
                self.dirty_region_mib(),
                self.dirty
            );
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Serial files, tailed with timestamps.

/// The complete lines of one file so far, each with the ms (since the tailer started) at which
/// it was first seen whole, and the bytes of the line still being written.
#[derive(Clone, Default)]
struct Stream {
    lines: Vec<(f64, String)>,
    partial: Vec<u8>,
}

impl Stream {
    fn add(&mut self, at: f64, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..i]);
            self.lines
                .push((at, text.trim_end_matches('\r').to_string()));
        }
    }
}

/// A thread reading what is appended to some files every millisecond.
struct Tailer {
    t0: Instant,
    streams: Arc<Mutex<Vec<Stream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tailer {
    /// Tails `paths` (opened once they exist).
    fn start(paths: Vec<PathBuf>) -> Tailer {
        let t0 = Instant::now();
        let streams = Arc::new(Mutex::new(vec![Stream::default(); paths.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (streams.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut files: Vec<Option<File>> = paths.iter().map(|_| None).collect();
            let mut buf = Vec::new();
            loop {
                // One more pass after the stop, for what was written before it.
                let last = st.load(Ordering::SeqCst);
                for (i, p) in paths.iter().enumerate() {
                    if files[i].is_none() {
                        files[i] = File::open(p).ok();
                    }
                    let Some(f) = files[i].as_mut() else {
                        continue;
                    };
                    buf.clear();
                    if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
                        let at = ms(t0.elapsed());
                        locked(&s)[i].add(at, &buf);
                    }
                }
                if last {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Tailer {
            t0,
            streams,
            stop,
            thread: Some(thread),
        }
    }

    /// `at` in the tailer's time (ms).
    fn stamp(&self, at: Instant) -> f64 {
        ms(at.saturating_duration_since(self.t0))
    }

    /// Complete lines of file `i` so far.
    fn count_ticks(&self, i: usize) -> usize {
        locked(&self.streams)[i]
            .lines
            .iter()
            .filter(|(_, l)| parse_tick(l).is_some())
            .count()
    }

    /// The first complete line of file `i` starting with `prefix`.
    fn find(&self, i: usize, prefix: &str) -> Option<String> {
        locked(&self.streams)[i]
            .lines
            .iter()
            .find(|(_, l)| l.starts_with(prefix))
            .map(|(_, l)| l.clone())
    }

    /// Stops the thread after a last read; every stream.
    fn finish(mut self) -> Vec<Stream> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        locked(&self.streams).clone()
    }
}

impl Drop for Tailer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `(K, V)` of a `probe: count tick=K value=V` line.
fn parse_tick(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("probe: count tick=")?;
    let (k, v) = rest.split_once(" value=")?;
    Some((k.parse().ok()?, v.trim().parse().ok()?))
}

/// The lines of a run: the source's, then the destination's; a line the switch-over cut in
/// two (its start on the source, its end on the destination) is joined and stamped when its
/// end was seen. Also the number of those lines that came from the destination.
fn joined(src: &Stream, dst: &Stream) -> (Vec<(f64, String)>, usize) {
    let mut out = src.lines.clone();
    let mut rest = dst.lines.as_slice();
    if !src.partial.is_empty() {
        if let Some(((at, first), more)) = dst.lines.split_first() {
            out.push((
                *at,
                format!("{}{first}", String::from_utf8_lossy(&src.partial)),
            ));
            rest = more;
        }
    }
    out.extend_from_slice(rest);
    (out, dst.lines.len())
}

/// The tick lines `(stamp, K, V)` of a run's `lines`, checked: ticks 1, 2, 3… with no gap and
/// no repeat, the value only growing. `dst_lines` of the lines (the last ones) came from the
/// destination, which must have ticked.
fn checked_ticks(lines: &[(f64, String)], dst_lines: usize) -> Result<Vec<(f64, u64, u64)>> {
    let mut ticks = Vec::new();
    let mut dst_ticks = 0;
    for (n, (at, l)) in lines.iter().enumerate() {
        if !l.starts_with("probe: count tick=") {
            continue;
        }
        let Some((k, v)) = parse_tick(l) else {
            bail!("a broken tick line: {l:?}");
        };
        let want = ticks.last().map_or(1, |&(_, k, _)| k + 1);
        if k != want {
            bail!("the counter did not continue: tick {k} where {want} was due");
        }
        if let Some(&(_, _, before)) = ticks.last() {
            if v <= before {
                bail!("the value went back at tick {k}: {v} after {before}");
            }
        }
        if n >= lines.len() - dst_lines {
            dst_ticks += 1;
        }
        ticks.push((*at, k, v));
    }
    if dst_ticks == 0 {
        bail!("the guest never ticked on the destination");
    }
    Ok(ticks)
}

/// The largest gap (ms) between consecutive ticks whose later one was seen after `from`, the
/// tick that ended it, and the median of those gaps (a running guest's tick period).
fn gaps(ticks: &[(f64, u64, u64)], from: f64) -> (f64, u64, f64) {
    let gaps: Vec<(f64, u64)> = ticks
        .windows(2)
        .filter(|w| w[1].0 > from)
        .map(|w| (w[1].0 - w[0].0, w[1].1))
        .collect();
    let (max, after) = gaps
        .iter()
        .fold((0.0, 0), |a, &b| if b.0 > a.0 { b } else { a });
    (max, after, median(gaps.iter().map(|g| g.0).collect()))
}

/// The `key=value` fields of a report line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
}

/// Checks the guest's final report on the destination; the dirty rate it achieved (MiB/s; NaN
/// without dirtying).
fn check_report(c: &Case, report: &str, done: &str) -> Result<f64> {
    if field(done, "status") != Some("0") || !report.starts_with("probe: count ok") {
        bail!("the guest failed: {report} / {done}");
    }
    if field(report, "mem") != Some("ok") {
        bail!("the memory pattern did not survive: {report}");
    }
    if c.dirty == 0 {
        return Ok(f64::NAN);
    }
    if field(report, "dirty") != Some("ok") {
        bail!("the rewritten memory did not survive: {report}");
    }
    let writes: f64 = field(report, "dirty_writes")
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("no dirty_writes in {report}"))?;
    Ok(writes * 4096.0 / MIB / (c.count_ms() as f64 / 1e3))
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// Waits for a process to exit by itself.
fn wait_exit(p: &mut Proc, what: &str, timeout: Duration) -> Result<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = p.child.try_wait()? {
            return Ok(st);
        }
        if t0.elapsed() > timeout {
            bail!("{what} did not exit within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `tail` has a line of file `i` starting with `prefix` (checked once more after
/// the process `p` exited, since the tailer reads every millisecond).
fn wait_line(
    p: &mut Proc,
    tail: &Tailer,
    i: usize,
    prefix: &str,
    timeout: Duration,
) -> Result<String> {
    let t0 = Instant::now();
    loop {
        if let Some(l) = tail.find(i, prefix) {
            return Ok(l);
        }
        if let Err(e) = p.check_alive() {
            std::thread::sleep(Duration::from_millis(50));
            return tail
                .find(i, prefix)
                .ok_or(e)
                .with_context(|| format!("waiting for a line {prefix:?}"));
        }
        if t0.elapsed() > timeout {
            bail!(
                "{}: no line {prefix:?} within {} s",
                p.name,
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// An unused TCP port on 127.0.0.1.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Where a run's migration goes: a socket in `dir`, or a free port.
fn url(t: Transport, dir: &Path) -> Result<String> {
    Ok(match t {
        Transport::Unix => format!("unix:{}", path_str(&dir.join("m.sock"))?),
        Transport::Tcp => format!("tcp:127.0.0.1:{}", free_port()?),
    })
}

/// Waits until the destination `p` listens on `url` (without connecting, which would start a
/// migration).
fn wait_listening(p: &mut Proc, url: &str) -> Result<()> {
    if let Some(path) = url.strip_prefix("unix:") {
        let path = Path::new(path);
        return p.wait_for("the migration socket", Duration::from_secs(30), || {
            path.exists().then_some(())
        });
    }
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {url}"))?;
    // A listening socket in /proc/net/tcp: local 0100007F:PORT, remote 0, state 0A.
    let want = format!(":{port:04X} 00000000:0000 0A");
    p.wait_for("the migration listener", Duration::from_secs(30), || {
        std::fs::read_to_string("/proc/net/tcp")
            .is_ok_and(|t| t.contains(&want))
            .then_some(())
    })
}

/// Waits for the source's warm-up ticks.
fn wait_warm(p: &mut Proc, tailer: &Tailer, log: &Path) -> Result<()> {
    p.wait_for("the guest's warm-up ticks", BOOT_TIMEOUT, || {
        (tailer.count_ticks(0) >= WARM_TICKS).then_some(())
    })
    .with_context(|| format!("serial: {}", tail(log)))
}

// ---------------------------------------------------------------------------------------------
// One migration.

/// One VMM's numbers in one run.
#[derive(Clone, Copy)]
struct Sample {
    /// Host time from the migration request until the source reported the end, ms.
    total_ms: f64,
    /// The VMM's own total time, ms.
    vmm_total_ms: f64,
    /// MiB sent (tern: bytes_sent; QEMU: ram.transferred).
    sent_mib: f64,
    /// tern: pre-copy rounds; QEMU: dirty-log syncs (ram.dirty-sync-count).
    rounds: f64,
    /// The largest gap between tick lines, ms.
    gap_ms: f64,
    /// The median gap between tick lines, ms.
    tick_ms: f64,
    /// The VMM's own downtime, ms.
    vmm_downtime_ms: f64,
    /// The dirty rate the guest achieved over its run, MiB/s.
    dirty_rate: f64,
}

/// What the guest showed in one run.
struct Guest {
    gap_ms: f64,
    tick_ms: f64,
    dirty_rate: f64,
}

/// What every run has: its files and the tailer on them.
struct RunFiles {
    src_log: PathBuf,
    dst_log: PathBuf,
    tail: Tailer,
}

impl RunFiles {
    fn new(dir: &Path) -> Result<RunFiles> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let (src_log, dst_log) = (dir.join("src.log"), dir.join("dst.log"));
        let tail = Tailer::start(vec![src_log.clone(), dst_log.clone()]);
        Ok(RunFiles {
            src_log,
            dst_log,
            tail,
        })
    }

    /// After the migration: waits for the guest's end on the destination `dst`, checks the
    /// run; the tick gaps from `t0` on and the achieved dirty rate.
    fn finish(self, c: &Case, dst: &mut Proc, t0: Instant) -> Result<Guest> {
        let timeout = Duration::from_millis(c.count_ms()) + Duration::from_secs(60);
        let done = wait_line(dst, &self.tail, 1, "probe: done", timeout)
            .with_context(|| format!("destination serial: {}", tail(&self.dst_log)))?;
        let report = self
            .tail
            .find(1, "probe: count ok")
            .or_else(|| self.tail.find(1, "probe: count FAIL"))
            .unwrap_or_default();
        let from = self.tail.stamp(t0);
        let streams = self.tail.finish();
        let rate = check_report(c, &report, &done)?;
        let (lines, dst_lines) = joined(&streams[0], &streams[1]);
        let ticks = checked_ticks(&lines, dst_lines)?;
        let (gap_ms, _, tick_ms) = gaps(&ticks, from);
        Ok(Guest {
            gap_ms,
            tick_ms,
            dirty_rate: rate,
        })
    }

    /// Why a source stopped before its migration ended.
    fn source_died(&self, e: anyhow::Error) -> anyhow::Error {
        if tail(&self.src_log).contains("probe: done") {
            anyhow::anyhow!(
                "the guest finished counting on the source before the migration ended: \
                 Case::count_ms is too short for this machine"
            )
        } else {
            e
        }
    }
}

struct Ctx<'a> {
    qemu: &'a Path,
    probe: String,
}

impl Ctx<'_> {
    fn tern_once(&self, tern: &Tern, c: &Case, dir: &Path) -> Result<Sample> {
        let f = RunFiles::new(dir)?;
        let url = url(c.transport, dir)?;
        let dst_args: Vec<String> = vec![
            "run".into(),
            "--incoming".into(),
            url.clone(),
            "--serial".into(),
            format!("file:{}", path_str(&f.dst_log)?),
            // The source names the probe; the destination accepts its directory.
            "--accept-dir".into(),
            path_str(Path::new(&self.probe).parent().unwrap_or(Path::new("/")))?.into(),
        ];
        let mut dst = Proc::spawn(
            &tern.program,
            &tern.args(&dst_args),
            "tern destination",
            &dir.join("dst.err"),
        )?;
        wait_listening(&mut dst, &url)?;
        let sock = dir.join("api.sock");
        let args: Vec<String> = vec![
            "--kernel".into(),
            self.probe.clone(),
            "--memory".into(),
            format!("{}M", c.size_mib),
            "--cpus".into(),
            "1".into(),
            "--serial".into(),
            format!("file:{}", path_str(&f.src_log)?),
            "--cmdline".into(),
            c.cmdline(),
        ];
        let mut src = tern_start(tern, &args, &sock, &dir.join("src.err"))?;
        wait_warm(&mut src, &f.tail, &f.src_log)?;
        let mut opts = SendOptions::to(url.parse::<MigrationUrl>().map_err(anyhow::Error::msg)?);
        opts.downtime_ms = DOWNTIME_MS;
        let body = serde_json::to_value(&opts)?;
        let t0 = Instant::now();
        let (code, text) = http(&sock, "PUT", "/v1/vm/migrate/send", Some(&body))?;
        if !(200..300).contains(&code) {
            bail!("tern: PUT /v1/vm/migrate/send answered {code}: {text}");
        }
        let st = loop {
            let got = http(&sock, "GET", "/v1/vm/migrate", None).and_then(|(code, text)| {
                if code != 200 {
                    bail!("GET /v1/vm/migrate answered {code}: {text}");
                }
                Ok(serde_json::from_str::<MigrationStatus>(&text)?)
            });
            let s = match got {
                Ok(s) => s,
                Err(e) => {
                    let e = src.check_alive().err().unwrap_or(e);
                    return Err(f.source_died(e));
                }
            };
            if s.state.finished() {
                break s;
            }
            if t0.elapsed() > MIGRATE_TIMEOUT {
                let _ = http(&sock, "DELETE", "/v1/vm/migrate", None);
                bail!(
                    "tern: the migration did not end within {} s (last status: {} round {}, \
                     {} MiB dirty)",
                    MIGRATE_TIMEOUT.as_secs(),
                    s.state,
                    s.iteration,
                    s.bytes_remaining >> 20
                );
            }
            std::thread::sleep(POLL);
        };
        let total = t0.elapsed();
        if st.state != MigrationState::Completed {
            bail!(
                "tern: migration {}: {}",
                st.state,
                st.error.as_deref().unwrap_or("no reason given")
            );
        }
        // The source exits by itself once the destination runs the VM.
        let code = wait_exit(&mut src, "the tern source", Duration::from_secs(10))?;
        if !code.success() {
            bail!("the tern source exited with {code} after the migration");
        }
        let g = f.finish(c, &mut dst, t0)?;
        Ok(Sample {
            total_ms: ms(total),
            vmm_total_ms: st.total_ms as f64,
            sent_mib: st.bytes_sent as f64 / MIB,
            rounds: f64::from(st.iteration),
            gap_ms: g.gap_ms,
            tick_ms: g.tick_ms,
            vmm_downtime_ms: st.downtime_ms.unwrap_or(f64::NAN),
            dirty_rate: g.dirty_rate,
        })
    }

    fn qemu_once(&self, c: &Case, dir: &Path) -> Result<Sample> {
        let f = RunFiles::new(dir)?;
        let url = url(c.transport, dir)?;
        let cmdline = c.cmdline();
        let mut dst_args = qemu_args(
            &self.probe,
            c.size_mib,
            &cmdline,
            &f.dst_log,
            &dir.join("dst.qmp"),
        )?;
        dst_args.extend(["-incoming".into(), url.clone()]);
        let mut dst = Proc::spawn(
            self.qemu,
            &dst_args,
            "QEMU destination",
            &dir.join("dst.err"),
        )?;
        wait_listening(&mut dst, &url)?;
        let qsock = dir.join("src.qmp");
        let src_args = qemu_args(&self.probe, c.size_mib, &cmdline, &f.src_log, &qsock)?;
        let mut src = Proc::spawn(self.qemu, &src_args, "QEMU source", &dir.join("src.err"))?;
        let mut q = Qmp::connect(&mut src, &qsock)?;
        q.cmd(
            "migrate-set-parameters",
            Some(json!({
                "downtime-limit": DOWNTIME_MS,
                "max-bandwidth": QEMU_MAX_BANDWIDTH,
            })),
        )?;
        wait_warm(&mut src, &f.tail, &f.src_log)?;
        let t0 = Instant::now();
        q.cmd("migrate", Some(json!({ "uri": url })))?;
        let m: Value = loop {
            let m = match q.cmd("query-migrate", None) {
                Ok(m) => m,
                Err(e) => {
                    let e = src.check_alive().err().unwrap_or(e);
                    return Err(f.source_died(e));
                }
            };
            match m["status"].as_str().unwrap_or("") {
                "completed" => break m,
                "failed" | "cancelled" => bail!(
                    "QEMU: migration {}: {}",
                    m["status"],
                    m["error-desc"].as_str().unwrap_or("no error given")
                ),
                _ => {}
            }
            if t0.elapsed() > MIGRATE_TIMEOUT {
                let _ = q.cmd("migrate_cancel", None);
                bail!(
                    "QEMU: the migration did not end within {} s",
                    MIGRATE_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(POLL);
        };
        let total = t0.elapsed();
        // The source stays paused (postmigrate) until told to quit.
        let _ = q.cmd("quit", None);
        let _ = wait_exit(&mut src, "the QEMU source", Duration::from_secs(10));
        let g = f.finish(c, &mut dst, t0)?;
        let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        Ok(Sample {
            total_ms: ms(total),
            vmm_total_ms: num(&m["total-time"]),
            sent_mib: num(&m["ram"]["transferred"]) / MIB,
            rounds: num(&m["ram"]["dirty-sync-count"]),
            gap_ms: g.gap_ms,
            tick_ms: g.tick_ms,
            vmm_downtime_ms: num(&m["downtime"]),
            dirty_rate: g.dirty_rate,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Report.

/// One run of one case: each tern variant's sample (in `terns` order), then QEMU's.
struct RunResult {
    terns: Vec<Sample>,
    qemu: Sample,
}

struct Row {
    name: &'static str,
    get: fn(&Sample) -> f64,
    precision: usize,
}

const ROWS: [Row; 8] = [
    Row {
        name: "total: request -> source done (host), ms",
        get: |s| s.total_ms,
        precision: 0,
    },
    Row {
        name: "total, as the VMM reports it, ms",
        get: |s| s.vmm_total_ms,
        precision: 0,
    },
    Row {
        name: "sent, MiB",
        get: |s| s.sent_mib,
        precision: 1,
    },
    Row {
        name: "rounds (tern) / dirty syncs (QEMU)",
        get: |s| s.rounds,
        precision: 0,
    },
    Row {
        name: "downtime seen by the guest (tick gap), ms",
        get: |s| s.gap_ms,
        precision: 1,
    },
    Row {
        name: "tick gap while running (median), ms",
        get: |s| s.tick_ms,
        precision: 1,
    },
    Row {
        name: "downtime as the VMM reports it, ms",
        get: |s| s.vmm_downtime_ms,
        precision: 1,
    },
    Row {
        name: "guest dirty rate achieved, MiB/s",
        get: |s| s.dirty_rate,
        precision: 1,
    },
];

fn print_header(o: &Options) {
    println!(
        "live migration: tern vs QEMU 7.2 (-M {QEMU_MACHINE}), probe guest `count` on the host \
         /dev/kvm, 1 vCPU, source and destination on this host; {} interleaved runs per \
         combination (tern and QEMU alternating which goes first), medians",
        o.runs
    );
    println!(
        "guest: ticks every {TICK_MS} ms; a quarter of its RAM holds a pattern; with a dirty rate \
         R, an eighth of its RAM is rewritten at R MiB/s (distinct pages, paced by the guest's \
         clock); migration starts after {WARM_TICKS} ticks; downtime limit {DOWNTIME_MS} ms for \
         both, QEMU max-bandwidth raised to 100 GiB/s (tern has no limit); status polled every \
         {} ms",
        POLL.as_millis()
    );
    for l in [
        "  total             host clock, from the request (PUT /v1/vm/migrate/send, QMP migrate) until",
        "                    the source reports the end (GET /v1/vm/migrate, query-migrate)",
        "  sent              tern: bytes_sent (pages, state, framing); QEMU: ram.transferred (RAM stream",
        "                    only; its device state is a few KiB more)",
        "  guest downtime    largest gap between consecutive `probe: count tick=` lines from the request",
        "                    on, each stamped by the host when a thread tailing the source's then the",
        "                    destination's serial file (every 1 ms) first saw it complete; a running",
        "                    guest's gap is one tick period (the median gap row), so this is about",
        "                    downtime + one tick",
        "  dirty rate        page writes the guest made over its whole run / its counting time",
        "  every run checked: ticks consecutive across the switch-over, value growing, mem=ok and",
        "  dirty=ok in the guest's final report on the destination",
    ] {
        println!("{l}");
    }
}

fn print_case(c: &Case, results: &[RunResult], baseline: bool) {
    println!("\n== {} ==", c.label());
    print!(
        "{:<44} {:>10} {:>10} {:>10}",
        "metric", "tern", "qemu", "tern/qemu"
    );
    if baseline {
        print!(" {:>10} {:>14}", "baseline", "tern/baseline");
    }
    println!();
    for row in &ROWS {
        if c.dirty == 0 && row.name.starts_with("guest dirty rate") {
            continue;
        }
        let tm = |i: usize| median(results.iter().map(|r| (row.get)(&r.terns[i])).collect());
        let t = tm(0);
        let q = median(results.iter().map(|r| (row.get)(&r.qemu)).collect());
        print!(
            "{:<44} {:>10} {:>10} {:>10}",
            row.name,
            cell(t, row.precision),
            cell(q, row.precision),
            cell(t / q, 3)
        );
        if baseline {
            let b = tm(1);
            print!(" {:>10} {:>14}", cell(b, row.precision), cell(t / b, 3));
        }
        println!();
    }
}

/// One line per case: the medians that matter most, tern / QEMU.
fn print_summary(cases: &[Case], results: &[Vec<RunResult>]) {
    println!("\n== summary: medians, tern / qemu (ratio) ==");
    println!(
        "{:<38} {:>20} {:>18} {:>20} {:>18}",
        "case", "total ms", "sent MiB", "guest downtime ms", "VMM downtime ms"
    );
    for (c, rs) in cases.iter().zip(results) {
        let med = |f: fn(&Sample) -> f64, q: bool| {
            median(
                rs.iter()
                    .map(|r| f(if q { &r.qemu } else { &r.terns[0] }))
                    .collect(),
            )
        };
        let col = |f: fn(&Sample) -> f64, p: usize| {
            let (t, q) = (med(f, false), med(f, true));
            format!("{} / {} ({})", cell(t, p), cell(q, p), cell(t / q, 2))
        };
        println!(
            "{:<38} {:>20} {:>18} {:>20} {:>18}",
            c.label(),
            col(|s| s.total_ms, 0),
            col(|s| s.sent_mib, 0),
            col(|s| s.gap_ms, 0),
            col(|s| s.vmm_downtime_ms, 0)
        );
    }
}

/// Runs the benchmark; with a baseline among `terns`, it migrates in the same runs as `tern`
/// and gets its own columns.
pub fn run(terns: &[Tern], probe: &Path, qemu: &Path, o: &Options) -> Result<()> {
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if o.sizes_mib.is_empty() || o.dirty.is_empty() || o.transports.is_empty() {
        bail!("no sizes, dirty rates or transports given");
    }
    if let Some(t) = terns.iter().find(|t| !t.program.is_file()) {
        bail!("tern binary {} does not exist", t.program.display());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("cannot open /dev/kvm (this benchmark needs KVM)")?;
    remove_stale_scratch(SCRATCH_PARENT, SCRATCH_PREFIX);
    let scratch =
        Scratch(Path::new(SCRATCH_PARENT).join(format!("{SCRATCH_PREFIX}{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0)
        .with_context(|| format!("cannot create {}", scratch.0.display()))?;
    let ctx = Ctx {
        qemu,
        probe: path_str(probe)?.to_string(),
    };
    let mut cases = Vec::new();
    for &size_mib in &o.sizes_mib {
        for &dirty in &o.dirty {
            for &transport in &o.transports {
                cases.push(Case {
                    size_mib,
                    dirty,
                    transport,
                });
            }
        }
    }
    print_header(o);
    match describe(terns) {
        Some(d) => println!("{d}"),
        None => println!("tern {}", terns[0].program.display()),
    }
    println!("qemu {}", qemu.display());
    let mut results: Vec<Vec<RunResult>> = cases.iter().map(|_| Vec::new()).collect();
    for run in 0..o.runs {
        for (i, c) in cases.iter().enumerate() {
            let dir = scratch.0.join(format!(
                "run{run}-{}M-d{}-{}",
                c.size_mib,
                c.dirty,
                c.transport.name()
            ));
            let what = format!("{}, run {}", c.label(), run + 1);
            let tern_side = || run_terns(terns, run, |t| ctx.tern_once(t, c, &dir.join(t.name)));
            let qemu_side = || ctx.qemu_once(c, &dir.join("qemu")).context("qemu");
            // tern and QEMU alternate which goes first.
            let (t, q) = if run % 2 == 0 {
                let t = tern_side();
                (t, qemu_side())
            } else {
                let q = qemu_side();
                (tern_side(), q)
            };
            let r = match t.and_then(|terns| Ok(RunResult { terns, qemu: q? })) {
                Ok(r) => r,
                Err(e) => {
                    // Keep the logs to look at (the next run removes them).
                    let kept = scratch.0.clone();
                    std::mem::forget(scratch);
                    return Err(e.context(format!("{what} (logs kept in {})", kept.display())));
                }
            };
            eprintln!(
                "[bench-migrate] {what}: tern {:.0} ms, {:.1} MiB, gap {:.1} ms (own {:.1}); \
                 qemu {:.0} ms, {:.1} MiB, gap {:.1} ms (own {:.1})",
                r.terns[0].total_ms,
                r.terns[0].sent_mib,
                r.terns[0].gap_ms,
                r.terns[0].vmm_downtime_ms,
                r.qemu.total_ms,
                r.qemu.sent_mib,
                r.qemu.gap_ms,
                r.qemu.vmm_downtime_ms
            );
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
            results[i].push(r);
        }
    }
    for (c, rs) in cases.iter().zip(&results) {
        print_case(c, rs, has_baseline(terns));
    }
    print_summary(&cases, &results);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(lines: &[(f64, &str)], partial: &str) -> Stream {
        Stream {
            lines: lines.iter().map(|(t, l)| (*t, l.to_string())).collect(),
            partial: partial.as_bytes().to_vec(),
        }
    }

    #[test]
    fn lines_are_stamped_when_complete() {
        let mut s = Stream::default();
        s.add(1.0, b"probe: count tick=1 value=5\nprobe: cou");
        s.add(2.0, b"nt tick=2 value=9\r\n");
        assert_eq!(
            s.lines,
            vec![
                (1.0, "probe: count tick=1 value=5".to_string()),
                (2.0, "probe: count tick=2 value=9".to_string())
            ]
        );
        assert!(s.partial.is_empty());
    }

    #[test]
    fn a_line_cut_by_the_switch_over_is_joined_and_the_gap_found() {
        let src = stream(
            &[
                (0.0, "probe: hello"),
                (10.0, "probe: count tick=1 value=10"),
                (20.0, "probe: count tick=2 value=20"),
            ],
            "probe: count ti",
        );
        let dst = stream(
            &[
                (95.0, "ck=3 value=30"),
                (105.0, "probe: count tick=4 value=40"),
                (115.0, "probe: count ok ticks=4 mem=ok"),
            ],
            "",
        );
        let (lines, n) = joined(&src, &dst);
        assert_eq!(n, 3);
        let t = checked_ticks(&lines, n).unwrap();
        assert_eq!(t.iter().map(|x| x.1).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(gaps(&t, 15.0), (75.0, 3, 10.0));
        // Gaps that ended before the request do not count.
        assert_eq!(gaps(&t, 100.0), (10.0, 4, 10.0));
    }

    #[test]
    fn a_broken_counter_fails() {
        let lines = |v: &[&str]| v.iter().map(|l| (0.0, l.to_string())).collect::<Vec<_>>();
        let skip = lines(&["probe: count tick=1 value=1", "probe: count tick=3 value=3"]);
        assert!(checked_ticks(&skip, 1).is_err());
        let back = lines(&["probe: count tick=1 value=5", "probe: count tick=2 value=3"]);
        assert!(checked_ticks(&back, 1).is_err());
        let broken = lines(&["probe: count tick=1 value=5", "probe: count tick=2 val"]);
        assert!(checked_ticks(&broken, 1).is_err());
        let ok = lines(&["probe: count tick=1 value=1", "probe: count tick=2 value=2"]);
        assert!(checked_ticks(&ok, 1).is_ok());
        // The destination never ticked.
        assert!(checked_ticks(&ok, 0).is_err());
    }

    #[test]
    fn final_report() {
        let c = Case {
            size_mib: 256,
            dirty: 10,
            transport: Transport::Unix,
        };
        let done = "probe: done status=0";
        let ok = "probe: count ok ticks=9 value=1 mem_mb=64 mem=ok dirty_mb=32 \
                  dirty_writes=14080 dirty=ok";
        let rate = check_report(&c, ok, done).unwrap();
        assert!((rate - 55.0 / c.count_ms() as f64 * 1e3).abs() < 1e-9);
        assert!(check_report(&c, ok, "probe: done status=1").is_err());
        assert!(check_report(&c, &ok.replace("dirty=ok", ""), done).is_err());
        assert!(check_report(&c, "probe: count FAIL memory pattern broken", done).is_err());
        let c0 = Case { dirty: 0, ..c };
        assert!(check_report(&c0, "probe: count ok ticks=9 mem=ok", done)
            .unwrap()
            .is_nan());
        assert!(c0.cmdline().contains("count_mem_mb=64"));
        assert!(!c0.cmdline().contains("dirty"));
        assert!(c
            .cmdline()
            .contains("count_dirty_mb=32 probe.count_dirty_rate_mb=10"));
    }
}
