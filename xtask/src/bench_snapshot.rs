//! `cargo xtask bench-snapshot`: snapshot, restore and clone performance, tern vs QEMU on the
//! same guest, side by side on the host's /dev/kvm, interleaved, medians.
//!
//! The guest is the probe's `count` scenario (a ring-3 counter printing
//! `probe: count tick=K value=V` every [`TICK_MS`] ms) with a quarter of its RAM filled with a
//! pattern (`probe.count_mem_mb`), so memory is really used. For each guest size and run:
//!
//! - tern: boot, pause + `PUT /v1/vm/snapshot` (timed), then restores of that snapshot: through
//!   the API of an empty `tern run --api-socket` (lazy and eager; request → 204 and request →
//!   first tick in the new serial log), and from the command line (`tern run --restore`,
//!   process start → first tick); then `--clones` empty terns restoring it lazily at once.
//! - QEMU: boot, QMP `stop` + `migrate` to `exec:cat > FILE` (timed until the file is written,
//!   fsynced and renamed, as tern's snapshot is), then restores: `-incoming defer` +
//!   `migrate-incoming` + `cont` (the analogue of the API restore) and `-incoming exec:` from
//!   process start.
//!
//! With `--baseline PATH` and/or `--baseline-args "ARGS"`, a baseline tern (an earlier binary,
//! or this one with other `tern run` arguments) goes through the same tern steps in the same
//! runs (the two alternating which goes first), reported in `baseline` and `tern/baseline`
//! columns.
//!
//! Every restore is checked: the first tick after it must continue the counter where the
//! snapshot left it. All files live in one directory under /var/tmp, removed at the end and on
//! errors (stale ones from killed runs are removed at the start).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::bench_peers::{self, Peer};
use crate::bench_probe::median;
use crate::bench_snapshot_peers;
use crate::bench_terns::{describe, has_baseline, run_terns, Tern};

/// The guest's tick period: the "first tick" latencies include up to this much guest time (the
/// rest of the tick period the snapshot was taken in).
const TICK_MS: u64 = 10;
/// How long the guest counts: far longer than a run.
const COUNT_MS: u64 = 3_600_000;
/// Time allowed for a boot (including the memory fill) to reach its first ticks.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Time allowed for one snapshot or restore step.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// Where the scratch directory goes (snapshots of big guests are GiBs: not a tmpfs).
const SCRATCH_PARENT: &str = "/var/tmp";
const SCRATCH_PREFIX: &str = "tern-bench-snapshot-";
/// QEMU's migration bandwidth cap, raised from its 128 MiB/s default so the file write is not
/// throttled (bytes per second).
pub(crate) const QEMU_MAX_BANDWIDTH: u64 = 100 << 30;
/// The QEMU machine: no firmware, no PCI, like tern.
pub(crate) const QEMU_MACHINE: &str = "microvm";

/// What to measure.
pub struct Options {
    /// Guest sizes in MiB.
    pub sizes_mib: Vec<u64>,
    /// Interleaved runs per size.
    pub runs: usize,
    /// Clones restored at once from one snapshot.
    pub clones: usize,
}

/// Parses `256M`, `1G`, `4g`, `512` (MiB) into MiB.
pub fn parse_size_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('G' | 'g') => (&t[..t.len() - 1], 1024),
        Some('M' | 'm') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad guest size {s:?} (expected e.g. 256M or 4G)"))?;
    let mib = n
        .checked_mul(mult)
        .ok_or_else(|| format!("guest size {s:?} is too big"))?;
    if mib < 64 {
        return Err(format!("guest size {s:?} is below 64 MiB"));
    }
    Ok(mib)
}

/// The MiB of the pattern the guest writes: a quarter of its RAM.
fn pattern_mib(size_mib: u64) -> u64 {
    size_mib / 4
}

pub(crate) fn cmdline(size_mib: u64) -> String {
    format!(
        "probe.run=count probe.count_ms={COUNT_MS} probe.count_tick_ms={TICK_MS} probe.count_mem_mb={}",
        pattern_mib(size_mib)
    )
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

// ---------------------------------------------------------------------------------------------
// Serial logs.

/// Tick numbers of the complete `probe: count tick=K ...` lines of a serial log.
pub(crate) fn ticks_in(text: &str) -> Vec<u64> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("probe: count tick="))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

pub(crate) fn ticks(log: &Path) -> Vec<u64> {
    // A partial read of a growing file is fine: only complete lines count.
    let bytes = std::fs::read(log).unwrap_or_default();
    ticks_in(&String::from_utf8_lossy(&bytes))
}

fn first_tick(log: &Path) -> Option<u64> {
    ticks(log).first().copied()
}

