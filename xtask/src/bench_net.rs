//! `cargo xtask bench-net`: virtio-net packet rate and TSO throughput, tern vs QEMU on the
//! probe guest (scenario `vnetbench`), side by side on the host's /dev/kvm, interleaved; plus
//! the rate limiter's accuracy.
//!
//! Every boot gets a fresh network namespace with a TAP device `tap0` and the host peer of the
//! frame protocol (crates/netpeer) on it; the VMM runs inside it (`ip netns exec`). QEMU uses
//! `-netdev tap,…,vhost=off` (the peer and the VMM both in user space, as with tern), on
//! microvm (virtio-mmio) and pc (virtio-pci). Needs root, iproute2 and /dev/net/tun.
//!
//! Rows (guests/probe/README.md, `vnetbench`): `tx_pps` and `rx_pps`, 64-byte frames per
//! second; `tso_tx_mbps` and `tso_rx_mbps`, TCP payload in 10^6 bytes per second of 64 KiB TSO
//! frames.
//!
//! `--pin` gives every VMM the same placement on the host's CPUs: its vCPU thread on the last
//! CPU, its other threads and the host peer on CPU 0 (`--pin vcpu-first`: the other way round;
//! QEMU gets `-name …,debug-threads=on` so that its vCPU thread has a name to find).
//! Unpinned, the host's scheduler places the three busy threads of a test (vCPU, device, peer)
//! as it likes, and on a 2-CPU host where it puts them decides the TSO rows
//! (docs/benchmarks.md).
//!
//! `--baseline PATH` and/or `--baseline-args "ARGS"` add a baseline tern to the same boots
//! (bench_terns.rs), with `baseline` and `tern/baseline` columns. `--firecracker PATH` (its
//! virtio-net over mmio) and `--cloud-hypervisor PATH` (over pci) add the peers on their
//! transport, on the same `tap0` (bench_peers.rs); a row a peer's device cannot do shows `-`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use netpeer::{NetNs, Peer};

use crate::bench_peers::{self, ProbeGuest};
use crate::bench_probe::{field, median, placement, sample_with, Pin, Sample};
use crate::bench_terns::{baseline_cells, baseline_heads, describe, run_terns, Tern};

/// Milliseconds each `vnetbench` test runs per boot.
const TEST_MS: u64 = 2000;

/// `vnetbench`'s tests (`probe.vnet_bench`), their results and the rows they make.
const ROWS: [(&str, &str, &str); 4] = [
    ("tx", "tx_pps", "tx 64 B frames, pps"),
    ("rx", "rx_pps", "rx 64 B frames, pps"),
    ("tso", "tso_tx_mbps", "TSO tx, MB/s"),
    ("tso_rx", "tso_rx_mbps", "TSO rx, MB/s"),
];

/// The names of `vnetbench`'s tests, for `--tests`.
pub const TESTS: [&str; 4] = [ROWS[0].0, ROWS[1].0, ROWS[2].0, ROWS[3].0];

/// Which rows to measure: `vnetbench` tests (a subset of [`TESTS`], all when empty) on one
/// transport or both.
pub struct Select {
    pub tests: Vec<String>,
    pub transport: Option<String>,
}

impl Select {
    /// Whether this is the whole benchmark (no test or transport named).
    fn whole(&self) -> bool {
        self.tests.is_empty() && self.transport.is_none()
    }

    /// The guest's command line for the selected tests.
    fn cmdline(&self) -> String {
        if self.tests.is_empty() {
            return cmdline("");
        }
        cmdline(&format!("probe.vnet_bench={}", self.tests.join(",")))
    }

    /// The rows of the selected tests, in `ROWS` order.
    fn rows(&self) -> Vec<(&'static str, &'static str)> {
        ROWS.iter()
            .filter(|r| self.tests.is_empty() || self.tests.iter().any(|t| t == r.0))
            .map(|r| (r.1, r.2))
            .collect()
    }
}

fn cmdline(extra: &str) -> String {
    format!("probe.run=vnetbench probe.vnet_ms={TEST_MS} {extra}")
}

fn tern_args(probe: &str, transport: &str, net_opts: &str, cmdline: String) -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "--kernel",
        probe,
        "--memory",
        "128M",
        "--cpus",
        "1",
        "--serial",
        "stdio",
        "--transport",
        transport,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("--cmdline".into());
    a.push(cmdline);
    a.push("--net".into());
    a.push(format!("tap=tap0{net_opts}"));
    a
}

fn qemu_args(probe: &str, transport: &str, cmdline: String, pinned: bool) -> Vec<String> {
    let (machine, device): (&str, &[&str]) = if transport == "mmio" {
        (
            "microvm,acpi=off",
            &[
                "-global",
                "virtio-mmio.force-legacy=false",
                "-device",
                "virtio-net-device,netdev=n0",
            ],
        )
    } else {
        (
            "pc",
            &["-device", "virtio-net-pci,netdev=n0,disable-legacy=on"],
        )
    };
    let mut a: Vec<String> = [
        "-accel",
        "kvm",
        "-M",
        machine,
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-m",
        "128",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
        probe,
        "-netdev",
        "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
    ]
    .iter()
    .chain(device)
    .map(|s| s.to_string())
    .collect();
    a.push("-append".into());
    a.push(cmdline);
    if pinned {
        a.extend(["-name".into(), "bench,debug-threads=on".into()]);
    }
    a
}

