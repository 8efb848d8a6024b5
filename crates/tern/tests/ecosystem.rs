//! tern under the host's own service tools: `GET /metrics` read by Prometheus' own text-format
//! parser (Debian's `python3-prometheus-client`), systemd's notifications (`READY=1`,
//! `STATUS=`, `STOPPING=1`) heard on a `NOTIFY_SOCKET` of the test's own, and log lines with
//! the journal's priority prefixes when `JOURNAL_STREAM` names tern's standard error.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Debian's Python, which has Debian's `prometheus_client` (another `python3` on the path may
/// not).
const PYTHON: &str = "/usr/bin/python3";

/// True when Prometheus' parser can run. Otherwise fails under CI=true (`cargo xtask test`
/// installs it) and skips loudly elsewhere.
fn require_prometheus_parser(test: &str) -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import prometheus_client.parser"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if in_ci() {
        panic!("{test}: {PYTHON} with prometheus_client is required under CI=true");
    }
    eprintln!("\n*** SKIPPED {test}: needs {PYTHON} and python3-prometheus-client ***\n");
    false
}

/// One sample as Prometheus' parser read it.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: serde_json::Map<String, Value>,
    value: f64,
}

/// `text` through `prometheus_client.parser`: its samples, and each family's (name, type,
/// help). The parser raises on anything outside the format, which fails the test.
fn parse(text: &str) -> (Vec<Sample>, Vec<(String, String, String)>) {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
samples, families = [], []
for f in text_string_to_metric_families(sys.stdin.read()):
    families.append([f.name, f.type, f.documentation])
    for s in f.samples:
        samples.append([s.name, s.labels, s.value])
print(json.dumps([samples, families]))
"#;
    let mut child = Command::new(PYTHON)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "Prometheus' parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let samples = v[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Sample {
            name: s[0].as_str().unwrap().to_string(),
            labels: s[1].as_object().unwrap().clone(),
            value: s[2].as_f64().unwrap(),
        })
        .collect();
    let families = v[1]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let s = |i: usize| f[i].as_str().unwrap().to_string();
            (s(0), s(1), s(2))
        })
        .collect();
    (samples, families)
}

/// `GET /metrics` on `sock`, raw: the status line, the `Content-Type` and the body.
fn scrape(sock: &Path) -> (String, String, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: tern\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let resp = String::from_utf8(resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_string();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("content-type:")
                .then(|| l["content-type:".len()..].trim().to_string())
        })
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        String::from_utf8(api::client::fuzzing::dechunk(body.as_bytes()).unwrap()).unwrap()
    } else {
        body.to_string()
    };
    (status, ctype, body)
}

/// The value of the sample named `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).and_then(Value::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?} in {samples:#?}"))
        .value
}

