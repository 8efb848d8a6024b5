//! `cargo xtask bench-api`: the control API's latency and tern's CPU cost of serving it.
//!
//! - Latency of `GET /v1/vm` and of a pause + resume round trip (`PUT /v1/vm/pause` then
//!   `PUT /v1/vm/resume`) against the probe's `count` scenario (a ring-3 loop that keeps its
//!   vCPU busy): 100 sequential requests, then 8 concurrent clients × 100 each. One connection
//!   per request, as `tern info` and friends do. p50, p99 and max in microseconds.
//! - CPU time (utime + stime from /proc/PID/stat, and the scheduler's ns from
//!   /proc/PID/task/*/schedstat) of an empty `tern run --api-socket` (no kernel: waiting for
//!   `PUT /v1/vm`) over 10 s idle, during 1000 requests, and over 10 s idle after them; and of
//!   the running VM's VMM thread (the event loop, without the vCPUs) over 10 s.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const REQUESTS: usize = 100;
const CLIENTS: usize = 8;
const IDLE: Duration = Duration::from_secs(10);

/// How long a request may take to be answered.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

fn client(sock: &Path) -> api::client::Client {
    api::client::Client::new(sock).with_timeout(Some(ANSWER_TIMEOUT))
}

/// One request without a body; the status.
fn http(sock: &Path, method: &str, path: &str) -> Result<u16> {
    let (st, _) = client(sock)
        .call(method, path, None)
        .with_context(|| format!("{method} {path}"))?;
    Ok(st)
}

/// One request without a body whose status must be one of `ok`; the status.
fn expect(sock: &Path, method: &str, path: &str, ok: &[u16]) -> Result<u16> {
    let (st, _) = client(sock).expect(method, path, None, ok)?;
    Ok(st)
}

/// A tern process, killed when dropped.
struct Tern(Child);

