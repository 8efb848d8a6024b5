//! `cargo xtask bench-firecracker`: what tern's Firecracker dialect costs over tern's own API,
//! on the same probe guest, in interleaved rounds.
//!
//! - **Boot to the first guest instruction**: tern starts empty (`tern run --api-socket` or
//!   `tern firecracker --api-sock`), the client configures the guest (`PUT /v1/vm`, or
//!   `PUT /machine-config` and `PUT /boot-source`) and boots it (`PUT /v1/vm/boot`, or
//!   `PUT /actions` `InstanceStart`); the figure is tern's own timestamp of the probe's entry
//!   milestone (port 0x80 code 0x01), in ms since tern started, so it covers the process start,
//!   every request and the build.
//! - **Snapshot load**: from the request's sending to its answer, `PUT /v1/vm/restore` (lazy)
//!   against `PUT /snapshot/load` (`mem_backend` `File`, `resume_vm`), of one snapshot of the
//!   probe taken at the start.
//!
//! Medians of `--runs` rounds; the order of the two alternates from round to round.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const ANSWER: Option<Duration> = Some(Duration::from_secs(30));
const CMDLINE: &str = "probe.run=count probe.count_ms=600000";

/// A tern, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts tern with `args` (stderr to `log`) and waits for `sock`.
fn start(tern: &Path, args: &[&str], sock: &Path, log: &Path) -> Result<Proc> {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(tern)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log)?))
        .spawn()
        .with_context(|| format!("cannot start {}", tern.display()))?;
    let p = Proc(child);
    let t0 = Instant::now();
    while !sock.exists() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("tern did not make {} within 10 s", sock.display());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(p)
}

fn call(sock: &Path, method: &str, path: &str, body: &str) -> Result<()> {
    let c = api::client::Client::new(sock).with_timeout(ANSWER);
    let (st, b) = c
        .call(method, path, Some(body))
        .with_context(|| format!("{method} {path}"))?;
    if !(200..300).contains(&st) {
        bail!("{method} {path}: {st} {b}");
    }
    Ok(())
}

/// The entry milestone's time in tern's log, in ms since tern started.
fn entry_ms(log: &Path) -> Result<f64> {
    let t0 = Instant::now();
    loop {
        let f = std::fs::File::open(log)?;
        for line in BufReader::new(f).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("guest milestone 0x01 at ").nth(1) {
                return rest
                    .trim_end_matches(" ms")
                    .parse()
                    .with_context(|| format!("milestone line {line:?}"));
            }
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("no entry milestone in {} within 20 s", log.display());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn boot_native(tern: &Path, probe: &str, dir: &Path) -> Result<f64> {
    let (sock, log) = (dir.join("native.sock"), dir.join("native.log"));
    let p = start(
        tern,
        &["--log-level", "info", "run", "--api-socket", &s(&sock)],
        &sock,
        &log,
    )?;
    let body = serde_json::json!({
        "kernel": probe, "memory": "64M", "cmdline": CMDLINE, "serial": "none"
    });
    call(&sock, "PUT", "/v1/vm", &body.to_string())?;
    call(&sock, "PUT", "/v1/vm/boot", "")?;
    let ms = entry_ms(&log)?;
    drop(p);
    Ok(ms)
}

fn boot_firecracker(tern: &Path, probe: &str, dir: &Path) -> Result<f64> {
    let (sock, log) = (dir.join("fc.sock"), dir.join("fc.log"));
    let p = start(
        tern,
        &[
            "--log-level",
            "info",
            "firecracker",
            "--api-sock",
            &s(&sock),
        ],
        &sock,
        &log,
    )?;
    call(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
    )?;
    let boot = serde_json::json!({ "kernel_image_path": probe, "boot_args": CMDLINE });
    call(&sock, "PUT", "/boot-source", &boot.to_string())?;
    call(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    )?;
    let ms = entry_ms(&log)?;
    drop(p);
    Ok(ms)
}

fn load(tern: &Path, dir: &Path, snap: &Path, firecracker: bool) -> Result<f64> {
    let sock = dir.join("load.sock");
    let log = dir.join("load.log");
    let sock_s = s(&sock);
    let (args, path, body) = if firecracker {
        (
            ["firecracker", "--api-sock", sock_s.as_str()],
            "/snapshot/load",
            serde_json::json!({
                "snapshot_path": snap,
                "mem_backend": {"backend_type": "File", "backend_path": snap.join("memory.bin")},
                "resume_vm": true
            }),
        )
    } else {
        (
            ["run", "--api-socket", sock_s.as_str()],
            "/v1/vm/restore",
            serde_json::json!({ "dir": snap, "mode": "lazy" }),
        )
    };
    let p = start(tern, &args, &sock, &log)?;
    let t0 = Instant::now();
    call(&sock, "PUT", path, &body.to_string())?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(p);
    Ok(ms)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(tern: &Path, probe: &Path, runs: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tern-bench-fc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let probe_s = s(probe);
    println!("tern {}", tern.display());
    println!("guest: probe count, 1 vCPU, 64 MiB; {runs} interleaved rounds\n");

    // One snapshot, by tern's own API.
    let snap = dir.join("snap");
    {
        let sock = dir.join("snap.sock");
        let p = start(
            tern,
            &[
                "run",
                "--kernel",
                &probe_s,
                "--memory",
                "64M",
                "--serial",
                "none",
                "--cmdline",
                CMDLINE,
                "--api-socket",
                &s(&sock),
            ],
            &sock,
            &dir.join("snap.log"),
        )?;
        std::thread::sleep(Duration::from_millis(300));
        call(&sock, "PUT", "/v1/vm/pause", "")?;
        let body = serde_json::json!({ "dir": snap });
        call(&sock, "PUT", "/v1/vm/snapshot", &body.to_string())?;
        drop(p);
    }

    let (mut boot_t, mut boot_f, mut load_t, mut load_f) = (vec![], vec![], vec![], vec![]);
    for round in 0..runs {
        let fc_first = round % 2 == 1;
        for fc in [fc_first, !fc_first] {
            if fc {
                boot_f.push(boot_firecracker(tern, &probe_s, &dir)?);
                load_f.push(load(tern, &dir, &snap, true)?);
            } else {
                boot_t.push(boot_native(tern, &probe_s, &dir)?);
                load_t.push(load(tern, &dir, &snap, false)?);
            }
        }
    }
    println!(
        "{:<44} {:>12} {:>14} {:>8}",
        "median, ms", "tern API", "Firecracker", "ratio"
    );
    for (name, t, f) in [
        ("start to first guest instruction", boot_t, boot_f),
        ("snapshot load request to answer", load_t, load_f),
    ] {
        let (t, f) = (median(t), median(f));
        println!("{name:<44} {t:>12.2} {f:>14.2} {:>8.3}", f / t);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
