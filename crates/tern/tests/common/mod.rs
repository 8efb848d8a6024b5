//! Shared helpers for tern's end-to-end tests: the tern binary, the probe guest, /dev/kvm
//! availability (a failure under CI=true, a loud skip elsewhere), and running a VM with a
//! hard timeout.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The tern binary under test.
pub fn tern() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tern"))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// Whether a missing resource must fail the test (CI) rather than skip it.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// True when /dev/kvm can be opened. Otherwise fails under CI=true and skips loudly elsewhere.
pub fn require_kvm(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if in_ci() {
                panic!("{test}: /dev/kvm is required under CI=true but cannot be opened: {e}");
            }
            eprintln!(
                "\n*** SKIPPED {test}: /dev/kvm cannot be opened ({e}); this test needs KVM ***\n"
            );
            false
        }
    }
}

/// The probe guest ELF: `$TERN_PROBE` if set, else built from guests/probe (once per run).
pub fn probe() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if let Some(p) = std::env::var("TERN_PROBE").ok().filter(|p| !p.is_empty()) {
                return PathBuf::from(p);
            }
            let dir = repo_root().join("guests/probe");
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "--release", "--quiet"])
                .current_dir(&dir)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .env_remove("CARGO_TARGET_DIR")
                .status()
                .expect("cannot run cargo to build the probe guest");
            assert!(status.success(), "building the probe guest failed");
            let candidates = [
                dir.join("target/x86_64-unknown-linux-gnu/release/probe"),
                dir.join("target/release/probe"),
            ];
            candidates
                .into_iter()
                .find(|p| p.exists())
                .expect("probe binary not found after build")
        })
        .clone()
}

/// Output of a finished (or killed) VMM process.
pub struct Run {
    /// Exit code (None when killed by a signal, e.g. on timeout).
    pub code: Option<i32>,
    /// Standard output (the guest console).
    pub stdout: String,
    /// Standard error (tern's own messages).
    pub stderr: String,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// Wall time.
    pub elapsed: Duration,
}

impl Run {
    /// Fields of the first `probe: <scenario> ok ...` line, panicking with the whole console
    /// when the scenario failed or did not report.
    pub fn scenario(&self, name: &str) -> HashMap<String, String> {
        let prefix = format!("probe: {name} ");
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| {
                panic!(
                    "no '{prefix}' line.\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.stdout, self.stderr
                )
            });
        let rest = &line[prefix.len()..];
        assert!(
            rest.starts_with("ok"),
            "scenario {name} failed: {line}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        parse_kv(rest.trim_start_matches("ok"))
    }
}

/// Parses `key=value key="quoted value" ...`.
pub fn parse_kv(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.trim().chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ' ' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                for c in chars.by_ref() {
                    if c == '"' {
                        break;
                    }
                    val.push(c);
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ' ' {
                        break;
                    }
                    val.push(c);
                    chars.next();
                }
            }
        }
        out.insert(key, val);
    }
    out
}

/// Runs `program args` with stdin closed, capturing output, killing it after `timeout`.
pub fn run_with_timeout(program: &Path, args: &[&str], timeout: Duration) -> Run {
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned(),
        timed_out,
        elapsed,
    }
}

/// Runs tern with `args`.
pub fn tern_run(args: &[&str], timeout: Duration) -> Run {
    let mut a = vec!["run"];
    a.extend_from_slice(args);
    run_with_timeout(&tern(), &a, timeout)
}

/// Boots the probe under tern with `probe.run=<scenarios>` and extra cmdline/flags.
pub fn probe_run(scenarios: &str, extra_cmdline: &str, flags: &[&str]) -> Run {
    let probe = probe();
    let cmdline = format!("probe.run={scenarios} {extra_cmdline}");
    let mut args = vec![
        "--kernel",
        probe.to_str().expect("utf-8 path"),
        "--cmdline",
        &cmdline,
        "--serial",
        "stdio",
    ];
    args.extend_from_slice(flags);
    tern_run(&args, Duration::from_secs(60))
}