#[test]
fn metrics_are_prometheus_text_before_and_after_boot() {
    let test = "metrics_are_prometheus_text_before_and_after_boot";
    if !require_kvm(test) || !require_prometheus_parser(test) {
        return;
    }
    let dir = Scratch::new("metrics");

    // An empty tern: its state only.
    let sock = dir.path("empty.sock");
    let empty = spawn(&["--api-socket", s(&sock)]);
    wait_until("the API", Duration::from_secs(20), || sock.exists());
    let (status, ctype, body) = scrape(&sock);
    assert!(status.contains(" 200 "), "{status}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let (samples, _) = parse(&body);
    assert_eq!(
        value(&samples, "tern_vm_state", &[("state", "created")]),
        1.0
    );
    assert_eq!(
        value(&samples, "tern_vm_state", &[("state", "running")]),
        0.0
    );
    assert!(
        !samples.iter().any(|s| s.name.starts_with("tern_vcpu")),
        "{body}"
    );
    drop(empty);

    // A running guest with a disk whose path needs the format's escapes.
    let disk = dir.path("d\"q\\b.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={},id=data", s(&disk));
    let sock = dir.path("api.sock");
    let (vm, c) = running_vm(
        &sock,
        "none",
        "probe.run=count probe.count_ms=20000",
        &["--cpus", "2", "--disk", &disk_arg],
    );
    // Let the guest make exits and use CPU time.
    std::thread::sleep(Duration::from_millis(500));
    let (_, _, body) = scrape(&sock);
    let (samples, families) = parse(&body);
    for (name, kind, help) in &families {
        assert!(!help.is_empty(), "{name} has no HELP line");
        assert!(kind == "counter" || kind == "gauge", "{name}: {kind}");
    }
    assert_eq!(
        value(&samples, "tern_vm_state", &[("state", "running")]),
        1.0
    );
    assert_eq!(value(&samples, "tern_vm_vcpus", &[]), 2.0);
    assert_eq!(
        value(&samples, "tern_vm_memory_bytes", &[]),
        64.0 * 1048576.0
    );
    assert!(value(&samples, "tern_vm_uptime_seconds", &[]) > 0.0);
    let pio = value(
        &samples,
        "tern_vcpu_exits_total",
        &[("vcpu", "0"), ("kind", "pio")],
    );
    assert!(pio > 0.0, "{body}");
    let cpu0 = value(&samples, "tern_vcpu_cpu_seconds_total", &[("vcpu", "0")]);
    assert!(cpu0 > 0.0 && cpu0 < 60.0, "{body}");
    value(&samples, "tern_vcpu_cpu_seconds_total", &[("vcpu", "1")]);
    // The disk's path comes back whole through the label's escapes.
    assert_eq!(
        value(
            &samples,
            "tern_disk_read_ops_total",
            &[("id", "data"), ("path", s(&disk))]
        ),
        0.0
    );
    value(&samples, "tern_disk_throttled_total", &[("id", "data")]);
    // tern's process: its resident memory as the kernel counts it (VmRSS, read here at about
    // the same time), its peak, and CPU time at least the vCPU's.
    let rss = value(&samples, "tern_process_resident_memory_bytes", &[]);
    let vm_rss = vm.rss() as f64;
    assert!(
        rss > 1048576.0 && (rss - vm_rss).abs() < 0.25 * vm_rss,
        "{rss} against VmRSS {vm_rss}"
    );
    let peak = value(&samples, "tern_process_resident_memory_max_bytes", &[]);
    assert!(
        peak >= rss,
        "peak {peak} rss {rss} VmHWM {:?}",
        status_field(&format!("/proc/{}/status", vm.0.id()), "VmHWM")
    );
    assert!(value(&samples, "tern_process_cpu_seconds_total", &[]) >= cpu0);

    // Counters only grow; while the VM is paused its exits stand still.
    let (st, b) = c.call("PUT", "/v1/vm/pause", None).unwrap();
    assert_eq!(st, 204, "pause: {b}");
    let (_, _, paused1) = scrape(&sock);
    std::thread::sleep(Duration::from_millis(300));
    let (_, _, paused2) = scrape(&sock);
    let (p1, _) = parse(&paused1);
    let (p2, _) = parse(&paused2);
    let exits = |s: &[Sample]| {
        value(
            s,
            "tern_vcpu_exits_total",
            &[("vcpu", "0"), ("kind", "pio")],
        )
    };
    assert!(exits(&p1) >= pio, "{paused1}");
    assert_eq!(exits(&p1), exits(&p2), "exits while paused");
    assert_eq!(value(&p2, "tern_vm_state", &[("state", "paused")]), 1.0);
    let cpu = |s: &[Sample]| value(s, "tern_vcpu_cpu_seconds_total", &[("vcpu", "0")]);
    assert!(cpu(&p1) >= cpu0 && cpu(&p2) >= cpu(&p1), "{paused2}");
    // The JSON counters say the same.
    let counters = c.counters().unwrap();
    assert_eq!(counters.vcpus[0].pio_exits as f64, exits(&p2));
    assert!(counters.vcpus[0].cpu_time_ns > 0);
    drop(vm);
}

/// A notification socket for a tern to write to, as systemd's: a datagram socket bound at a
/// path in `dir` or, with `abstract_name`, in the abstract namespace. Returns it and the
/// `NOTIFY_SOCKET` value naming it.
fn notify_socket(dir: &Scratch, abstract_name: bool) -> (UnixDatagram, String) {
    let (socket, addr) = if abstract_name {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tern-test-notify-{}", std::process::id());
        let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        (UnixDatagram::bind_addr(&a).unwrap(), format!("@{name}"))
    } else {
        let p = dir.path("notify.sock");
        (UnixDatagram::bind(&p).unwrap(), s(&p).to_string())
    };
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    (socket, addr)
}

/// The messages on `socket` until one has `field`, within `limit`: each message's lines.
fn messages_until(socket: &UnixDatagram, field: &str, limit: Duration) -> Vec<Vec<String>> {
    let t0 = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        let lines: Vec<String> = String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_string)
            .collect();
        let done = lines.iter().any(|l| l == field);
        got.push(lines);
        if done {
            return got;
        }
    }
    panic!("no {field} within {limit:?}; got {got:?}");
}

