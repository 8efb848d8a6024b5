//! `cargo xtask bench-blk`: virtio-blk throughput, tern vs QEMU on the probe guest (scenario
//! `vblkbench`), side by side on the host's /dev/kvm, same raw file, same run, interleaved;
//! plus `fio` on the same file from the host as the ceiling, and the rate limiter's accuracy.
//!
//! Rows: 4 KiB random reads at queue depth 1 and 32 and 1 MiB sequential reads, over
//! virtio-mmio (QEMU microvm) and virtio-pci (QEMU pc), with the file in the host page cache
//! (`cache=writeback`) and with `O_DIRECT` (`cache=none`), and over virtio-pci on a host block
//! device (a loop device over the same file, `cache=none`; as root only, skipped otherwise),
//! and over virtio-pci on a qcow2 image holding the same data (every cluster allocated,
//! `qemu-img convert`), in the page cache and with `O_DIRECT`.
//! QEMU uses `aio=io_uring`. fio runs `psync` at depth 1 and `io_uring` at depth 32, on its
//! own (non-huge-page) buffers, on the same file or device.
//!
//! `--pin` gives every VMM the same placement on the host's CPUs: its vCPU thread on the last
//! CPU, its other threads (where its disk I/O is submitted and completed) and fio on CPU 0;
//! `--pin vcpu-first` the other way round. Which CPU takes the disk's completion interrupts
//! decides the depth-1 `O_DIRECT` rows for every VMM alike (docs/benchmarks.md): unpinned, each
//! boot's figure depends on where the scheduler happened to put its I/O thread.
//!
//! `--baseline PATH` and/or `--baseline-args "ARGS"` add a baseline tern to the same boots
//! (bench_terns.rs), with `baseline` and `tern/baseline` columns. `--firecracker PATH` and
//! `--cloud-hypervisor PATH` add the peers (bench_peers.rs) on the rows they have the disk
//! for: Firecracker raw files over virtio-mmio through the page cache (`io_engine` Async,
//! io_uring); Cloud Hypervisor every virtio-pci row (`direct=on` for cache=none).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::bench_peers::{self, Peer, ProbeDisk, ProbeGuest};
use crate::bench_probe::{field, median, placement, sample_with, Pin, Sample};
use crate::bench_terns::{baseline_cells, baseline_heads, describe, run_terns, Tern};

/// The benchmark file: big enough that random reads are not all in the device's caches.
const FILE_SIZE: u64 = 1 << 30;
/// Milliseconds each of the three workloads runs per boot.
const WORKLOAD_MS: u64 = 2000;

#[derive(Clone, Copy)]
struct Setup {
    transport: &'static str,
    direct: bool,
    /// The disk is a loop device over the file (a host block device).
    device: bool,
    /// The disk is the qcow2 copy of the file.
    qcow2: bool,
}

const SETUPS: [Setup; 7] = [
    Setup {
        transport: "mmio",
        direct: false,
        device: false,
        qcow2: false,
    },
    Setup {
        transport: "pci",
        direct: false,
        device: false,
        qcow2: false,
    },
    Setup {
        transport: "mmio",
        direct: true,
        device: false,
        qcow2: false,
    },
    Setup {
        transport: "pci",
        direct: true,
        device: false,
        qcow2: false,
    },
    Setup {
        transport: "pci",
        direct: true,
        device: true,
        qcow2: false,
    },
    Setup {
        transport: "pci",
        direct: false,
        device: false,
        qcow2: true,
    },
    Setup {
        transport: "pci",
        direct: true,
        device: false,
        qcow2: true,
    },
];

/// A loop device over a file, detached when dropped.
struct LoopDevice(PathBuf);

