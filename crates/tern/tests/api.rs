//! The control API end to end (`tern run --api-socket PATH` and the client verbs): pause and
//! resume of a running probe (`count`: a ring-3 counter that prints numbered ticks), shutdown
//! through the power button, a VM configured and booted through the API, a contract fuzz of
//! every route against the OpenAPI document, raw protocol abuse, and the socket's handling
//! (mode, a second tern on a live socket, a stale socket after SIGKILL).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::client::{call, Client};
use common::*;
use serde_json::Value;
use vmm::api::{MAX_BODY, ROUTES};

/// A `tern run` in the background, killed (SIGKILL) when dropped.
struct Tern {
    child: Option<Child>,
    out: Option<JoinHandle<Vec<u8>>>,
    err: Option<JoinHandle<Vec<u8>>>,
    start: Instant,
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

impl Tern {
    /// Starts `tern run ARGS`.
    fn run(args: &[&str]) -> Self {
        let mut child = Command::new(tern())
            .arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start tern");
        let out = drain(child.stdout.take().unwrap());
        let err = drain(child.stderr.take().unwrap());
        Tern {
            child: Some(child),
            out: Some(out),
            err: Some(err),
            start: Instant::now(),
        }
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().unwrap().is_some())
    }

    /// Waits for the process to end (SIGKILL after `timeout`); its outcome.
    fn wait(mut self, timeout: Duration) -> Run {
        let mut child = self.child.take().unwrap();
        let t0 = Instant::now();
        let mut timed_out = false;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > timeout {
                timed_out = true;
                let _ = child.kill();
                break child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let text = |h: Option<JoinHandle<Vec<u8>>>| {
            String::from_utf8_lossy(&h.unwrap().join().unwrap_or_default()).into_owned()
        };
        Run {
            code: status.code(),
            stdout: text(self.out.take()),
            stderr: text(self.err.take()),
            timed_out,
            elapsed: self.start.elapsed(),
        }
    }

    /// Sends SIGKILL and reaps the process.
    fn kill(mut self) -> Run {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        }
        self.wait(Duration::from_secs(10))
    }