/// The QEMU binary, or None (a loud skip; a failure under CI=true).
pub fn qemu(test: &str) -> Option<&'static Path> {
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    if qemu.exists() {
        return Some(qemu);
    }
    if in_ci() {
        panic!("qemu-system-x86_64 is required under CI=true (cargo xtask test installs it)");
    }
    eprintln!("\n*** SKIPPED {test}: qemu-system-x86_64 not installed ***\n");
    None
}

/// Boots the probe under QEMU (KVM, 64 MiB) on `machine` with `smp` vCPUs, the probe
/// command line `cmdline` and `extra` QEMU arguments (devices), with the debug-exit device
/// the probe ends through.
pub fn qemu_probe_run(qemu: &Path, machine: &str, smp: &str, cmdline: &str, extra: &[&str]) -> Run {
    let probe = probe();
    let mut args = vec![
        "-accel",
        "kvm",
        "-M",
        machine,
        // `-cpu host` alone fails on this kind of host (QEMU cannot set MSR 0x10a,
        // IA32_ARCH_CAPABILITIES).
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        smp,
        "-m",
        "64",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
        probe.to_str().expect("utf-8 path"),
        "-append",
        cmdline,
    ];
    args.extend_from_slice(extra);
    run_with_timeout(qemu, &args, Duration::from_secs(90))
}

/// A directory of one test, removed with everything in it when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh, empty directory named after the test binary's process and `name`.
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tern-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A path as the `&str` a command line takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `(tick, value)` of every complete `probe: count tick=K value=V` line of a serial file.
pub fn ticks(serial: &Path) -> Vec<(u64, u64)> {
    lines_after(serial, "probe: count tick=")
        .iter()
        .map(|rest| {
            let (t, v) = rest.split_once(" value=").expect("tick line");
            (t.parse().unwrap(), v.parse().unwrap())
        })
        .collect()
}

/// What follows `prefix` on every complete line of a serial file that starts with it (a line
/// still being written does not count).
#[allow(dead_code)]
pub fn lines_after(serial: &Path, prefix: &str) -> Vec<String> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix(prefix))
        .map(str::to_owned)
        .collect()
}

/// Polls `f` every 20 ms until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `qemu-img args`, failing the test (with its output) unless it succeeds.
pub fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (qemu-utils) is required");
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The threads of process `pid`, as (thread id, name); a thread that ends meanwhile is left
/// out.
pub fn threads(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let tid = e.file_name().to_str().unwrap().parse().unwrap();
        if let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) {
            out.push((tid, comm.trim().to_string()));
        }
    }
    out
}