impl Tern {
    /// Starts `tern run ARGS --api-socket SOCK` (stderr to `log`) and waits for the socket.
    fn start(tern: &Path, args: &[&str], sock: &Path, log: &Path) -> Result<Tern> {
        let child = Command::new(tern)
            .arg("run")
            .args(args)
            .arg("--api-socket")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(log)?))
            .spawn()
            .with_context(|| format!("cannot start {}", tern.display()))?;
        let mut t = Tern(child);
        let t0 = Instant::now();
        while http(sock, "GET", "/ping").ok() != Some(200) {
            if let Some(st) = t.0.try_wait()? {
                let err = std::fs::read_to_string(log).unwrap_or_default();
                bail!("tern exited ({st}) before serving the API: {}", err.trim());
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("tern's API socket did not answer within 20 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(t)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Stops the VM through the API and waits for tern.
    fn stop(mut self, sock: &Path) -> Result<()> {
        // tern may exit before it answers (state created); the exit is what counts.
        let _ = http(sock, "PUT", "/v1/vm/shutdown?force=true");
        let t0 = Instant::now();
        while self.0.try_wait()?.is_none() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("tern did not stop within 10 s of PUT /v1/vm/shutdown?force=true");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
    n: usize,
}

fn stats(mut us: Vec<f64>) -> Stats {
    us.sort_by(|a, b| a.total_cmp(b));
    let n = us.len();
    let at = |q: f64| us[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
    Stats {
        p50: at(0.50),
        p99: at(0.99),
        max: us[n - 1],
        n,
    }
}

/// What one operation does; returns how many of its requests got 409.
type Op = fn(&Path) -> Result<usize>;

/// Microseconds each call of `op` took, `REQUESTS` times on each of `clients` threads; the
/// wall time and the 409s.
fn measure(sock: &Path, clients: usize, op: Op) -> Result<(Vec<f64>, Duration, usize)> {
    let t0 = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let sock = sock.to_path_buf();
            std::thread::spawn(move || -> Result<(Vec<f64>, usize)> {
                let mut v = Vec::with_capacity(REQUESTS);
                let mut conflicts = 0;
                for _ in 0..REQUESTS {
                    let t = Instant::now();
                    conflicts += op(&sock)?;
                    v.push(t.elapsed().as_secs_f64() * 1e6);
                }
                Ok((v, conflicts))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut conflicts = 0;
    for t in threads {
        let (v, c) = t
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        all.extend(v);
        conflicts += c;
    }
    Ok((all, t0.elapsed(), conflicts))
}

fn get_vm(sock: &Path) -> Result<usize> {
    expect(sock, "GET", "/v1/vm", &[200]).map(|_| 0)
}

/// Pause then resume. With several clients at once another one may have paused (or resumed)
/// first: 409 is then the right answer, and still a full round trip through the VMM.
fn pause_resume(sock: &Path) -> Result<usize> {
    let a = expect(sock, "PUT", "/v1/vm/pause", &[204, 409])?;
    let b = expect(sock, "PUT", "/v1/vm/resume", &[204, 409])?;
    Ok(usize::from(a == 409) + usize::from(b == 409))
}

/// CPU time of process `pid`: (utime + stime in clock ticks as ms, scheduler ns of all its
/// threads).
fn cpu(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = &stat[stat.rfind(')').context("bad /proc/PID/stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut ns = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let p = t?.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(p) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok((ticks as f64 * 1000.0 / hz, ns))
}

/// Scheduler ns of one thread.
fn thread_ns(pid: u32, tid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))?;
    s.split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .context("bad schedstat")
}

fn threads_and_fds(pid: u32) -> (usize, usize) {
    let count = |d: String| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    (
        count(format!("/proc/{pid}/task")),
        count(format!("/proc/{pid}/fd")),
    )
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(tern: &Path, probe: &Path) -> Result<()> {
    let dir = Scratch(std::env::temp_dir().join(format!("tern-bench-api-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let sock = dir.0.join("api.sock");
    let probe_s = probe.to_str().context("probe path is not UTF-8")?;

    println!("tern {}", tern.display());
    println!("guest: probe count (ring-3 busy loop), 1 vCPU, 64 MiB; one connection per request\n");
    let log = dir.0.join("tern.log");
    let vm = Tern::start(
        tern,
        &[
            "--kernel",
            probe_s,
            "--cmdline",
            "probe.run=count probe.count_ms=600000 probe.count_tick_ms=1000",
            "--memory",
            "64M",
            "--serial",
            "none",
        ],
        &sock,
        &log,
    )?;
    // Warm up.
    for _ in 0..20 {
        get_vm(&sock)?;
    }
    println!(
        "{:<28} {:>5} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "latency (µs)", "n", "p50", "p99", "max", "req/s", "409s"
    );
    let rows: [(&str, usize, Op, usize); 4] = [
        ("GET /v1/vm, sequential", 1, get_vm, 1),
        ("GET /v1/vm, 8 clients", CLIENTS, get_vm, 1),
        ("pause+resume, sequential", 1, pause_resume, 2),
        ("pause+resume, 8 clients", CLIENTS, pause_resume, 2),
    ];
    for (name, clients, op, reqs_per_op) in rows {
        let (us, wall, conflicts) = measure(&sock, clients, op)?;
        let s = stats(us);
        let rate = (s.n * reqs_per_op) as f64 / wall.as_secs_f64();
        println!(
            "{name:<28} {:>5} {:>8.0} {:>8.0} {:>8.0} {rate:>8.0} {conflicts:>6}",
            s.n, s.p50, s.p99, s.max
        );
    }
    // The event loop of a running VM, without its vCPUs: the main thread (tid = pid).
    let pid = vm.pid();
    let a = thread_ns(pid, pid)?;
    std::thread::sleep(IDLE);
    let b = thread_ns(pid, pid)?;
    let loop_ms = (b - a) as f64 / 1e6;
    vm.stop(&sock)?;

    // An empty tern: only the API is alive.
    let idle = Tern::start(tern, &[], &sock, &log)?;
    let pid = idle.pid();
    let (t0, n0) = cpu(pid)?;
    let (thr0, fd0) = threads_and_fds(pid);
    std::thread::sleep(IDLE);
    let (t1, n1) = cpu(pid)?;
    let started = Instant::now();
    for i in 0..1000 {
        if i % 2 == 0 {
            get_vm(&sock)?;
        } else {
            expect(&sock, "GET", "/ping", &[200])?;
        }
    }
    let burst = started.elapsed();
    let (t2, n2) = cpu(pid)?;
    std::thread::sleep(IDLE);
    let (t3, n3) = cpu(pid)?;
    let (thr1, fd1) = threads_and_fds(pid);
    idle.stop(&sock)?;

    let secs = IDLE.as_secs();
    println!(
        "\n{:<50} {:>14} {:>14}",
        "tern CPU time", "utime+stime", "scheduler"
    );
    println!(
        "{:<50} {:>14} {:>11.3} ms",
        format!("running VM, VMM thread only, {secs} s"),
        "-",
        loop_ms
    );
    println!(
        "{:<50} {:>11.0} ms {:>11.3} ms",
        format!("empty tern, API socket open, idle {secs} s"),
        t1 - t0,
        (n1 - n0) as f64 / 1e6
    );
    println!(
        "{:<50} {:>11.0} ms {:>11.3} ms",
        format!("1000 requests ({:.0} ms wall)", burst.as_secs_f64() * 1e3),
        t2 - t1,
        (n2 - n1) as f64 / 1e6
    );
    println!(
        "{:<50} {:>11.0} ms {:>11.3} ms",
        format!("empty tern, idle {secs} s after the requests"),
        t3 - t2,
        (n3 - n2) as f64 / 1e6
    );
    println!(
        "\nempty tern: {thr0} threads, {fd0} fds before the requests; {thr1} threads, {fd1} fds after"
    );
    Ok(())
}