impl LoopDevice {
    /// Attaches `file` (with direct I/O to it, as a block device for VMs is set up); None,
    /// saying why, when this machine cannot.
    fn attach(file: &Path) -> Option<LoopDevice> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(LoopDevice(PathBuf::from(
                String::from_utf8_lossy(&o.stdout).trim(),
            ))),
            Ok(o) => {
                println!(
                    "(block-device rows skipped: losetup: {})",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                println!("(block-device rows skipped: losetup: {e})");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn cmdline(extra: &str) -> String {
    format!("probe.run=vblkbench probe.vblk_ms={WORKLOAD_MS} {extra}")
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn tern_args(probe: &str, file: &Path, s: Setup, disk_extra: &str, cmd_extra: &str) -> Vec<String> {
    let cache = if s.direct { "none" } else { "writeback" };
    let mut a = strings(&[
        "run",
        "--kernel",
        probe,
        "--memory",
        "256M",
        "--cpus",
        "1",
        "--serial",
        "stdio",
        "--transport",
        s.transport,
    ]);
    a.push("--cmdline".into());
    a.push(cmdline(cmd_extra));
    a.push("--disk".into());
    let format = if s.qcow2 { "qcow2" } else { "raw" };
    a.push(format!(
        "path={},format={format},cache={cache}{disk_extra}",
        file.display()
    ));
    a
}

fn qemu_args(probe: &str, file: &Path, s: Setup, pinned: bool) -> Vec<String> {
    let cache = if s.direct { "none" } else { "writeback" };
    let (machine, device) = if s.transport == "mmio" {
        ("microvm,acpi=off", "virtio-blk-device,drive=d0")
    } else {
        ("pc", "virtio-blk-pci,drive=d0,disable-legacy=on")
    };
    let mut a = strings(&[
        "-accel",
        "kvm",
        "-M",
        machine,
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-m",
        "256",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-global",
        "virtio-mmio.force-legacy=false",
        "-kernel",
        probe,
        "-append",
    ]);
    a.push(cmdline(""));
    a.push("-drive".into());
    let format = if s.qcow2 { "qcow2" } else { "raw" };
    a.push(format!(
        "if=none,id=d0,file={},format={format},aio=io_uring,cache={cache}",
        file.display()
    ));
    a.push("-device".into());
    a.push(device.into());
    if pinned {
        a.extend(["-name".into(), "bench,debug-threads=on".into()]);
    }
    a
}

/// Creates the benchmark file (written, not sparse) unless it is already there.
fn bench_file() -> Result<PathBuf> {
    let p = PathBuf::from("/var/tmp/tern-bench-blk.raw");
    if std::fs::metadata(&p).map(|m| m.len()).ok() == Some(FILE_SIZE) {
        return Ok(p);
    }
    let mut data = vec![0u8; 1 << 20];
    let mut f = std::fs::File::create(&p).with_context(|| format!("create {}", p.display()))?;
    for i in 0..FILE_SIZE >> 20 {
        data.iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = (i as usize ^ j) as u8);
        std::io::Write::write_all(&mut f, &data)?;
    }
    f.sync_all()?;
    Ok(p)
}

/// The qcow2 copy of `raw` (every cluster allocated: the data has no zero clusters), made
/// with `qemu-img convert` unless it is there and newer.
fn qcow2_file(raw: &Path) -> Result<PathBuf> {
    let p = PathBuf::from("/var/tmp/tern-bench-blk.qcow2");
    let newer = |a: &Path, b: &Path| -> Option<bool> {
        Some(
            std::fs::metadata(a).ok()?.modified().ok()?
                >= std::fs::metadata(b).ok()?.modified().ok()?,
        )
    };
    if newer(&p, raw) == Some(true) {
        return Ok(p);
    }
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(raw)
        .arg(&p)
        .output()
        .context("cannot run qemu-img")?;
    if !out.status.success() {
        bail!("qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(p)
}

/// Warms the host page cache with the whole file.
fn warm(file: &Path) -> Result<()> {
    let mut f = std::fs::File::open(file)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

/// One fio job on the host: returns IOPS and MB/s.
fn fio(file: &Path, rw: &str, bs: &str, depth: u32, direct: bool) -> Result<(f64, f64)> {
    let out = Command::new("fio")
        .args([
            "--name=tern-bench",
            &format!("--filename={}", file.display()),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            // Depth 1: plain pread (io_uring adds nothing and punts buffered reads to workers);
            // deeper: io_uring, as tern and QEMU use.
            if depth == 1 {
                "--ioengine=psync"
            } else {
                "--ioengine=io_uring"
            },
            &format!("--direct={}", u8::from(direct)),
            // fio drops the file's page cache before a job unless told not to.
            "--invalidate=0",
            &format!("--runtime={}ms", WORKLOAD_MS),
            "--time_based",
            "--output-format=json",
        ])
        .output()
        .context("cannot run fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio's JSON")?;
    let read = &v["jobs"][0]["read"];
    let iops = read["iops"].as_f64().unwrap_or(f64::NAN);
    let mbps = read["bw_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6;
    Ok((iops, mbps))
}

/// Runs the benchmark with `runs` boots per VMM (each tern variant and QEMU) and setup.
pub fn run(
    terns: &[Tern],
    peers: &[Peer],
    probe: &Path,
    qemu: &Path,
    runs: usize,
    pin: Option<Pin>,
) -> Result<()> {
    crate::util::ensure_tool("fio", "fio")?;
    let pinned = placement(pin)?;
    let vcpu_cpu = pinned.as_ref().map(|p| p.0);
    let file = bench_file()?;
    let p = probe.display().to_string();
    println!(
        "virtio-blk, probe guest on the host /dev/kvm, 1 vCPU, {} MiB raw file {}; tern vs QEMU \
         (aio=io_uring), {runs} interleaved boots each, medians; fio on the host file as the ceiling",
        FILE_SIZE >> 20,
        file.display()
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
        "{:<34} {:>10} {:>10} {:>10} {:>10} {:>10}{}{}",
        "workload",
        "tern",
        "qemu",
        "tern/qemu",
        "fio",
        "tern/fio",
        baseline_heads(terns, 10),
        bench_peers::heads(peers, 10)
    );
    let device = LoopDevice::attach(&file);
    let qcow2 = qcow2_file(&file)?;
    for s in SETUPS {
        let raw = file.clone();
        let file = match (&device, s.device) {
            _ if s.qcow2 => qcow2.clone(),
            (_, false) => file.clone(),
            (Some(d), true) => d.0.clone(),
            (None, true) => continue,
        };
        warm(&file)?;
        // t[run][variant]
        let mut t: Vec<Vec<Sample>> = Vec::new();
        let mut q: Vec<Sample> = Vec::new();
        // pe[peer] = that peer's samples (none where it has no such disk).
        let mut pe: Vec<Vec<Sample>> = peers.iter().map(|_| Vec::new()).collect();
        let guest_cmdline = cmdline("");
        for run in 0..runs {
            t.push(run_terns(terns, run, |v| {
                sample_with(
                    &v.program,
                    &v.args(&tern_args(&p, &file, s, "", "")),
                    vcpu_cpu,
                )
            })?);
            q.push(sample_with(
                qemu,
                &qemu_args(&p, &file, s, pin.is_some()),
                vcpu_cpu,
            )?);
            for (i, peer) in peers.iter().enumerate() {
                if !peer.kind.has_disk(s.transport, s.direct, s.qcow2) {
                    continue;
                }
                let g = ProbeGuest {
                    kernel: probe,
                    cmdline: &guest_cmdline,
                    memory_mib: 256,
                    rng: false,
                    disk: Some(ProbeDisk {
                        path: &file,
                        direct: s.direct,
                    }),
                    tap: None,
                    api_socket: None,
                };
                let args = bench_peers::probe_args(peer, &g, "blk")?;
                pe[i].push(
                    sample_with(&peer.program, &args, vcpu_cpu)
                        .with_context(|| format!("{} blk", peer.kind.short()))?,
                );
            }
        }
        let rows = [
            (
                "4 KiB random read QD1, IOPS",
                "iops_qd1",
                "randread",
                "4k",
                1,
            ),
            (
                "4 KiB random read QD32, IOPS",
                "iops_qd32",
                "randread",
                "4k",
                32,
            ),
            ("1 MiB sequential read, MB/s", "seq_mbps", "read", "1M", 1),
        ];
        let cache = match (s.direct, s.device, s.qcow2) {
            (true, _, true) => "qcow2, cache=none",
            (false, _, true) => "qcow2, page cache",
            (_, true, _) => "block device, cache=none",
            (true, false, _) => "cache=none",
            (false, false, _) => "page cache",
        };
        for (name, key, rw, bs, depth) in rows {
            let tern_median = |i: usize| median(t.iter().map(|x| field(&x[i], key)).collect());
            let tm = tern_median(0);
            let qm = median(q.iter().map(|x| field(x, key)).collect());
            // (qcow2 rows: fio on the raw file holding the same data.)
            let fio_file = if s.qcow2 { &raw } else { &file };
            let (fi, fm) = fio(fio_file, rw, bs, depth, s.direct)?;
            let f = if key == "seq_mbps" { fm } else { fi };
            let peer_median = |i: usize| bench_peers::median_of(&pe[i], key);
            println!(
                "{:<34} {tm:>10.0} {qm:>10.0} {:>10.2} {f:>10.0} {:>10.2}{}{}",
                format!("{} {cache}: {name}", s.transport),
                tm / qm,
                tm / f,
                baseline_cells(terns, 10, 0, tern_median),
                bench_peers::cells(peers, 10, qm, peer_median)
            );
        }
    }
    // Rate limiter: configured vs achieved, QD32 4 KiB random reads (and 1 MiB sequential for
    // bandwidth), page cache, virtio-pci.
    println!("\nrate limiter (virtio-pci, page cache, {WORKLOAD_MS} ms per workload):");
    let s = SETUPS[1];
    for (limit, key, cfg) in [
        (",iops=1000", "iops_qd32", 1000.0),
        (",iops=5000", "iops_qd32", 5000.0),
        (",bw=50M", "seq_mbps", 50.0 * 1048576.0 / 1e6),
    ] {
        let x = sample_with(
            &terns[0].program,
            &tern_args(&p, &file, s, limit, ""),
            vcpu_cpu,
        )?;
        let got = field(&x, key);
        println!(
            "  {:<12} configured {cfg:>8.1} achieved {got:>8.1} ({:+.1}%)",
            &limit[1..],
            (got / cfg - 1.0) * 100.0
        );
    }
    Ok(())
}