/// Field `key` (`Uid`, `Seccomp`, …) of a `/proc` status file (`/proc/PID/status`,
/// `/proc/PID/task/TID/status`), its words joined by one space; `None` if the file or the
/// field is not there.
pub fn status_field(path: &str, key: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let v = s.lines().find_map(|l| l.strip_prefix(&format!("{key}:")))?;
    Some(v.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Whether this process may create network namespaces and TAP devices; otherwise fails under
/// CI=true and skips loudly elsewhere.
#[allow(dead_code)]
pub fn require_netns(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && ip && Path::new("/dev/net/tun").exists() {
        return true;
    }
    let why = format!("root: {root}, ip(8): {ip}, /dev/net/tun present");
    if in_ci() {
        panic!("{test}: needs root, iproute2 and /dev/net/tun under CI=true ({why})");
    }
    eprintln!("\n*** SKIPPED {test}: needs root, iproute2 and /dev/net/tun ({why}) ***\n");
    false
}

/// A `tern run` process, killed when dropped.
pub struct Tern(pub Child);

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Tern {
    /// Waits for it to exit; its status and standard error.
    pub fn finish(mut self, timeout: Duration) -> (Option<i32>, String) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.0.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return (st.code(), err);
            }
            assert!(
                t0.elapsed() < timeout,
                "tern did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }

    /// Its resident memory, in bytes.
    #[allow(dead_code)]
    pub fn rss(&self) -> u64 {
        let kb = status_field(&format!("/proc/{}/status", self.0.id()), "VmRSS")
            .and_then(|v| v.trim_end_matches(" kB").parse::<u64>().ok())
            .expect("VmRSS");
        kb << 10
    }
}

/// `tern run ARGS`, its standard error piped.
pub fn spawn(args: &[&str]) -> Tern {
    let mut a = vec!["run"];
    a.extend_from_slice(args);
    Tern(
        Command::new(tern())
            .args(&a)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tern"),
    )
}

/// Restores the snapshot in `snap` in a new tern with its API on `sock` and its serial port in
/// `serial`; returns it once its VM runs, with a client for its API.
pub fn restored(snap: &Path, sock: &Path, serial: &Path) -> (Tern, api::client::Client) {
    let backend = format!("file:{}", s(serial));
    let t = spawn(&[
        "--restore",
        s(snap),
        "--serial",
        &backend,
        "--api-socket",
        s(sock),
    ]);
    wait_until("the restored API", Duration::from_secs(20), || {
        sock.exists()
    });
    let c = api::client::Client::new(sock);
    wait_until("the restored VM", Duration::from_secs(20), || {
        c.info().is_ok_and(|i| i.state.as_str() == "running")
    });
    (t, c)
}

/// Pauses the VM behind `c` and writes its snapshot to `snap`; both must succeed.
#[allow(dead_code)]
pub fn pause_and_snapshot(c: &api::client::Client, snap: &Path) {
    let (st, b) = c.call("PUT", "/v1/vm/pause", None).unwrap();
    assert_eq!(st, 204, "pause: {b}");
    let body = format!(r#"{{"dir":"{}"}}"#, s(snap));
    let (st, b) = c.call("PUT", "/v1/vm/snapshot", Some(&body)).unwrap();
    assert_eq!(st, 204, "snapshot: {b}");
}

/// What `tern info` prints for the VM on `sock`.
#[allow(dead_code)]
pub fn tern_info(sock: &Path) -> String {
    let r = run_with_timeout(
        &tern(),
        &["info", "--api-socket", s(sock)],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(0), "tern info: {}", r.stderr);
    r.stdout
}

/// A 64 MiB probe guest counting for 20 s with its API on `sock` and no serial output; returns
/// it once its VM runs, with a client for its API.
pub fn counting_vm(sock: &Path) -> (Tern, api::client::Client) {
    running_vm(sock, "none", "probe.run=count probe.count_ms=20000", &[])
}

/// A 64 MiB probe guest with its API on `sock`, serial backend `serial`, command line
/// `cmdline` and `extra` arguments; returns it once its VM runs, with a client for its API.
pub fn running_vm(
    sock: &Path,
    serial: &str,
    cmdline: &str,
    extra: &[&str],
) -> (Tern, api::client::Client) {
    let kernel = probe();
    let mut args = vec![
        "--kernel",
        s(&kernel),
        "--memory",
        "64M",
        "--serial",
        serial,
        "--api-socket",
        s(sock),
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    let t = spawn(&args);
    wait_until("the API", Duration::from_secs(20), || sock.exists());
    let c = api::client::Client::new(sock);
    wait_until("the VM", Duration::from_secs(20), || {
        c.info().is_ok_and(|i| i.state.as_str() == "running")
    });
    (t, c)
}

/// `tern run --incoming url` with `args`, once it listens.
pub fn listening(url: &str, args: &[&str]) -> Tern {
    if let Some(p) = url.strip_prefix("unix:") {
        // A killed destination leaves its socket behind: it must not pass for the new one's.
        let _ = std::fs::remove_file(p);
    }
    let mut a = vec!["--incoming", url];
    a.extend_from_slice(args);
    let t = spawn(&a);
    if let Some(p) = url.strip_prefix("unix:") {
        wait_until("the migration socket", Duration::from_secs(10), || {
            Path::new(p).exists()
        });
    } else if let Some(port) = url.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) {
        // Listening, as the kernel sees it (connecting would start a migration).
        let want = format!(":{port:04X} 00000000:0000 0A");
        wait_until("the migration listener", Duration::from_secs(10), || {
            std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| t.contains(&want))
        });
    }
    t
}