/// The last lines of a log, for error messages.
pub(crate) fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Checks that a restored guest's first tick continues the counter: the snapshot's last
/// complete tick was `last`; a line being printed at the pause shows up as a partial line, so
/// the next complete one may be `last + 2`.
pub(crate) fn check_continues(what: &str, first: u64, last: u64) -> Result<()> {
    if first <= last || first > last + 2 {
        bail!(
            "{what}: the restored guest's first tick is {first}, but the snapshot was taken \
             after tick {last}: it did not continue from the snapshot"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// A VMM process, killed when dropped.
pub(crate) struct Proc {
    pub child: Child,
    pub name: &'static str,
    stderr: PathBuf,
}

impl Proc {
    pub fn spawn(
        program: &Path,
        args: &[String],
        name: &'static str,
        stderr: &Path,
    ) -> Result<Proc> {
        Proc::spawn_to(program, args, name, stderr, None)
    }

    /// Like [`Proc::spawn`], with stdout in the file `stdout` if given (a serial console
    /// printed there).
    pub fn spawn_to(
        program: &Path,
        args: &[String],
        name: &'static str,
        stderr: &Path,
        stdout: Option<&Path>,
    ) -> Result<Proc> {
        let err = std::fs::File::create(stderr)
            .with_context(|| format!("cannot create {}", stderr.display()))?;
        let out = match stdout {
            Some(p) => Stdio::from(
                std::fs::File::create(p)
                    .with_context(|| format!("cannot create {}", p.display()))?,
            ),
            None => Stdio::null(),
        };
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Proc {
            child,
            name,
            stderr: stderr.to_path_buf(),
        })
    }

    /// Fails if the process has exited, with its stderr.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            let err = err
                .trim()
                .lines()
                .last()
                .unwrap_or("no message")
                .to_string();
            bail!("{} exited unexpectedly ({st}): {err}", self.name);
        }
        Ok(())
    }

    /// Polls `f` every millisecond until it returns `Some`, failing if the process exits or
    /// `timeout` passes.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> Result<T> {
        let t0 = Instant::now();
        loop {
            if let Some(v) = f() {
                return Ok(v);
            }
            self.check_alive()
                .with_context(|| format!("waiting for {what}"))?;
            if t0.elapsed() > timeout {
                bail!(
                    "{}: timed out after {} s waiting for {what}",
                    self.name,
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// tern's API.

fn client(sock: &Path) -> api::client::Client {
    api::client::Client::new(sock).with_timeout(Some(STEP_TIMEOUT))
}

/// One request to tern's API, with this benchmark's step timeout.
pub(crate) fn http(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, String)> {
    let body = body.map(Value::to_string);
    client(sock)
        .call(method, path, body.as_deref())
        .with_context(|| format!("{method} {path}"))
}

/// A request that must answer `want`.
pub(crate) fn api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    want: u16,
) -> Result<()> {
    let body = body.map(Value::to_string);
    client(sock).expect(method, path, body.as_deref(), &[want])?;
    Ok(())
}

/// Starts `tern run ARGS --api-socket SOCK` and waits until the API answers.
pub(crate) fn tern_start(tern: &Tern, args: &[String], sock: &Path, stderr: &Path) -> Result<Proc> {
    let mut a = vec!["run".to_string()];
    a.extend_from_slice(args);
    a.push("--api-socket".into());
    a.push(path_str(sock)?.into());
    let mut p = Proc::spawn(&tern.program, &tern.args(&a), "tern", stderr)?;
    p.wait_for("tern's API socket", Duration::from_secs(30), || {
        http(sock, "GET", "/ping", None)
            .ok()
            .filter(|(st, _)| *st == 200)
    })?;
    Ok(p)
}

/// Stops a tern through its API (kills it if that does not work).
pub(crate) fn tern_stop(mut p: Proc, sock: &Path) {
    let _ = http(sock, "PUT", "/v1/vm/shutdown?force=true", None);
    let t0 = Instant::now();
    while matches!(p.child.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Drop kills it if it is still there.
}

// ---------------------------------------------------------------------------------------------
// QMP.

/// A QMP connection.
pub(crate) struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects (retrying while QEMU starts) and negotiates capabilities.
    pub fn connect(p: &mut Proc, sock: &Path) -> Result<Qmp> {
        let s = p.wait_for("QEMU's QMP socket", Duration::from_secs(30), || {
            UnixStream::connect(sock).ok()
        })?;
        s.set_read_timeout(Some(STEP_TIMEOUT))?;
        let mut q = Qmp {
            w: s.try_clone()?,
            r: BufReader::new(s),
        };
        let greeting = q.line()?;
        if greeting.get("QMP").is_none() {
            bail!("QEMU: unexpected QMP greeting {greeting}");
        }
        q.cmd("qmp_capabilities", None)?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value> {
        let mut l = String::new();
        if self.r.read_line(&mut l).context("reading QMP")? == 0 {
            bail!("QEMU closed its QMP connection");
        }
        serde_json::from_str(&l).with_context(|| format!("QEMU: bad QMP line {l:?}"))
    }

    /// Runs a command; its `return` value (events in between are skipped).
    pub fn cmd(&mut self, name: &str, args: Option<Value>) -> Result<Value> {
        let mut c = json!({ "execute": name });
        if let Some(a) = args {
            c["arguments"] = a;
        }
        writeln!(self.w, "{c}").context("writing QMP")?;
        loop {
            let mut v = self.line()?;
            if let Some(e) = v.get("error") {
                bail!("QEMU: {name}: {}", e["desc"].as_str().unwrap_or("error"));
            }
            if let Some(r) = v.get_mut("return") {
                return Ok(r.take());
            }
        }
    }

    fn status(&mut self) -> Result<String> {
        let r = self.cmd("query-status", None)?;
        Ok(r["status"].as_str().unwrap_or("").to_string())
    }

    /// Waits until an incoming migration has loaded, then continues the VM.
    fn finish_incoming(&mut self, p: &mut Proc) -> Result<()> {
        let t0 = Instant::now();
        loop {
            match self.status()?.as_str() {
                // The snapshot was taken stopped, so the loaded VM stays paused until `cont`.
                "paused" => {
                    self.cmd("cont", None)?;
                    return Ok(());
                }
                "running" => return Ok(()),
                "inmigrate" | "prelaunch" => {}
                other => {
                    let m = self.cmd("query-migrate", None).unwrap_or_default();
                    bail!(
                        "QEMU: incoming migration ended in state {other:?} (migration: {})",
                        m["error-desc"].as_str().unwrap_or("no error given")
                    );
                }
            }
            p.check_alive()?;
            if t0.elapsed() > STEP_TIMEOUT {
                bail!("QEMU: the incoming migration did not finish in time");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// QEMU's command line for the probe with `cmdline`, a `size_mib` guest, its serial port in
/// the file `serial` and QMP on the socket `qmp`.
pub(crate) fn qemu_args(
    probe: &str,
    size_mib: u64,
    cmdline: &str,
    serial: &Path,
    qmp: &Path,
) -> Result<Vec<String>> {
    let mut a: Vec<String> = [
        "-accel",
        "kvm",
        "-M",
        QEMU_MACHINE,
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
        probe,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("-m".into());
    a.push(size_mib.to_string());
    a.push("-append".into());
    a.push(cmdline.into());
    a.push("-serial".into());
    a.push(format!("file:{}", path_str(serial)?));
    a.push("-qmp".into());
    a.push(format!("unix:{},server=on,wait=off", path_str(qmp)?));
    Ok(a)
}

/// A path that can go into a shell command unquoted.
fn shell_safe(p: &Path) -> Result<&str> {
    let s = path_str(p)?;
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
    {
        bail!("{s} has characters that need shell quoting");
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Measurements.

/// One tern binary's numbers in one run for one guest size, or a peer's
/// ([`crate::bench_snapshot_peers`]); NaN where a number does not exist.
#[derive(Default, Clone)]
pub(crate) struct TernResult {
    pub create_s: f64,
    pub apparent: f64,
    pub du: f64,
    pub api_lazy_reply: f64,
    pub api_lazy_tick: f64,
    pub api_eager_reply: f64,
    pub api_eager_tick: f64,
    pub cold_lazy_tick: f64,
    pub cold_eager_tick: f64,
    pub clone_rate: f64,
    pub clone_all_ticked: f64,
}

/// QEMU's numbers in one run for one guest size.
#[derive(Default, Clone)]
struct QemuResult {
    create_s: f64,
    apparent: f64,
    du: f64,
    api_reply: f64,
    api_tick: f64,
    cold_running: f64,
    cold_tick: f64,
}

/// One run's numbers for one guest size: each tern variant's (in [`Ctx::terns`] order),
/// QEMU's and each peer's (in [`Ctx::peers`] order).
#[derive(Clone)]
struct RunResult {
    terns: Vec<TernResult>,
    qemu: QemuResult,
    /// Each peer's figures, or why it has none in this run.
    peers: Vec<Result<TernResult, String>>,
}

/// Apparent size and allocated size (`du`) of a file or of the files in a directory, MiB.
pub(crate) fn sizes_mib(p: &Path) -> Result<(f64, f64)> {
    let meta = std::fs::metadata(p).with_context(|| format!("cannot stat {}", p.display()))?;
    let files: Vec<std::fs::Metadata> = if meta.is_dir() {
        std::fs::read_dir(p)?
            .map(|e| e.and_then(|e| e.metadata()))
            .collect::<std::io::Result<_>>()?
    } else {
        vec![meta]
    };
    let apparent: u64 = files.iter().map(|m| m.len()).sum();
    let du: u64 = files.iter().map(|m| m.blocks() * 512).sum();
    let mib = f64::from(1u32 << 20);
    Ok((apparent as f64 / mib, du as f64 / mib))
}

struct Ctx<'a> {
    /// The tern variants: the one measured, then the baseline if any.
    terns: &'a [Tern],
    qemu: &'a Path,
    /// Firecracker and Cloud Hypervisor, when named.
    peers: &'a [Peer],
    probe: String,
    clones: usize,
}

/// Waits for a booted guest's ticks to start (after its memory fill).
pub(crate) fn wait_booted(p: &mut Proc, log: &Path) -> Result<()> {
    p.wait_for("the guest's first ticks", BOOT_TIMEOUT, || {
        (ticks(log).len() >= 3).then_some(())
    })
    .with_context(|| format!("serial: {}", tail(log)))
}

/// Waits for the first complete tick line of a restored guest; its number.
pub(crate) fn wait_first_tick(p: &mut Proc, log: &Path) -> Result<u64> {
    p.wait_for("the restored guest's first tick", STEP_TIMEOUT, || {
        first_tick(log)
    })
    .with_context(|| format!("serial: {}", tail(log)))
}

impl Ctx<'_> {
    /// Boots tern, snapshots it into `dir/tern-snap`; the last tick before the snapshot.
    fn tern_create(
        &self,
        tern: &Tern,
        dir: &Path,
        size_mib: u64,
        r: &mut TernResult,
    ) -> Result<u64> {
        let sock = dir.join("boot.sock");
        let log = dir.join("tern-boot.log");
        let args: Vec<String> = vec![
            "--kernel".into(),
            self.probe.clone(),
            "--memory".into(),
            format!("{size_mib}M"),
            "--cpus".into(),
            "1".into(),
            "--serial".into(),
            format!("file:{}", path_str(&log)?),
            "--cmdline".into(),
            cmdline(size_mib),
        ];
        let mut vm = tern_start(tern, &args, &sock, &dir.join("tern-boot.err"))?;
        wait_booted(&mut vm, &log)?;
        let snap = dir.join("tern-snap");
        let body = json!({ "dir": path_str(&snap)? });
        let t0 = Instant::now();
        api(&sock, "PUT", "/v1/vm/pause", None, 204)?;
        api(&sock, "PUT", "/v1/vm/snapshot", Some(&body), 204)?;
        r.create_s = t0.elapsed().as_secs_f64();
        let last = ticks(&log).last().copied().unwrap_or(0);
        tern_stop(vm, &sock);
        (r.apparent, r.du) = sizes_mib(&snap)?;
        Ok(last)
    }

    /// An empty tern, then `PUT /v1/vm/restore`: (request → 204, request → first tick) in ms.
    fn tern_api_restore(
        &self,
        tern: &Tern,
        dir: &Path,
        mode: &str,
        last: u64,
    ) -> Result<(f64, f64)> {
        let sock = dir.join(format!("api-{mode}.sock"));
        let log = dir.join(format!("tern-api-{mode}.log"));
        let mut vm = tern_start(tern, &[], &sock, &dir.join("tern-api.err"))?;
        let body = json!({
            "dir": path_str(&dir.join("tern-snap"))?,
            "mode": mode,
            "serial": format!("file:{}", path_str(&log)?),
        });
        let t0 = Instant::now();
        api(&sock, "PUT", "/v1/vm/restore", Some(&body), 204)?;
        let reply = t0.elapsed();
        let first = wait_first_tick(&mut vm, &log)?;
        let tick = t0.elapsed();
        check_continues(&format!("tern API restore ({mode})"), first, last)?;
        tern_stop(vm, &sock);
        Ok((ms(reply), ms(tick)))
    }

    /// `tern run --restore`: process start → first tick, ms.
    fn tern_cold_restore(&self, tern: &Tern, dir: &Path, mode: &str, last: u64) -> Result<f64> {
        let log = dir.join(format!("tern-cold-{mode}.log"));
        let args: Vec<String> = vec![
            "run".into(),
            "--restore".into(),
            path_str(&dir.join("tern-snap"))?.into(),
            "--restore-mode".into(),
            mode.into(),
            "--serial".into(),
            format!("file:{}", path_str(&log)?),
        ];
        let t0 = Instant::now();
        let mut vm = Proc::spawn(
            &tern.program,
            &tern.args(&args),
            "tern",
            &dir.join("tern-cold.err"),
        )?;
        let first = wait_first_tick(&mut vm, &log)?;
        let tick = t0.elapsed();
        check_continues(&format!("tern --restore ({mode})"), first, last)?;
        Ok(ms(tick))
    }

    /// `clones` empty terns restore the snapshot lazily at once: (restores per second from the
    /// first request to the last 204, ms from the first request until every clone ticked).
    fn tern_clones(&self, tern: &Tern, dir: &Path, last: u64) -> Result<(f64, f64)> {
        let n = self.clones;
        let mut vms = Vec::with_capacity(n);
        for i in 0..n {
            let sock = dir.join(format!("clone{i}.sock"));
            let p = tern_start(tern, &[], &sock, &dir.join(format!("clone{i}.err")))?;
            vms.push((p, sock, dir.join(format!("clone{i}.log"))));
        }
        let snap = path_str(&dir.join("tern-snap"))?.to_string();
        let t0 = Instant::now();
        let threads: Vec<_> = vms
            .iter()
            .map(|(_, sock, log)| {
                let sock = sock.clone();
                let body = json!({
                    "dir": snap,
                    "mode": "lazy",
                    "serial": format!("file:{}", log.display()),
                });
                std::thread::spawn(move || -> Result<Instant> {
                    api(&sock, "PUT", "/v1/vm/restore", Some(&body), 204)?;
                    Ok(Instant::now())
                })
            })
            .collect();
        let mut done = t0;
        for (i, t) in threads.into_iter().enumerate() {
            let at = t
                .join()
                .map_err(|_| anyhow::anyhow!("clone {i}: request thread panicked"))?
                .with_context(|| format!("clone {i}"))?;
            done = done.max(at);
        }
        let rate = n as f64 / (done - t0).as_secs_f64();
        for (i, (p, _, log)) in vms.iter_mut().enumerate() {
            let first = wait_first_tick(p, log).with_context(|| format!("clone {i}"))?;
            check_continues(&format!("clone {i}"), first, last)?;
        }
        let all = t0.elapsed();
        for (p, sock, _) in vms {
            tern_stop(p, &sock);
        }
        Ok((rate, ms(all)))
    }

    /// Boots QEMU and migrates it to `dir/qemu.mig`; the last tick before the `stop`.
    fn qemu_create(&self, dir: &Path, size_mib: u64, r: &mut QemuResult) -> Result<u64> {
        let log = dir.join("qemu-boot.log");
        let qsock = dir.join("qemu-boot.qmp");
        let args = qemu_args(&self.probe, size_mib, &cmdline(size_mib), &log, &qsock)?;
        let mut vm = Proc::spawn(self.qemu, &args, "QEMU", &dir.join("qemu-boot.err"))?;
        let mut q = Qmp::connect(&mut vm, &qsock)?;
        q.cmd(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": QEMU_MAX_BANDWIDTH })),
        )?;
        wait_booted(&mut vm, &log)?;
        let file = dir.join("qemu.mig");
        let part = dir.join("qemu.mig.part");
        // QEMU 7.2 has no file: URI. The stream is complete once `cat` has exited; like tern's
        // snapshot, the file is then fsynced and renamed into place.
        let uri = format!(
            "exec:cat > {p} && sync {p} && mv {p} {f}",
            p = shell_safe(&part)?,
            f = shell_safe(&file)?
        );
        let t0 = Instant::now();
        q.cmd("stop", None)?;
        q.cmd("migrate", Some(json!({ "uri": uri })))?;
        loop {
            let m = q.cmd("query-migrate", None)?;
            match m["status"].as_str().unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => bail!(
                    "QEMU: migration to {} failed: {}",
                    file.display(),
                    m["error-desc"].as_str().unwrap_or("no error given")
                ),
                _ => {}
            }
            if t0.elapsed() > STEP_TIMEOUT {
                bail!(
                    "QEMU: migration to {} did not finish in time",
                    file.display()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        vm.wait_for("the migration file", STEP_TIMEOUT, || {
            file.exists().then_some(())
        })?;
        r.create_s = t0.elapsed().as_secs_f64();
        let last = ticks(&log).last().copied().unwrap_or(0);
        drop(vm);
        (r.apparent, r.du) = sizes_mib(&file)?;
        Ok(last)
    }

    /// `-incoming defer`, then `migrate-incoming` + `cont`: (request → `cont` answered,
    /// request → first tick) in ms.
    fn qemu_api_restore(&self, dir: &Path, size_mib: u64, last: u64) -> Result<(f64, f64)> {
        let log = dir.join("qemu-api.log");
        let qsock = dir.join("qemu-api.qmp");
        let mut args = qemu_args(&self.probe, size_mib, &cmdline(size_mib), &log, &qsock)?;
        args.extend(["-incoming".into(), "defer".into()]);
        let mut vm = Proc::spawn(self.qemu, &args, "QEMU", &dir.join("qemu-api.err"))?;
        let mut q = Qmp::connect(&mut vm, &qsock)?;
        let uri = format!("exec:cat {}", shell_safe(&dir.join("qemu.mig"))?);
        let t0 = Instant::now();
        q.cmd("migrate-incoming", Some(json!({ "uri": uri })))?;
        q.finish_incoming(&mut vm)?;
        let reply = t0.elapsed();
        let first = wait_first_tick(&mut vm, &log)?;
        let tick = t0.elapsed();
        check_continues("QEMU migrate-incoming", first, last)?;
        Ok((ms(reply), ms(tick)))
    }

    /// `-incoming exec:cat FILE` from process start: (→ `cont` answered, → first tick) in ms.
    fn qemu_cold_restore(&self, dir: &Path, size_mib: u64, last: u64) -> Result<(f64, f64)> {
        let log = dir.join("qemu-cold.log");
        let qsock = dir.join("qemu-cold.qmp");
        let mut args = qemu_args(&self.probe, size_mib, &cmdline(size_mib), &log, &qsock)?;
        args.extend([
            "-incoming".into(),
            format!("exec:cat {}", shell_safe(&dir.join("qemu.mig"))?),
        ]);
        let t0 = Instant::now();
        let mut vm = Proc::spawn(self.qemu, &args, "QEMU", &dir.join("qemu-cold.err"))?;
        let mut q = Qmp::connect(&mut vm, &qsock)?;
        q.finish_incoming(&mut vm)?;
        let running = t0.elapsed();
        let first = wait_first_tick(&mut vm, &log)?;
        let tick = t0.elapsed();
        check_continues("QEMU -incoming", first, last)?;
        Ok((ms(running), ms(tick)))
    }

    /// One tern variant's steps of run number `run`, in `dir` (created here and removed at the
    /// end, with the snapshot, to free its space for the next variant and QEMU).
    fn tern_run(&self, tern: &Tern, dir: &Path, size_mib: u64, run: usize) -> Result<TernResult> {
        std::fs::create_dir_all(dir)?;
        let mut r = TernResult::default();
        let last = self
            .tern_create(tern, dir, size_mib, &mut r)
            .context("tern snapshot")?;
        // The first restore after the snapshot was written finds the host busiest (dirty page
        // cache, fragmented memory): alternate which mode goes first.
        let modes = if run.is_multiple_of(2) {
            ["lazy", "eager"]
        } else {
            ["eager", "lazy"]
        };
        for mode in modes {
            let api = self
                .tern_api_restore(tern, dir, mode, last)
                .with_context(|| format!("tern API restore, {mode}"))?;
            if mode == "lazy" {
                (r.api_lazy_reply, r.api_lazy_tick) = api;
            } else {
                (r.api_eager_reply, r.api_eager_tick) = api;
            }
        }
        for mode in modes {
            let cold = self
                .tern_cold_restore(tern, dir, mode, last)
                .with_context(|| format!("tern --restore, {mode}"))?;
            if mode == "lazy" {
                r.cold_lazy_tick = cold;
            } else {
                r.cold_eager_tick = cold;
            }
        }
        if self.clones > 0 {
            (r.clone_rate, r.clone_all_ticked) =
                self.tern_clones(tern, dir, last).context("tern clones")?;
        } else {
            (r.clone_rate, r.clone_all_ticked) = (f64::NAN, f64::NAN);
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        Ok(r)
    }

    /// Run number `run` for one guest size, in `dir` (emptied by the caller): every tern
    /// variant (each in a subdirectory named after it), then QEMU, then each peer.
    fn run_once(&self, dir: &Path, size_mib: u64, run: usize) -> Result<RunResult> {
        let terns = run_terns(self.terns, run, |t| {
            settle();
            self.tern_run(t, &dir.join(t.name), size_mib, run)
        })?;
        settle();
        let mut qemu = QemuResult::default();
        let last = self
            .qemu_create(dir, size_mib, &mut qemu)
            .context("QEMU migrate to file")?;
        (qemu.api_reply, qemu.api_tick) = self
            .qemu_api_restore(dir, size_mib, last)
            .context("QEMU migrate-incoming")?;
        (qemu.cold_running, qemu.cold_tick) = self
            .qemu_cold_restore(dir, size_mib, last)
            .context("QEMU -incoming")?;
        // The peers' memory files are full-size: QEMU's stream goes first, so a run needs no
        // more space than [`space_needed`].
        let _ = std::fs::remove_file(dir.join("qemu.mig"));
        let mut peers = Vec::with_capacity(self.peers.len());
        for p in self.peers {
            settle();
            // A peer that cannot do a step on this host gets empty columns and its reason
            // under the table; tern's and QEMU's figures still stand.
            let d = dir.join(p.kind.short());
            let r = bench_snapshot_peers::peer_run(p, Path::new(&self.probe), &d, size_mib, run)
                .map_err(|e| {
                    let why = format!("{e:#}");
                    eprintln!("[bench-snapshot] {}: {why}", p.kind.short());
                    let _ = std::fs::remove_dir_all(&d);
                    why
                });
            peers.push(r);
        }
        Ok(RunResult { terns, qemu, peers })
    }
}

/// Writes back all dirty data and metadata before a VMM's steps (not timed), so that none of
/// them waits behind what the previous one left in flight: right after Firecracker's steps
/// (a full 1 GiB memory file written, synced and then deleted), tern's snapshot of a 1 GiB
/// guest took 1.1 s, against 0.53 s in runs without the peers. What exactly was still in
/// flight (the large file's deletion is a candidate) was not analysed.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

// ---------------------------------------------------------------------------------------------
// Scratch space.

/// The scratch directory, removed with everything in it when dropped.
pub(crate) struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the scratch directories `parent/prefixPID` of earlier runs whose process is gone
/// (killed runs).
pub(crate) fn remove_stale_scratch(parent: &str, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(prefix) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            eprintln!("removing stale {}", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Free bytes for unprivileged use on the filesystem holding `p`.
fn free_bytes(p: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(path_str(p)?)?;
    // SAFETY: statvfs is plain data filled by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        bail!(
            "statvfs {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Disk space a run of a `size_mib` guest needs at most: tern's full memory file (removed
/// before QEMU writes its stream, which is never bigger) plus 1 GiB of headroom.
fn space_needed(size_mib: u64) -> u64 {
    (size_mib + 1024) << 20
}

// ---------------------------------------------------------------------------------------------
// Report.

struct Row {
    name: &'static str,
    tern: fn(&TernResult) -> f64,
    qemu: Option<fn(&QemuResult) -> f64>,
    precision: usize,
}

fn rows(clones: usize) -> Vec<Row> {
    let mut v = vec![
        Row {
            name: "create: pause + snapshot to file, s",
            tern: |r| r.create_s,
            qemu: Some(|r| r.create_s),
            precision: 3,
        },
        Row {
            name: "snapshot size, MiB (apparent)",
            tern: |r| r.apparent,
            qemu: Some(|r| r.apparent),
            precision: 1,
        },
        Row {
            name: "snapshot size, MiB (on disk, du)",
            tern: |r| r.du,
            qemu: Some(|r| r.du),
            precision: 1,
        },
        Row {
            name: "API restore lazy: request -> running, ms",
            tern: |r| r.api_lazy_reply,
            qemu: Some(|r| r.api_reply),
            precision: 1,
        },
        Row {
            name: "API restore lazy: request -> first tick, ms",
            tern: |r| r.api_lazy_tick,
            qemu: Some(|r| r.api_tick),
            precision: 1,
        },
        Row {
            name: "API restore eager: request -> running, ms",
            tern: |r| r.api_eager_reply,
            qemu: Some(|r| r.api_reply),
            precision: 1,
        },
        Row {
            name: "API restore eager: request -> first tick, ms",
            tern: |r| r.api_eager_tick,
            qemu: Some(|r| r.api_tick),
            precision: 1,
        },
        Row {
            name: "CLI restore lazy: start -> first tick, ms",
            tern: |r| r.cold_lazy_tick,
            qemu: Some(|r| r.cold_tick),
            precision: 1,
        },
        Row {
            name: "CLI restore eager: start -> first tick, ms",
            tern: |r| r.cold_eager_tick,
            qemu: Some(|r| r.cold_tick),
            precision: 1,
        },
        Row {
            name: "CLI restore: start -> running (QEMU), ms",
            tern: |_| f64::NAN,
            qemu: Some(|r| r.cold_running),
            precision: 1,
        },
    ];
    if clones > 0 {
        v.push(Row {
            name: "clones: lazy API restores per second",
            tern: |r| r.clone_rate,
            qemu: None,
            precision: 1,
        });
        v.push(Row {
            name: "clones: first request -> all ticked, ms",
            tern: |r| r.clone_all_ticked,
            qemu: None,
            precision: 1,
        });
    }
    v
}

pub(crate) fn cell(x: f64, precision: usize) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.precision$}")
    }
}

fn print_header(o: &Options) {
    println!(
        "snapshot / restore / clone: tern vs QEMU 7.2 (-M {QEMU_MACHINE}, migration to a file \
         through exec:cat), probe guest `count` on the host /dev/kvm, 1 vCPU; {} interleaved \
         runs per size, medians",
        o.runs
    );
    println!(
        "guest: ticks every {TICK_MS} ms; fills a quarter of its RAM with a pattern \
         (probe.count_mem_mb = size/4); snapshots in {SCRATCH_PARENT} (host page cache warm)"
    );
    println!("columns:");
    for l in [
        "  create            tern: PUT /v1/vm/pause + PUT /v1/vm/snapshot until 204 (state.json + memory.bin",
        "                    written, fsynced, renamed); QEMU: QMP stop + migrate to \"exec:cat > F.part && sync",
        "                    F.part && mv F.part F\" (max-bandwidth raised to 100 GiB/s) until F exists",
        "  size              apparent = file lengths; on disk = allocated blocks (du)",
        "  API restore       tern: PUT /v1/vm/restore {dir, mode, serial} on an empty `tern run --api-socket`",
        "                    already serving; running = the 204. QEMU: on a `-incoming defer` QEMU already",
        "                    serving QMP, migrate-incoming exec:cat F, poll query-status until the load is",
        "                    done (paused), cont; running = cont answered. QEMU has one mode (it reads the",
        "                    whole stream): its numbers repeat in the lazy and eager rows",
        "  first tick        from the same request to the first complete `probe: count tick=` line in the",
        "                    new serial log (guest visibly running); includes up to one tick period of guest",
        "                    time, the rest of the tick the snapshot was taken in",
        "  CLI restore       from process start: `tern run --restore DIR --restore-mode M --serial file:LOG`;",
        "                    QEMU `-incoming exec:cat F` + QMP connect, wait for the load, cont",
        "  clones            N empty terns already serving, N concurrent PUT /v1/vm/restore (lazy) of one",
        "                    snapshot: N / (first request -> last 204), and first request -> every clone ticked",
        "  tern/qemu         below 1: tern is faster / smaller (above 1 better only for rates); every restore",
        "                    is checked to continue the guest's counter from the snapshot; lazy and eager",
        "                    alternate which goes first from run to run",
    ] {
        println!("{l}");
    }
}

/// The table for one guest size; `baseline`: whether `results` hold a baseline tern's numbers
/// (second) to report in extra columns; each of `peers` gets its figure and ratio to QEMU's.
fn print_size(o: &Options, size_mib: u64, results: &[RunResult], baseline: bool, peers: &[Peer]) {
    println!(
        "\n== {size_mib} MiB guest, {} MiB pattern ==",
        pattern_mib(size_mib)
    );
    print!(
        "{:<46} {:>10} {:>10} {:>10}",
        "metric", "tern", "qemu", "tern/qemu"
    );
    if baseline {
        print!(" {:>10} {:>14}", "baseline", "tern/baseline");
    }
    println!("{}", bench_peers::heads(peers, 10));
    for row in rows(o.clones) {
        let name = if row.name.starts_with("clones") {
            format!("{} ({})", row.name, o.clones)
        } else {
            row.name.to_string()
        };
        let tern_median =
            |i: usize| median(results.iter().map(|r| (row.tern)(&r.terns[i])).collect());
        let t = tern_median(0);
        let q = row.qemu.map_or(f64::NAN, |f| {
            median(results.iter().map(|r| f(&r.qemu)).collect())
        });
        print!(
            "{name:<46} {:>10} {:>10} {:>10}",
            cell(t, row.precision),
            cell(q, row.precision),
            cell(t / q, 3)
        );
        if baseline {
            let b = tern_median(1);
            print!(" {:>10} {:>14}", cell(b, row.precision), cell(t / b, 3));
        }
        // Over the runs the peer finished; NaN where it has no figure.
        let peer_median = |i: usize| {
            median(
                results
                    .iter()
                    .filter_map(|r| r.peers[i].as_ref().ok())
                    .map(row.tern)
                    .filter(|v| !v.is_nan())
                    .collect(),
            )
        };
        println!("{}", bench_peers::cells(peers, 10, q, peer_median));
    }
    for (i, p) in peers.iter().enumerate() {
        let failed: Vec<&String> = results
            .iter()
            .filter_map(|r| r.peers[i].as_ref().err())
            .collect();
        if let Some(first) = failed.first() {
            // The first line of the reason (a peer's JSON error may carry a backtrace after
            // an escaped newline).
            let line = first.lines().next().unwrap_or_default();
            let line = line.split("\\n").next().unwrap_or_default();
            let line: String = line.chars().take(300).collect();
            let which = if failed.len() == results.len() {
                format!("failed in all {} runs (no figures)", results.len())
            } else {
                format!(
                    "failed in {} of {} runs (its figures are from the others)",
                    failed.len(),
                    results.len()
                )
            };
            println!("{}: {which}: {line}", p.kind.short());
        }
    }
}

/// Runs the benchmark; with a baseline among `terns`, it goes through the same steps as `tern`
/// in the same runs and gets its own columns.
pub fn run(terns: &[Tern], peers: &[Peer], probe: &Path, qemu: &Path, o: &Options) -> Result<()> {
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if o.sizes_mib.is_empty() {
        bail!("no guest sizes given");
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
    let max = o.sizes_mib.iter().copied().max().unwrap_or(0);
    let free = free_bytes(Path::new(SCRATCH_PARENT))?;
    if free < space_needed(max) {
        bail!(
            "{SCRATCH_PARENT} has {} MiB free; a {max} MiB guest needs {} MiB for its snapshot files",
            free >> 20,
            space_needed(max) >> 20
        );
    }
    let scratch =
        Scratch(Path::new(SCRATCH_PARENT).join(format!("{SCRATCH_PREFIX}{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0)
        .with_context(|| format!("cannot create {}", scratch.0.display()))?;
    let ctx = Ctx {
        terns,
        qemu,
        peers,
        probe: path_str(probe)?.to_string(),
        clones: o.clones,
    };
    print_header(o);
    match describe(terns) {
        Some(d) => println!("{d}"),
        None => println!("tern {}", terns[0].program.display()),
    }
    println!("qemu {}", qemu.display());
    for l in bench_peers::describe(peers) {
        println!("{l}");
    }
    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(); o.sizes_mib.len()];
    for run in 0..o.runs {
        for (i, &size) in o.sizes_mib.iter().enumerate() {
            eprintln!(
                "[bench-snapshot] run {}/{}, {size} MiB guest",
                run + 1,
                o.runs
            );
            let dir = scratch.0.join(format!("run{run}-{size}M"));
            std::fs::create_dir_all(&dir)?;
            let r = ctx
                .run_once(&dir, size, run)
                .with_context(|| format!("{size} MiB guest, run {}", run + 1))?;
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
            results[i].push(r);
        }
    }
    for (i, &size) in o.sizes_mib.iter().enumerate() {
        print_size(o, size, &results[i], has_baseline(terns), peers);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size_mib("256M"), Ok(256));
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert_eq!(parse_size_mib("4g"), Ok(4096));
        assert_eq!(parse_size_mib("512"), Ok(512));
        assert!(parse_size_mib("32M").is_err());
        assert!(parse_size_mib("x").is_err());
        assert!(parse_size_mib("").is_err());
    }

    #[test]
    fn tick_lines() {
        let log = "e=12\nprobe: count tick=7 value=100\nprobe: count tick=8 value=200\nprobe: cou";
        assert_eq!(ticks_in(log), vec![7, 8]);
        assert_eq!(ticks_in("probe: count tick=3 value=1"), Vec::<u64>::new());
        assert!(check_continues("t", 7, 6).is_ok());
        assert!(check_continues("t", 8, 6).is_ok());
        assert!(check_continues("t", 6, 6).is_err());
        assert!(check_continues("t", 1, 6).is_err());
    }

    #[test]
    fn shell_paths() {
        assert!(shell_safe(Path::new(
            "/var/tmp/tern-bench-snapshot-1/run0-256M/qemu.mig"
        ))
        .is_ok());
        assert!(shell_safe(Path::new("/tmp/a b")).is_err());
        assert!(shell_safe(Path::new("/tmp/a;rm")).is_err());
    }
}
