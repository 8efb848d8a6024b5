//! `cargo xtask bench-vsock`: virtio-vsock stream throughput in the nested rig, tern against
//! QEMU on the same guest in the same L1 boot, interleaved runs, medians and ratios.
//!
//! tern's device is its own (Firecracker's hybrid Unix-socket backend: L1 reaches the guest
//! through tern's socket with `CONNECT`, the guest reaches L1's `socket_PORT`); QEMU's is
//! `vhost-vsock-device`, the host kernel's vhost_vsock (L1 uses AF_VSOCK). Both are
//! virtio-mmio, with Linux's own driver in the guest. Each run streams MIB MiB host → guest,
//! then guest → host; L1 times both ends (`xtask/l1/scenarios/vsock-bench.sh`).

use anyhow::{bail, Result};

use crate::rig::{median, plan, run_planned, RigOptions};
use crate::scenarios;

pub fn run(opts: &RigOptions, runs: usize, mib: u32) -> Result<()> {
    let pair = scenarios::bench_vsock_pair(mib);
    let mut planned = Vec::new();
    for i in 1..=runs.max(1) {
        for s in &pair {
            planned.push(plan(s, format!("{}#{i}", s.name)));
        }
    }
    let results = run_planned(opts, planned, false)?.results;
    let stat = |prefix: &str, fact: &str| -> (Option<f64>, usize) {
        let v: Vec<f64> = results
            .iter()
            .filter(|r| r.name.starts_with(prefix) && r.pass)
            .filter_map(|r| r.guest_facts.get(fact)?.parse().ok())
            .collect();
        let n = v.len();
        (median(v), n)
    };
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |r| format!("{r:.1}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
        _ => "n/a".to_string(),
    };
    println!();
    println!(
        "bench-vsock: {mib} MiB each way, virtio-mmio, medians of passing runs (MiB/s; higher is better)"
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10}",
        "", "tern", "qemu", "tern/qemu"
    );
    let mut counts = Vec::new();
    for (row, fact) in [
        ("host -> guest", "BENCH-H2G-MIBS"),
        ("guest -> host", "BENCH-G2H-MIBS"),
    ] {
        let (t, tn) = stat("bench-vsock-tern#", fact);
        let (q, qn) = stat("bench-vsock-qemu#", fact);
        println!(
            "{row:<24} {:>10} {:>10} {:>10}",
            fmt(t),
            fmt(q),
            ratio(t, q)
        );
        counts.push((tn, qn));
    }
    let (tn, qn) = counts[0];
    println!("passing runs: tern {tn}/{runs}, qemu {qn}/{runs}");
    if counts.iter().any(|&(t, q)| t == 0 || q == 0) {
        bail!("a VMM had no passing run in some direction: no ratio");
    }
    Ok(())
}