    /// Waits until the API socket answers GET /ping; panics with tern's output if it exited.
    fn ready(mut self, sock: &Path) -> Self {
        let t0 = Instant::now();
        loop {
            if let Ok((200, _)) = call(sock, "GET", "/ping", None) {
                return self;
            }
            if self.exited() {
                let r = self.wait(Duration::from_secs(1));
                panic!(
                    "tern exited ({:?}) before serving the API\n{}\n{}",
                    r.code, r.stdout, r.stderr
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the API socket never answered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the client `tern ARGS` (info, pause, ...).
fn client(args: &[&str]) -> Run {
    run_with_timeout(&tern(), args, Duration::from_secs(30))
}

fn client_ok(args: &[&str]) -> Run {
    let r = client(args);
    assert!(
        r.code == Some(0),
        "tern {args:?}: exit {:?}\n{}\n{}",
        r.code,
        r.stdout,
        r.stderr
    );
    r
}

fn assert_contiguous(t: &[(u64, u64)]) {
    for (i, w) in t.iter().enumerate() {
        assert_eq!(w.0, i as u64 + 1, "tick numbers have a gap: {t:?}");
    }
    for w in t.windows(2) {
        assert!(w[1].1 > w[0].1, "tick values do not grow: {t:?}");
    }
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

fn error_of(body: &str) -> String {
    json(body)["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {body:?}"))
        .to_string()
}

/// The probe's `count` scenario under tern with an API socket and the serial port in a file.
fn count_vm(dir: &Scratch, count_ms: u64, extra: &[&str]) -> (Tern, PathBuf, PathBuf) {
    let sock = dir.path("api.sock");
    let serial = dir.path("serial.txt");
    let probe = probe();
    let cmdline = format!("probe.run=count probe.count_ms={count_ms}");
    let serial_arg = format!("file:{}", s(&serial));
    let mut args = vec![
        "--kernel",
        s(&probe),
        "--cmdline",
        &cmdline,
        "--memory",
        "64M",
        "--serial",
        &serial_arg,
        "--api-socket",
        s(&sock),
    ];
    args.extend_from_slice(extra);
    let vm = Tern::run(&args).ready(&sock);
    (vm, sock, serial)
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if !require_kvm("pause_stops_the_guest_and_resume_continues_it") {
        return;
    }
    let dir = Scratch::new("pause");
    let (vm, sock, serial) = count_vm(&dir, 8000, &[]);
    let sock_s = s(&sock);
    wait_until("3 ticks", Duration::from_secs(20), || {
        ticks(&serial).len() >= 3
    });

    let r = client_ok(&["pause", "--api-socket", sock_s]);
    assert_eq!(r.stdout.trim(), "paused");
    // A line the guest printed just before its vCPU parked may still be on its way to the file.
    std::thread::sleep(Duration::from_millis(200));
    let before = ticks(&serial);
    std::thread::sleep(Duration::from_millis(1500));
    let during = ticks(&serial);
    assert_eq!(before, during, "the guest kept printing while paused");

    let r = client_ok(&["info", "--api-socket", sock_s]);
    assert!(r.stdout.contains("state: paused"), "{}", r.stdout);
    let r = client_ok(&["info", "--api-socket", sock_s, "--json"]);
    assert_eq!(json(&r.stdout)["state"], "paused", "{}", r.stdout);

    // Pausing twice is a conflict, and the client says what the server said.
    let r = client(&["pause", "--api-socket", sock_s]);
    assert_ne!(r.code, Some(0), "second pause succeeded: {}", r.stdout);
    assert!(
        r.stderr.contains("cannot pause: the VM is paused already") && r.stderr.contains("409"),
        "{}",
        r.stderr
    );
    // The power button of a paused VM is refused too.
    let r = client(&["shutdown", "--api-socket", sock_s]);
    assert_ne!(r.code, Some(0));
    assert!(r.stderr.contains("409"), "{}", r.stderr);

    let r = client_ok(&["resume", "--api-socket", sock_s]);
    assert_eq!(r.stdout.trim(), "resumed");
    wait_until("ticks after resume", Duration::from_secs(10), || {
        ticks(&serial).len() >= before.len() + 3
    });
    let after = ticks(&serial);
    assert_eq!(
        after[before.len()].0,
        before.last().unwrap().0 + 1,
        "resume did not continue with the next tick: {after:?}"
    );
    assert_contiguous(&after);

    let r = client(&["resume", "--api-socket", sock_s]);
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr.contains("cannot resume: the VM is running") && r.stderr.contains("409"),
        "{}",
        r.stderr
    );
    let r = client_ok(&["info", "--api-socket", sock_s]);
    assert!(r.stdout.contains("state: running"), "{}", r.stdout);

    let r = client_ok(&["shutdown", "--force", "--api-socket", sock_s]);
    assert_eq!(r.stdout.trim(), "stopping the VM");
    let run = vm.wait(Duration::from_secs(10));
    assert!(
        run.code == Some(0) && run.stderr.contains("stopped through the API"),
        "exit {:?}\n{}",
        run.code,
        run.stderr
    );
    assert!(!sock.exists(), "tern left its API socket behind");
    // The VM ended there: the scenario did not get to finish.
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(!text.contains("probe: count ok"), "{text}");
}

/// `call`, but failing the test instead of waiting when tern does not answer in `limit`.
fn call_within(sock: &Path, method: &str, path: &str, limit: Duration) -> (u16, String) {
    Client::new(sock)
        .with_timeout(Some(limit))
        .call(method, path, None)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// A pipe whose buffer is already full (read end, write end, bytes in it): a stdout nobody
/// reads.
fn full_pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd, usize) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-int array it is given.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut filler = 0usize;
    // SAFETY: fcntl on a descriptor we own.
    let fl = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) };
    let mut w = std::fs::File::from(wr.try_clone().unwrap());
    while let Ok(n) = w.write(&[b'.'; 4096]) {
        filler += n;
    }
    // SAFETY: as above; tern gets a blocking pipe, as a shell gives it.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETFL, fl) };
    (rd, wr, filler)
}

#[test]
fn a_serial_stdout_nobody_reads_does_not_stall_the_guest() {
    if !require_kvm("a_serial_stdout_nobody_reads_does_not_stall_the_guest") {
        return;
    }
    let dir = Scratch::new("serial-stall");
    let sock = dir.path("api.sock");
    // tern's stdout: a pipe that is full before tern starts, and that nobody reads for now.
    let (rd, wr, filler) = full_pipe();
    let kernel = probe();
    let mut child = Command::new(tern())
        .args([
            "run",
            "--kernel",
            s(&kernel),
            "--memory",
            "64M",
            "--serial",
            "stdio",
            "--cmdline",
            "probe.run=count probe.count_ms=4000",
            "--api-socket",
            s(&sock),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::from(wr))
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start tern");
    let err = drain(child.stderr.take().unwrap());
    let vm = Tern {
        child: Some(child),
        // Its stdout is the pipe, read below.
        out: Some(std::thread::spawn(Vec::new)),
        err: Some(err),
        start: Instant::now(),
    }
    .ready(&sock);
    // The guest prints a line at once and a tick every 100 ms: none of it can be written.
    std::thread::sleep(Duration::from_millis(1000));
    let (st, body) = call_within(&sock, "GET", "/v1/vm", Duration::from_secs(5));
    assert_eq!(st, 200, "{body}");
    assert_eq!(json(&body)["state"], "running", "{body}");
    // ... and the guest runs on: its vCPU keeps exiting to write its ticks.
    let pio = || {
        let client = Client::new(&sock).with_timeout(Some(Duration::from_secs(5)));
        client.counters().unwrap().vcpus[0].pio_exits
    };
    let a = pio();
    std::thread::sleep(Duration::from_millis(500));
    let b = pio();
    assert!(b > a, "the guest stopped: {a} then {b} port exits");
    // Reading the pipe now gets the guest's output, whole.
    let reader = drain(std::fs::File::from(rd));
    let r = vm.wait(Duration::from_secs(30));
    let out = reader.join().unwrap();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let text = String::from_utf8_lossy(&out[filler..]).into_owned();
    assert!(text.starts_with("probe: hello ok"), "{text}");
    assert!(
        text.contains("probe: count ok") && text.contains("probe: done status=0"),
        "{text}\n{}",
        r.stderr
    );
}

/// The virtio-console writing to a stdout nobody reads: its worker must not block on it, or
/// the guest's driver (which resets the device when its line is not taken in time) and any
/// pause would wait for it for good. The guest runs on, pauses and resumes, and reading the
/// pipe then gets its line.
#[test]
fn a_console_stdout_nobody_reads_does_not_stall_the_guest() {
    if !require_kvm("a_console_stdout_nobody_reads_does_not_stall_the_guest") {
        return;
    }
    let dir = Scratch::new("console-stall");
    let sock = dir.path("api.sock");
    let serial = dir.path("serial.log");
    let backend = format!("file:{}", s(&serial));
    let (rd, wr, filler) = full_pipe();
    let kernel = probe();
    let mut child = Command::new(tern())
        .args([
            "run",
            "--kernel",
            s(&kernel),
            "--memory",
            "64M",
            "--serial",
            &backend,
            "--console",
            "stdio",
            "--cmdline",
            "probe.run=vcons,count probe.count_ms=3000",
            "--api-socket",
            s(&sock),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::from(wr))
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start tern");
    let err = drain(child.stderr.take().unwrap());
    let vm = Tern {
        child: Some(child),
        out: Some(std::thread::spawn(Vec::new)),
        err: Some(err),
        start: Instant::now(),
    }
    .ready(&sock);
    wait_until("2 ticks after vcons", Duration::from_secs(20), || {
        ticks(&serial).len() >= 2
    });
    let (st, body) = call_within(&sock, "PUT", "/v1/vm/pause", Duration::from_secs(20));
    assert_eq!(st, 204, "{body}");
    let (st, body) = call_within(&sock, "PUT", "/v1/vm/resume", Duration::from_secs(5));
    assert_eq!(st, 204, "{body}");
    let reader = drain(std::fs::File::from(rd));
    let r = vm.wait(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(
        text.contains("probe: vcons ok") && text.contains("probe: count ok"),
        "{text}"
    );
    let out = reader.join().unwrap();
    assert_eq!(&out[filler..], b"probe: hvc0 hello\n");
}

/// A disk whose I/O hangs (its worker thread stopped under ptrace, as a thread stuck in a
/// hung NFS or a dead device would be): a pause fails after the deadline naming the disk, the
/// API is served and the VM runs on; once the disk's thread goes on, the guest does too and a
/// pause works.
#[test]
fn a_pause_fails_by_name_on_a_hung_disk_and_the_vm_runs_on() {
    if !require_kvm("a_pause_fails_by_name_on_a_hung_disk_and_the_vm_runs_on") {
        return;
    }
    let dir = Scratch::new("pause-hung-disk");
    let sock = dir.path("api.sock");
    let serial = dir.path("serial.log");
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", s(&disk));
    let backend = format!("file:{}", s(&serial));
    let kernel = probe();
    let vm = Tern::run(&[
        "--kernel",
        s(&kernel),
        "--memory",
        "64M",
        "--serial",
        &backend,
        "--disk",
        &disk_arg,
        "--cmdline",
        "probe.run=count probe.count_blk=1 probe.count_ms=8000 probe.virtio_timeout_ms=60000",
        "--api-socket",
        s(&sock),
    ])
    .ready(&sock);
    let blk_ticks = || {
        std::fs::read_to_string(&serial)
            .unwrap_or_default()
            .matches("probe: count blk tick=")
            .count()
    };
    wait_until("disk I/O", Duration::from_secs(20), || blk_ticks() >= 2);
    // Stop the disk's worker thread.
    let pid = vm.child.as_ref().unwrap().id();
    let tid: i32 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| t.ok())
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "virtio-blk-q0")
        })
        .expect("no virtio-blk-q0 thread")
        .file_name()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: ptrace on a thread of our own child; no memory is passed.
    let seized = unsafe {
        libc::ptrace(libc::PTRACE_SEIZE, tid, 0usize, 0usize) == 0
            && libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0usize, 0usize) == 0
    };
    if !seized {
        let e = std::io::Error::last_os_error();
        assert!(!in_ci(), "cannot ptrace tern's disk thread: {e}");
        eprintln!("\n*** SKIPPED a_pause_fails_by_name_on_a_hung_disk_and_the_vm_runs_on: cannot ptrace ({e}) ***\n");
        return;
    }
    /// Lets the thread go on when dropped, also when the test fails (a thread left stopped
    /// would keep tern from being reaped).
    struct Detach(i32);
    impl Drop for Detach {
        fn drop(&mut self) {
            // SAFETY: ptrace on the thread this test stopped; no memory is passed.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0usize, 0usize) };
        }
    }
    let stopped = Detach(tid);
    let mut st = 0;
    // SAFETY: waits for the stop of the thread just interrupted.
    assert_eq!(unsafe { libc::waitpid(tid, &mut st, libc::__WALL) }, tid);
    let t0 = Instant::now();
    let (code, body) = call_within(&sock, "PUT", "/v1/vm/pause", Duration::from_secs(20));
    let took = t0.elapsed();
    let (state_code, state) = call_within(&sock, "GET", "/v1/vm", Duration::from_secs(5));
    drop(stopped);
    assert_eq!(code, 500, "{body}");
    let want = format!(
        "cannot pause: virtio-blk disk0 ({}) did not finish its in-flight I/O and stop within 5.0 s; the VM keeps running",
        disk.display()
    );
    assert_eq!(error_of(&body), want);
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert_eq!(state_code, 200);
    assert_eq!(json(&state)["state"], "running", "{state}");
    // The disk goes on, the guest with it, and a pause works.
    let n = blk_ticks();
    wait_until(
        "disk I/O after the failed pause",
        Duration::from_secs(20),
        || blk_ticks() >= n + 2,
    );
    let (code, body) = call_within(&sock, "PUT", "/v1/vm/pause", Duration::from_secs(20));
    assert_eq!(code, 204, "{body}");
    let (code, body) = call_within(&sock, "PUT", "/v1/vm/resume", Duration::from_secs(5));
    assert_eq!(code, 204, "{body}");
    let r = vm.wait(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.contains("probe: count ok"), "{text}");
}

