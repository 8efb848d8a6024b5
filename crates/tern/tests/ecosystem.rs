//! tern under the host's own service tools: `GET /metrics` read by Prometheus' own text-format
//! parser (Debian's `python3-prometheus-client`), on a running probe guest.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
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