/// `tern run ARGS` with `env` added, its standard error piped.
fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Tern {
    let mut c = Command::new(tern());
    c.arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    Tern(c.spawn().expect("start tern"))
}

#[test]
fn systemd_hears_ready_status_and_stopping() {
    let test = "systemd_hears_ready_status_and_stopping";
    if !require_kvm(test) {
        return;
    }
    let dir = Scratch::new("notify");
    let (notify, addr) = notify_socket(&dir, false);
    let sock = dir.path("api.sock");
    let probe = probe();
    let vm = spawn_with_env(
        &[
            "--kernel",
            s(&probe),
            "--memory",
            "64M",
            "--serial",
            "none",
            "--api-socket",
            s(&sock),
            "--cmdline",
            "probe.run=count probe.count_ms=20000",
        ],
        &[("NOTIFY_SOCKET", &addr)],
    );
    let m = messages_until(&notify, "READY=1", Duration::from_secs(20));
    assert_eq!(
        m.last().unwrap(),
        &["READY=1", "STATUS=the VM runs"],
        "{m:?}"
    );
    let c = api::client::Client::new(&sock);
    let (st, b) = c.call("PUT", "/v1/vm/pause", None).unwrap();
    assert_eq!(st, 204, "{b}");
    let m = messages_until(&notify, "STATUS=the VM is paused", Duration::from_secs(5));
    assert_eq!(m.len(), 1, "{m:?}");
    let (st, b) = c.call("PUT", "/v1/vm/resume", None).unwrap();
    assert_eq!(st, 204, "{b}");
    messages_until(&notify, "STATUS=the VM runs", Duration::from_secs(5));
    let (st, b) = c.call("PUT", "/v1/vm/shutdown?force=true", None).unwrap();
    assert_eq!(st, 202, "{b}");
    let m = messages_until(&notify, "STOPPING=1", Duration::from_secs(10));
    assert_eq!(
        m.last().unwrap(),
        &[
            "STOPPING=1",
            "STATUS=tern is stopping: stopped through the API"
        ],
        "{m:?}"
    );
    let (code, err) = vm.finish(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");

    // An empty tern is ready once it waits for a VM; SIGTERM stops it. The address is in the
    // abstract namespace this time.
    let (notify, addr) = notify_socket(&dir, true);
    let sock = dir.path("empty.sock");
    let empty = spawn_with_env(&["--api-socket", s(&sock)], &[("NOTIFY_SOCKET", &addr)]);
    let m = messages_until(&notify, "READY=1", Duration::from_secs(20));
    assert_eq!(
        m.last().unwrap(),
        &["READY=1", "STATUS=waiting for a VM through the API"],
        "{m:?}"
    );
    // SAFETY: kill only sends a signal to the child this test started.
    unsafe { libc::kill(empty.0.id() as i32, libc::SIGTERM) };
    let m = messages_until(&notify, "STOPPING=1", Duration::from_secs(10));
    assert_eq!(
        m.last().unwrap(),
        &[
            "STOPPING=1",
            "STATUS=tern is stopping: stopped by signal 15"
        ],
        "{m:?}"
    );
    let (code, err) = empty.finish(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");

    // A NOTIFY_SOCKET nobody can reach is an error named at once.
    let out = Command::new(tern())
        .args(["run", "--kernel", s(&probe), "--memory", "64M"])
        .env("NOTIFY_SOCKET", dir.path("nobody-listens"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("NOTIFY_SOCKET") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn log_lines_carry_their_priority_for_the_journal() {
    let test = "log_lines_carry_their_priority_for_the_journal";
    if !require_kvm(test) {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = Scratch::new("journal");
    let probe = probe();
    // `tern run --log-level info ARGS` with standard error in a file; with `journal`,
    // JOURNAL_STREAM names that file, as systemd names a service's journal stream, and
    // otherwise another file, as when a service's standard error was redirected.
    let run = |name: &str, journal: bool, args: &[&str], code: i32| -> String {
        let log = dir.path(name);
        let f = std::fs::File::create(&log).unwrap();
        let m = f.metadata().unwrap();
        let ino = if journal { m.ino() } else { m.ino() + 1 };
        let st = Command::new(tern())
            .args(["--log-level", "info", "run", "--kernel", s(&probe)])
            .args(["--memory", "64M", "--serial", "none"])
            .args(args)
            .env("JOURNAL_STREAM", format!("{}:{ino}", m.dev()))
            .stderr(f)
            .status()
            .unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(st.code(), Some(code), "{text}");
        text
    };
    let count = ["--cmdline", "probe.run=count probe.count_ms=100"];
    let missing = ["--disk", "path=/nonexistent/disk.raw"];
    let ok = run("ok.txt", true, &count, 0);
    let failed = run("failed.txt", true, &missing, 1);
    for line in ok.lines().chain(failed.lines()) {
        assert!(
            line.len() > 3
                && line.starts_with('<')
                && line.as_bytes()[2] == b'>'
                && (b'0'..=b'7').contains(&line.as_bytes()[1]),
            "a line without its priority: {line:?}\n{ok}{failed}"
        );
    }
    assert!(ok.lines().any(|l| l.starts_with("<6>")), "{ok}");
    assert!(
        failed
            .lines()
            .any(|l| l.starts_with("<3>tern: ") && l.contains("/nonexistent/disk.raw")),
        "{failed}"
    );
    let plain = run("plain.txt", false, &missing, 1);
    assert!(!plain.contains("<3>") && !plain.contains("<6>"), "{plain}");
    assert!(plain.contains("/nonexistent/disk.raw"), "{plain}");
}

/// The shipped unit template, `contrib/systemd/tern@.service`.
fn unit_template() -> String {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../contrib/systemd/tern@.service"
    );
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

#[test]
fn the_systemd_unit_verifies_and_its_command_runs_a_vm() {
    let test = "the_systemd_unit_verifies_and_its_command_runs_a_vm";
    if !require_kvm(test) {
        return;
    }
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        assert!(
            !in_ci(),
            "{test}: systemd-analyze is required under CI=true"
        );
        eprintln!("\n*** SKIPPED {test}: needs systemd-analyze (package systemd) ***\n");
        return;
    }
    let dir = Scratch::new("unit");
    // The template as installed here: this build of tern, and the test's own /etc/tern and
    // /run/tern.
    let etc = dir.path("etc");
    let run = dir.path("run");
    std::fs::create_dir_all(&etc).unwrap();
    let unit = unit_template()
        .replace("/usr/local/bin/tern", s(&tern()))
        .replace("/etc/tern/", &format!("{}/", s(&etc)))
        .replace("/run/tern/", &format!("{}/", s(&run)));
    let units = dir.path("units");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(units.join("tern@.service"), &unit).unwrap();
    std::os::unix::fs::symlink("tern@.service", units.join("tern@probe.service")).unwrap();
    let out = Command::new(analyze)
        .args(["verify", s(&units.join("tern@probe.service"))])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );

    // Its ExecStart, as systemd runs it for instance `probe` (RuntimeDirectory made), with
    // the instance's file, is a tern that says when its VM runs and when it stops.
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
        .replace("%i", "probe");
    let probe = probe();
    std::fs::write(
        etc.join("probe.toml"),
        format!(
            "kernel = \"{}\"\nmemory = \"64M\"\nserial = \"none\"\ncmdline = \"probe.run=count probe.count_ms=300\"\n",
            s(&probe)
        ),
    )
    .unwrap();
    std::fs::create_dir_all(run.join("probe")).unwrap();
    let (notify, addr) = notify_socket(&dir, false);
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert!(argv.ends_with(&["--machine-name", "probe"]), "{argv:?}");
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .env("NOTIFY_SOCKET", &addr)
        // A host without a system bus (tests/machined.rs has one): the VM runs unregistered.
        .env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            format!("unix:path={}", dir.path("no-bus").display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let m = messages_until(&notify, "READY=1", Duration::from_secs(20));
    assert_eq!(m.last().unwrap()[1], "STATUS=the VM runs", "{m:?}");
    assert!(run.join("probe/api.sock").exists());
    let m = messages_until(&notify, "STOPPING=1", Duration::from_secs(20));
    let st = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(
        err.contains("tern: the VM is not registered with systemd-machined: no system bus at"),
        "{err}"
    );
    assert!(
        m.last().unwrap()[1].starts_with("STATUS=tern is stopping: the guest"),
        "{m:?}"
    );
}