/// One boot of `program args` in a fresh namespace with the peer running; fails unless the
/// probe reported every one of `keys`. With `vcpu_cpu`, the VMM's vCPU threads go to that CPU.
fn boot(program: &Path, args: &[String], keys: &[&str], vcpu_cpu: Option<usize>) -> Result<Sample> {
    let ns = NetNs::new().context("creating the network namespace")?;
    let peer = Peer::start(&ns).context("starting the host peer")?;
    let program = program.to_str().context("non-UTF-8 program path")?;
    let s = sample_with(Path::new("ip"), &ns.exec_args(program, args), vcpu_cpu);
    peer.stop().context("host peer")?;
    let s = s.with_context(|| format!("{program} {}", args.join(" ")))?;
    for k in keys {
        if !field(&s, k).is_finite() {
            bail!(
                "vnetbench reported no {k} (failed?): ip netns exec NS {program} {}",
                args.join(" ")
            );
        }
    }
    Ok(s)
}

/// Runs the benchmark with `runs` boots per VMM (each tern variant and QEMU) and transport.
pub fn run(
    terns: &[Tern],
    peers: &[bench_peers::Peer],
    probe: &Path,
    qemu: &Path,
    runs: usize,
    pin: Option<Pin>,
    select: &Select,
) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        bail!("bench-net needs root and /dev/net/tun (network namespaces, TAP devices)");
    }
    crate::util::ensure_tool("ip", "iproute2")?;
    let pinned = placement(pin)?;
    let vcpu_cpu = pinned.as_ref().map(|p| p.0);
    let p = probe.display().to_string();
    let rows = select.rows();
    let keys: Vec<&str> = rows.iter().map(|r| r.0).collect();
    println!(
        "virtio-net, probe guest (vnetbench, {TEST_MS} ms per test) on the host /dev/kvm, 1 vCPU, \
         TAP in a fresh network namespace per boot with the host peer; tern vs QEMU (vhost=off), \
         {runs} interleaved boots each, medians"
    );
    if let Some((_, line)) = &pinned {
        println!("{line}");
    }
    if let Some(d) = describe(terns) {
        println!("{d}");
    }
    for d in bench_peers::describe(peers) {
        println!("{d}");
    }
    println!(
        "{:<30} {:>10} {:>10} {:>10}{}{}",
        "workload",
        "tern",
        "qemu",
        "tern/qemu",
        baseline_heads(terns, 10),
        bench_peers::heads(peers, 10)
    );
    for transport in ["mmio", "pci"] {
        if select.transport.as_deref().is_some_and(|t| t != transport) {
            continue;
        }
        // t[run][variant]
        let mut t: Vec<Vec<Sample>> = Vec::new();
        let mut q: Vec<Sample> = Vec::new();
        // pe[peer] = that peer's samples (none off its transport).
        let mut pe: Vec<Vec<Sample>> = peers.iter().map(|_| Vec::new()).collect();
        let guest_cmdline = select.cmdline();
        for run in 0..runs {
            t.push(run_terns(terns, run, |v| {
                boot(
                    &v.program,
                    &v.args(&tern_args(&p, transport, "", guest_cmdline.clone())),
                    &keys,
                    vcpu_cpu,
                )
            })?);
            q.push(boot(
                qemu,
                &qemu_args(&p, transport, guest_cmdline.clone(), pin.is_some()),
                &keys,
                vcpu_cpu,
            )?);
            for (i, peer) in peers.iter().enumerate() {
                if peer.kind.transport() != transport {
                    continue;
                }
                let g = ProbeGuest {
                    kernel: probe,
                    cmdline: &guest_cmdline,
                    memory_mib: 128,
                    rng: false,
                    disk: None,
                    tap: Some("tap0"),
                    api_socket: None,
                };
                let args = bench_peers::probe_args(peer, &g, "net")?;
                // A test the peer's device cannot run leaves its row empty, not the run failed.
                pe[i].push(boot(&peer.program, &args, &[], vcpu_cpu)?);
            }
        }
        for &(key, name) in &rows {
            let tern_median = |i: usize| median(t.iter().map(|x| field(&x[i], key)).collect());
            let tm = tern_median(0);
            let qm = median(q.iter().map(|x| field(x, key)).collect());
            let peer_median = |i: usize| bench_peers::median_of(&pe[i], key);
            println!(
                "{:<30} {tm:>10.0} {qm:>10.0} {:>10.2}{}{}",
                format!("{transport}: {name}"),
                tm / qm,
                baseline_cells(terns, 10, 0, tern_median),
                bench_peers::cells(peers, 10, qm, peer_median)
            );
        }
    }
    // Rate limiter: configured vs achieved on virtio-pci, one test per limit. tso_tx_mbps
    // counts TCP payload only (65160 of each 65214-byte frame), MB = 10^6 bytes; 50M = 50 MiB/s.
    // Only with the whole benchmark: a selection measures its rows alone.
    if !select.whole() {
        return Ok(());
    }
    println!("\nrate limiter (tern, virtio-pci, {TEST_MS} ms per test):");
    for (limit, test, key, cfg) in [
        (",tx_ops=20000", "tx", "tx_pps", 20000.0),
        (",tx_bw=50M", "tso", "tso_tx_mbps", 50.0 * 1048576.0 / 1e6),
    ] {
        let extra = format!("probe.vnet_bench={test}");
        let args = tern_args(&p, "pci", limit, cmdline(&extra));
        let x = boot(&terns[0].program, &args, &[key], vcpu_cpu)?;
        let got = field(&x, key);
        println!(
            "  {:<12} configured {cfg:>8.1} achieved {got:>8.1} ({:+.1}%)",
            &limit[1..],
            (got / cfg - 1.0) * 100.0
        );
    }
    Ok(())
}