#[test]
fn shutdown_presses_the_power_button_and_times_out() {
    if !require_kvm("shutdown_presses_the_power_button_and_times_out") {
        return;
    }
    let dir = Scratch::new("button");
    let (vm, sock, serial) = count_vm(&dir, 60_000, &["--shutdown-timeout", "1"]);
    wait_until("a tick", Duration::from_secs(20), || {
        !ticks(&serial).is_empty()
    });
    let t0 = Instant::now();
    let r = client_ok(&["shutdown", "--api-socket", s(&sock)]);
    assert_eq!(r.stdout.trim(), "pressed the power button");
    let run = vm.wait(Duration::from_secs(15));
    let took = t0.elapsed();
    assert!(
        run.code == Some(0) && run.stderr.contains("did not power off within 1 s"),
        "exit {:?} after {took:?}\n{}",
        run.code,
        run.stderr
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "stopped {took:?} after the button"
    );
    // The probe ignores ACPI: it kept counting until tern stopped it.
    assert!(ticks(&serial).len() >= 5, "{:?}", ticks(&serial));
}

#[test]
fn a_vm_configured_and_booted_through_the_api() {
    if !require_kvm("a_vm_configured_and_booted_through_the_api") {
        return;
    }
    let dir = Scratch::new("boot");
    let sock = dir.path("api.sock");
    let serial = dir.path("serial.txt");
    let vm = Tern::run(&["--api-socket", s(&sock)]).ready(&sock);
    let state = || {
        let (st, body) = call(&sock, "GET", "/v1/vm", None).unwrap();
        assert_eq!(st, 200, "{body}");
        json(&body)["state"].as_str().unwrap().to_string()
    };
    let put_vm = |body: &str| call(&sock, "PUT", "/v1/vm", Some(body)).unwrap();
    let boot = || call(&sock, "PUT", "/v1/vm/boot", None).unwrap();

    assert_eq!(state(), "created");
    let (st, body) = boot();
    assert_eq!(st, 409, "{body}");
    assert!(error_of(&body).contains("not configured"), "{body}");

    let (st, body) = put_vm(r#"{"kernel": "/x", "memory": "#);
    assert_eq!(st, 400, "{body}");
    error_of(&body);
    let (st, body) = put_vm(r#"{"kernel": "/x", "vcpus_please": 2}"#);
    assert_eq!(st, 400, "{body}");
    assert!(error_of(&body).contains("vcpus_please"), "{body}");
    let big = format!(
        r#"{{"kernel": "/x", "cmdline": "{}"}}"#,
        "a".repeat(MAX_BODY)
    );
    let (st, body) = put_vm(&big);
    assert_eq!(st, 413, "{body}");
    error_of(&body);
    let probe = probe();
    let (st, body) = put_vm(&format!(r#"{{"kernel": "{}", "cpus": 0}}"#, s(&probe)));
    assert_eq!(st, 400, "{body}");
    assert!(error_of(&body).contains("cpus"), "{body}");
    assert_eq!(state(), "created");

    // A kernel that does not exist is a failed boot, not the end of tern.
    let missing = dir.path("no-such-kernel");
    let cfg = |kernel: &Path| {
        serde_json::json!({
            "kernel": s(kernel),
            "cmdline": "probe.run=hello",
            "memory": 64,
            "serial": format!("file:{}", s(&serial)),
        })
        .to_string()
    };
    let (st, body) = put_vm(&cfg(&missing));
    assert_eq!(st, 204, "{body}");
    assert_eq!(state(), "configured");
    let (st, body) = boot();
    assert_eq!(st, 400, "{body}");
    assert!(error_of(&body).contains(s(&missing)), "{body}");
    assert_eq!(call(&sock, "GET", "/ping", None).unwrap().0, 200);
    assert_eq!(state(), "configured");

    let (st, body) = put_vm(&cfg(&probe));
    assert_eq!(st, 204, "{body}");
    let (st, body) = call(&sock, "GET", "/v1/vm", None).unwrap();
    assert_eq!(st, 200);
    let info = json(&body);
    assert_eq!(info["state"], "configured", "{body}");
    assert_eq!(info["config"]["kernel"], s(&probe), "{body}");
    assert_eq!(info["config"]["memory"], "64M", "{body}");
    let (st, body) = boot();
    assert_eq!(st, 204, "{body}");
    let run = vm.wait(Duration::from_secs(30));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.contains("probe: hello ok"), "{text}");
    assert!(!sock.exists(), "tern left its API socket behind");
}

/// xorshift64*: deterministic, so a failing request can be replayed with its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T: ?Sized>(&mut self, v: &[&'a T]) -> &'a T {
        v[self.below(v.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// A response: status, headers (lower-case names), body.
struct Resp {
    status: u16,
    headers: String,
    body: String,
}

/// Sends `head` and `body` as they are, reads the whole response (the request asks for
/// `Connection: close`). Write errors are ignored: the server may answer (413) and close
/// before it has read a large body.
fn exchange(sock: &Path, head: &[u8], body: &[u8]) -> std::io::Result<Resp> {
    let mut c = UnixStream::connect(sock)?;
    c.set_read_timeout(Some(Duration::from_secs(15)))?;
    c.set_write_timeout(Some(Duration::from_secs(15)))?;
    let _ = c.write_all(head).and_then(|_| c.write_all(body));
    let mut resp = Vec::new();
    // A server that answers before reading the whole body closes with that body unread, which
    // a Unix socket reports as a reset after the response: the response counts.
    if let Err(e) = c.read_to_end(&mut resp) {
        if e.kind() == std::io::ErrorKind::ConnectionReset && !resp.is_empty() {
            return parse_response(&resp);
        }
        return Err(std::io::Error::other(format!(
            "{e} after {} bytes: {:?}",
            resp.len(),
            String::from_utf8_lossy(&resp)
        )));
    }
    parse_response(&resp)
}

fn parse_response(resp: &[u8]) -> std::io::Result<Resp> {
    let text = String::from_utf8_lossy(resp).into_owned();
    let bad = |why: &str| std::io::Error::other(format!("{why}: {text:?}"));
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers = head.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut s = rest;
        while let Some((size, r)) = s.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).map_err(|_| bad("bad chunk"))?;
            if n == 0 {
                break;
            }
            out.push_str(r.get(..n).ok_or_else(|| bad("short chunk"))?);
            s = r[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        rest.to_string()
    };
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// One HTTP/1.1 request with `Connection: close`.
fn request(
    sock: &Path,
    method: &str,
    target: &str,
    headers: &[String],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: tern\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    exchange(sock, head.as_bytes(), body)
}

/// The statuses docs/api/openapi.json documents for each (method, path).
fn documented() -> Vec<(String, String, BTreeSet<u16>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api/openapi.json");
    let doc = json(&std::fs::read_to_string(path).unwrap());
    let mut out = Vec::new();
    for (p, item) in doc["paths"].as_object().unwrap() {
        for (m, op) in item.as_object().unwrap() {
            let codes = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse().unwrap())
                .collect();
            out.push((m.to_uppercase(), p.clone(), codes));
        }
    }
    out
}

/// A random JSON-ish value for a VM config field: right or wrong type, huge, unicode, ...
fn field_value(rng: &mut Rng, field: &str) -> String {
    let good: &[&str] = match field {
        // Never a file that exists: the fuzz may ask for a boot, which must fail.
        "kernel" | "initrd" => &[
            r#""/nonexistent/tern-fuzz/kernel""#,
            r#""relative/nonexistent""#,
            r#""""#,
            r#""/nonexistent/\u00fc\u20ac\ud83d\ude00""#,
            r#""/nonexistent/ü€😀""#,
        ],
        "cmdline" => &[
            r#""console=ttyS0""#,
            r#""""#,
            r#""a\u0000b""#,
            r#""ünïcödé €€€ 😀""#,
            r#""\ud800""#,
        ],
        "cpus" => &["1", "2", "0", "255", "254"],
        "memory" => &[
            "64",
            "0",
            "15",
            r#""64M""#,
            r#""1G""#,
            r#""4097K""#,
            r#""2T""#,
            r#""-1M""#,
            r#""lots""#,
            "17592186044416",
        ],
        "serial" => &[r#""none""#, r#""stdio""#, r#""file:""#, r#""bogus:x""#],
        "console" => &["null", r#""none""#, r#""stdio""#],
        "boot_protocol" => &[r#""pvh""#, r#""linux""#, r#""auto""#, r#""PVH""#],
        "decompress" => &[r#""host""#, r#""guest""#, r#""moon""#],
        "on_reboot" => &[r#""exit""#, r#""restart""#, r#""never""#],
        "transport" => &[r#""pci""#, r#""mmio""#, r#""usb""#],
        "rng" => &["true", "false", "1"],
        "disks" => &[
            "[]",
            r#"[{"path": "/nonexistent/d.img"}]"#,
            r#"[{"path": "/nonexistent/d.img", "queues": 0}]"#,
            r#"[{"path": "/nonexistent/d.img", "serial": "a-serial-far-too-long-for-virtio"}]"#,
            r#"[{"path": "/nonexistent/d.img", "format": "vmdk"}]"#,
            r#"[{"path": "/nonexistent/d.img", "bogus": 1}]"#,
            r#"[{}]"#,
            r#"{}"#,
        ],
        "nets" => &[
            "[]",
            r#"[{"tap": "auto"}]"#,
            r#"[{"tap": "a/b"}]"#,
            r#"[{"tap": "auto", "mtu": 1}]"#,
            r#"[{"tap": "auto", "mac": "zz:zz"}]"#,
            r#"[{"tap": 5}]"#,
        ],
        "shutdown_timeout" => &[
            "0",
            "20",
            "86401",
            "-1",
            "18446744073709551615",
            "18446744073709551616",
        ],
        _ => &["1"],
    };
    match rng.below(10) {
        0 => rng
            .pick(&[
                "null",
                "true",
                "[]",
                "{}",
                "-0",
                "1e400",
                "-1",
                "3.5",
                "99999999999999999999999999999",
                r#""""#,
            ])
            .to_string(),
        1 => format!("{}{}", "[".repeat(200), "]".repeat(200)),
        _ => rng.pick(good).to_string(),
    }
}

const FIELDS: &[&str] = &[
    "kernel",
    "initrd",
    "cmdline",
    "cpus",
    "memory",
    "serial",
    "console",
    "boot_protocol",
    "decompress",
    "on_reboot",
    "transport",
    "rng",
    "disks",
    "nets",
    "shutdown_timeout",
];

/// A VM config body: some fields with random values, perhaps an unknown one.
fn config_body(rng: &mut Rng) -> String {
    if rng.chance(25) {
        // A valid one (whose kernel does not exist).
        return format!(
            r#"{{"kernel": "/nonexistent/tern-fuzz/{}", "cpus": {}, "memory": {}, "serial": "none", "cmdline": "ünïcödé €"}}"#,
            rng.below(100),
            1 + rng.below(4),
            16 + rng.below(64)
        );
    }
    let mut parts = Vec::new();
    for f in FIELDS {
        let keep = *f == "kernel" || rng.chance(30);
        if keep {
            parts.push(format!(r#""{f}": {}"#, field_value(rng, f)));
        }
    }
    if rng.chance(10) {
        parts.push(r#""frobnicate": 1"#.to_string());
    }
    if rng.chance(10) {
        // A duplicate key.
        parts.push(r#""cpus": 1"#.to_string());
    }
    format!("{{{}}}", parts.join(", "))
}

/// A random body: empty, garbage, broken or odd JSON, or a config.
fn random_body(rng: &mut Rng) -> Vec<u8> {
    match rng.below(12) {
        0 => Vec::new(),
        1 => {
            let n = rng.below(2000);
            rng.bytes(n)
        }
        2 => {
            let c = config_body(rng);
            let cut = rng.below(c.len());
            c.as_bytes()[..cut].to_vec()
        }
        3 => {
            let d = 1 + rng.below(30_000);
            format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes()
        }
        4 => rng
            .pick(&[
                "1e999999",
                "-99999999999999999999999999999999999999",
                "null",
                "[]",
                "\"\"",
                "true",
                "{\"kernel\": 1e400}",
                "{\"cpus\": 18446744073709551616}",
            ])
            .as_bytes()
            .to_vec(),
        5 => "\"\u{feff}ünïcödé\u{202e}\u{0}😀\"".as_bytes().to_vec(),
        6 => vec![0xff, 0xfe, b'{', 0xc3, 0x28, b'}'],
        7 => {
            // Just over the limit.
            let mut b = config_body(rng).into_bytes();
            b.resize(MAX_BODY + 1 + rng.below(4096), b' ');
            b
        }
        _ => config_body(rng).into_bytes(),
    }
}

/// A query string for /v1/vm/shutdown that is never valid (an unknown key is always in it),
/// so the fuzz never stops tern.
fn shutdown_query(rng: &mut Rng) -> String {
    let mut pairs: Vec<String> = Vec::new();
    for _ in 0..rng.below(4) {
        let p = match rng.below(6) {
            0 => format!(
                "force={}",
                rng.pick(&["true", "false", "1", "yes", "", "%00", "TRUE"])
            ),
            1 => "force".to_string(),
            2 => "=".to_string(),
            3 => String::new(),
            4 => {
                let n = 1 + rng.below(12);
                rng.bytes(n).iter().map(|b| format!("%{b:02x}")).collect()
            }
            _ => "force=true&force=false".to_string(),
        };
        pairs.push(p);
    }
    let unknown = format!("x{}=1", rng.below(1000));
    let at = rng.below(pairs.len() + 1);
    pairs.insert(at, unknown);
    pairs.join("&")
}

const UNKNOWN_PATHS: &[&str] = &[
    "/",
    "/v1",
    "/v1/",
    "/v1/vm/",
    "/v2/vm",
    "/V1/VM",
    "/v1/vm/restore",
    "/v1/vm/devices/disk0",
    "/v1/vm/boot/now",
    "/ping/",
    "/pingg",
    "/v1/vm/../vm",
    "/%00",
    "/v1/vm%2fboot",
    "/v1//vm",
];

const DEFAULT_SEED: u64 = 0x7465_726e_6170_6931;

/// ~300 requests to an empty tern (states created and configured, never booted): every route
/// with every method, random bodies, queries and paths. Every answer must be below 500, one the
/// OpenAPI document lists for the route (404/405 off the routes), a JSON `{"error"}` when it is
/// an error, and the one the VM's state calls for where that is known. `TERN_API_FUZZ_SEED`
/// replays another sequence.
#[test]
fn fuzz_every_route_with_random_requests() {
    let dir = Scratch::new("fuzz");
    let sock = dir.path("api.sock");
    let vm = Tern::run(&["--api-socket", s(&sock)]).ready(&sock);
    let seed: u64 = std::env::var("TERN_API_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let mut rng = Rng(seed);
    let docs = documented();
    // Every route the server claims is documented, and the reverse.
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let doc_routes: BTreeSet<(String, String)> = docs
        .iter()
        .map(|(m, p, _)| (m.clone(), p.clone()))
        .collect();
    assert_eq!(served, doc_routes);
    let paths: BTreeSet<&str> = ROUTES.iter().map(|(_, p)| *p).collect();
    let paths: Vec<&str> = paths.into_iter().collect();
    const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "PATCH"];

    let mut configured = false;
    let mut seen = BTreeSet::new();
    let mut n = 0;
    // Every route with every method, then random requests.
    let mut plan: Vec<(String, String)> = Vec::new();
    for p in &paths {
        for m in METHODS {
            plan.push((m.to_string(), p.to_string()));
        }
    }
    while plan.len() < 300 {
        let (m, p) = match rng.below(10) {
            0..=3 => (rng.pick(METHODS), rng.pick(&paths)),
            4..=5 => ("PUT", "/v1/vm"),
            6 => ("PUT", "/v1/vm/shutdown"),
            7 => ("PUT", "/v1/vm/boot"),
            8 => ("GET", "/v1/vm"),
            _ => (rng.pick(METHODS), rng.pick(UNKNOWN_PATHS)),
        };
        plan.push((m.to_string(), p.to_string()));
    }
    for (method, path) in plan {
        n += 1;
        let mut target = path.clone();
        let route = docs.iter().find(|(m, p, _)| *m == method && *p == path);
        let known_path = paths.contains(&path.as_str());
        // PUT /v1/vm/shutdown always gets one (never a valid one), the others sometimes.
        if (path == "/v1/vm/shutdown" && method == "PUT") || rng.chance(15) {
            target = format!("{path}?{}", shutdown_query(&mut rng));
        }
        let body = random_body(&mut rng);
        let mut headers = Vec::new();
        let chunked = rng.chance(10);
        if chunked {
            headers.push("Transfer-Encoding: chunked".to_string());
        } else {
            headers.push(format!("Content-Length: {}", body.len()));
        }
        let mut json_ct = false;
        if !body.is_empty() || rng.chance(20) {
            let ct = rng.pick(&[
                "application/json",
                "application/json",
                "application/json",
                "application/json; charset=utf-8",
                "application/vnd.tern+json",
                "text/plain",
                "",
            ]);
            if !ct.is_empty() {
                headers.push(format!("Content-Type: {ct}"));
            }
            json_ct = ct.contains("json");
        }
        let wire = if chunked {
            let mut w = Vec::new();
            for c in body.chunks(1 + rng.below(9000)) {
                w.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                w.extend_from_slice(c);
                w.extend_from_slice(b"\r\n");
            }
            w.extend_from_slice(b"0\r\n\r\n");
            w
        } else {
            body.clone()
        };
        let what = format!(
            "request {n} (seed {seed:#x}): {method} {target} chunked={chunked} {headers:?} body {} bytes: {:?}",
            body.len(),
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
        let r = request(&sock, &method, &target, &headers, &wire)
            .unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        seen.insert(r.status);
        assert!(r.status < 500, "{what}: {} {}", r.status, r.body);
        // The statuses this request may get, per the OpenAPI document and the model's state.
        let allowed: BTreeSet<u16> = match route {
            Some((_, _, codes)) => codes.clone(),
            None if known_path => [405].into(),
            None => [404].into(),
        };
        assert!(
            allowed.contains(&r.status),
            "{what}: status {} is not documented (allowed {allowed:?}): {}",
            r.status,
            r.body
        );
        if r.status >= 400 {
            assert!(
                r.headers.contains("content-type: application/json"),
                "{what}: {}",
                r.headers
            );
            let e = error_of(&r.body);
            assert!(!e.is_empty(), "{what}");
        }
        // What the state allows.
        let expect: Option<u16> = match (method.as_str(), path.as_str()) {
            _ if route.is_none() => None,
            ("GET", "/ping") => Some(200),
            ("GET", "/v1/vm") => Some(200),
            ("PUT", "/v1/vm/shutdown") => Some(400),
            ("PUT", "/v1/vm/boot") if configured => Some(400),
            ("PUT", "/v1/vm/boot") => Some(409),
            ("PUT", "/v1/vm/pause" | "/v1/vm/resume" | "/v1/vm/reboot") => Some(409),
            ("GET", "/v1/vm/counters") => Some(409),
            ("PUT", "/v1/vm") if body.len() > MAX_BODY && json_ct => Some(413),
            _ => None,
        };
        if let Some(e) = expect {
            assert_eq!(r.status, e, "{what}: {}", r.body);
        }
        if method == "PUT" && path == "/v1/vm" && r.status == 204 {
            configured = true;
        }
        if method == "GET" && path == "/v1/vm" {
            let want = if configured { "configured" } else { "created" };
            assert_eq!(json(&r.body)["state"], want, "{what}: {}", r.body);
        }
    }
    // The default mix reaches every kind of answer the empty VM has (another seed may not).
    if seed == DEFAULT_SEED {
        for st in [200, 204, 400, 404, 405, 409, 413] {
            assert!(seen.contains(&st), "no request got {st}; seen {seen:?}");
        }
    }

    // Raw protocol abuse: garbage that is not HTTP, a request cut short, a connection that
    // says nothing while others are served.
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    let idle = UnixStream::connect(&sock).unwrap();
    for i in 0..20 {
        let len = 1 + rng.below(4096);
        let mut junk = rng.bytes(len);
        if i % 4 == 0 {
            junk = b"GET /ping HTTP/9.9\r\n\r\n".to_vec();
        } else if i % 4 == 1 {
            junk.extend_from_slice(b"\r\n\r\n");
        }
        let mut c = UnixStream::connect(&sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(&junk);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut resp = Vec::new();
        let _ = c.read_to_end(&mut resp);
        let text = String::from_utf8_lossy(&resp);
        if let Some(st) = text.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok()) {
            assert!(st < 500, "garbage {i} got {text:?}");
        }
    }
    for cut in [10, 40, 70] {
        let mut c = UnixStream::connect(&sock).unwrap();
        let req = b"PUT /v1/vm HTTP/1.1\r\nHost: tern\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"kernel\": \"/nonexistent\"";
        c.write_all(&req[..req.len().min(cut + 60)]).unwrap();
        drop(c);
    }
    // Two requests on one kept-alive connection.
    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /ping HTTP/1.1\r\nHost: tern\r\n\r\nGET /v1/vm HTTP/1.1\r\nHost: tern\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = Vec::new();
    c.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    drop(idle);

    let (st, body) = call(&sock, "GET", "/ping", None).unwrap();
    assert_eq!(st, 200, "{body}");
    let (st, body) = call(&sock, "GET", "/v1/vm", None).unwrap();
    assert_eq!(st, 200, "{body}");
    let want = if configured { "configured" } else { "created" };
    assert_eq!(json(&body)["state"], want);
    let run = vm.kill();
    assert!(
        !run.stderr.contains("panicked"),
        "tern panicked:\n{}",
        run.stderr
    );
}

#[test]
fn the_socket_is_private_exclusive_and_survives_a_crash() {
    let dir = Scratch::new("socket");
    let sock = dir.path("api.sock");
    let first = Tern::run(&["--api-socket", s(&sock)]).ready(&sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    let second = tern_run(&["--api-socket", s(&sock)], Duration::from_secs(20));
    assert_eq!(second.code, Some(1), "{}", second.stderr);
    assert!(second.stderr.contains("in use"), "{}", second.stderr);
    assert_eq!(call(&sock, "GET", "/ping", None).unwrap().0, 200);

    // SIGKILL leaves the socket file behind; the next tern replaces it.
    first.kill();
    assert!(sock.exists());
    assert!(call(&sock, "GET", "/ping", None).is_err());
    let third = Tern::run(&["--api-socket", s(&sock)]).ready(&sock);
    let (st, body) = call(&sock, "GET", "/v1/vm", None).unwrap();
    assert_eq!(st, 200);
    assert_eq!(json(&body)["state"], "created");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    drop(third);

    // A file that is not a socket is left alone.
    let file = dir.path("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let r = tern_run(&["--api-socket", s(&file)], Duration::from_secs(20));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("not a socket"), "{}", r.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

/// The answer to `tern shutdown` before boot reaches the client before tern exits.
/// Ignored: tern exits before its API thread writes the 202, so the client usually gets an
/// empty response ("malformed HTTP response", exit 1). See the report on the API.
#[test]
fn shutdown_before_boot_is_answered() {
    let dir = Scratch::new("early-shutdown");
    let sock = dir.path("api.sock");
    for i in 0..20 {
        let vm = Tern::run(&["--api-socket", s(&sock)]).ready(&sock);
        let r = client(&["shutdown", "--force", "--api-socket", s(&sock)]);
        let run = vm.wait(Duration::from_secs(10));
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        assert!(
            r.code == Some(0) && r.stdout.contains("stopping the VM"),
            "attempt {i}: client exit {:?}: {}{}",
            r.code,
            r.stdout,
            r.stderr
        );
    }
}

/// SIGTERM to a tern serving the API ends it the way it ends one without: cleanly, through
/// tern's signal handling (exit 0, "stopped by signal 15", the socket removed).
/// Ignored: the API thread starts before `vmm::run` blocks SIGINT/SIGTERM, so it takes the
/// signal with the default action and the process dies (status 143, socket left behind).
#[test]
fn sigterm_with_an_api_socket_is_handled() {
    let dir = Scratch::new("sigterm");
    let sock = dir.path("api.sock");
    let vm = Tern::run(&["--api-socket", s(&sock)]).ready(&sock);
    let pid = vm.child.as_ref().unwrap().id() as libc::pid_t;
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let run = vm.wait(Duration::from_secs(10));
    assert!(
        run.code == Some(0) && run.stderr.contains("stopped by signal 15"),
        "exit {:?}: {}",
        run.code,
        run.stderr
    );
    assert!(!sock.exists(), "tern left its API socket behind");
}

#[test]
fn vm_flags_without_a_kernel_are_refused_rather_than_dropped() {
    let dir = Scratch::new("flags");
    let sock = dir.0.join("api.sock");
    let r = tern_run(
        &["--api-socket", s(&sock), "--cpus", "3"],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("VM settings on the command line need --kernel"),
        "{}",
        r.stderr
    );
    assert!(!sock.exists(), "the socket was left behind");
}

/// A shutdown timeout past one day is refused through the API (it used to be accepted, and
/// SIGTERM then overflowed the power-button deadline and killed tern); the longest one
/// allowed works.
#[test]
fn shutdown_timeout_is_bounded_through_the_api() {
    if !require_kvm("shutdown_timeout_is_bounded_through_the_api") {
        return;
    }
    let dir = Scratch::new("timeout-bound");
    let sock = dir.path("api.sock");
    let serial = dir.path("serial.txt");
    let vm = Tern::run(&["--api-socket", s(&sock)]).ready(&sock);
    let cfg = |timeout: u64| {
        serde_json::json!({
            "kernel": s(&probe()),
            "cmdline": "probe.run=count probe.count_ms=60000",
            "memory": 64,
            "serial": format!("file:{}", s(&serial)),
            "shutdown_timeout": timeout,
        })
        .to_string()
    };
    for t in [u64::MAX, 86_401] {
        let (st, body) = call(&sock, "PUT", "/v1/vm", Some(&cfg(t))).unwrap();
        assert_eq!(st, 400, "{body}");
        assert_eq!(
            error_of(&body),
            format!("invalid shutdown_timeout '{t}': must be at most 86400 seconds (one day)")
        );
    }
    let (st, body) = call(&sock, "PUT", "/v1/vm", Some(&cfg(86_400))).unwrap();
    assert_eq!(st, 204, "{body}");
    let (st, body) = call(&sock, "PUT", "/v1/vm/boot", None).unwrap();
    assert_eq!(st, 204, "{body}");
    wait_until("a tick", Duration::from_secs(20), || {
        !ticks(&serial).is_empty()
    });
    let pid = vm.child.as_ref().unwrap().id() as libc::pid_t;
    // SAFETY: signals to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let run = vm.wait(Duration::from_secs(10));
    assert!(
        run.code == Some(0)
            && run.stderr.contains("the guest has 86400 s to power off")
            && run.stderr.contains("stopped by signal 15"),
        "exit {:?}: {}",
        run.code,
        run.stderr
    );
}
