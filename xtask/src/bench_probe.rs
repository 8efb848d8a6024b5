//! `cargo xtask bench-probe`: tern vs QEMU on the probe guest, side by side on the host's
//! /dev/kvm, same binary, same run, interleaved. Reports medians and tern/QEMU ratios for:
//! process start to the guest's first serial line, the `exits` scenario's per-exit costs,
//! the whole wall time of a 20,000-port-write guest, and peak RSS for a 64 MiB guest (the
//! VMM's own `VmHWM`, see [`sample`]). `--firecracker PATH` and `--cloud-hypervisor PATH` add
//! those VMMs to the same runs, on the workloads they have the devices for (bench_peers.rs).
//! `--baseline PATH` and/or `--baseline-args "ARGS"` add a baseline tern (an earlier binary, or
//! this one with other `tern run` arguments) to the same runs, with `baseline` and
//! `tern/baseline` columns (bench_terns.rs).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench_peers::{self, Kind, Peer, ProbeGuest};
use crate::bench_terns::{baseline_cells, baseline_heads, describe, run_terns, Tern};

/// A probe's `key=value` fields.
type Fields = Vec<(String, String)>;

pub(crate) struct Sample {
    first_line_ms: f64,
    wall_ms: f64,
    max_rss_kib: u64,
    fields: Vec<(String, String)>,
}

/// Spawns `program`, timestamps the first stdout line starting with "probe:", and returns the
/// probe's `key=value` fields from all lines, the wall time to the process's end, and its peak
/// RSS. The peak is the kernel's `VmHWM` of the process's own memory, read when its main
/// thread stops at its exit under `ptrace` (PTRACE_O_TRACEEXIT; only the main thread is
/// traced, so vCPU threads and their signals never pass through here). `ru_maxrss` is not
/// used: it also counts the memory of the process that forked and exec'd the VMM.
pub(crate) fn sample(program: &Path, args: &[String]) -> Result<Sample> {
    sample_with(program, args, None)
}

/// [`sample`], with the VMM's vCPU threads moved to CPU `vcpu_cpu` (if given) as they appear:
/// see [`pin_vcpus`].
pub(crate) fn sample_with(
    program: &Path,
    args: &[String],
    vcpu_cpu: Option<usize>,
) -> Result<Sample> {
    use std::os::unix::process::CommandExt;
    let start = Instant::now();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: PTRACE_TRACEME in the child between fork and exec: one syscall, no allocation.
    unsafe {
        cmd.pre_exec(|| {
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let pid = child.id() as libc::pid_t;
    let stdout = child.stdout.take().context("stdout")?;
    let name = program.display().to_string();
    let reader = std::thread::spawn(move || -> Result<(Option<f64>, Fields)> {
        let mut first_line_ms = None;
        let mut fields = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if line.starts_with("probe:") {
                first_line_ms.get_or_insert(start.elapsed().as_secs_f64() * 1e3);
                for tok in line.split_whitespace() {
                    if let Some((k, v)) = tok.split_once('=') {
                        fields.push((k.to_string(), v.to_string()));
                    }
                }
            }
        }
        Ok((first_line_ms, fields))
    });
    // A watchdog ends a VMM that runs over 60 s, printing or not; it is called off as soon as
    // the tracer below has reaped the VMM.
    let (done, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            watch.recv_timeout(Duration::from_secs(60))
        {
            // SAFETY: signalling our own child; the tracer calls this off right after reaping
            // it, so only that instant could see the pid gone.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return true;
        }
        false
    });
    let pinner = vcpu_cpu.map(|cpu| {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        (stop, std::thread::spawn(move || pin_vcpus(pid, cpu, &s)))
    });
    let traced = trace_to_exit(pid);
    let pinned = pinner.map(|(stop, h)| {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().unwrap_or(0)
    });
    if traced.is_err() {
        // SAFETY: our own child, possibly held in a ptrace stop that nobody will resume now.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        // SAFETY: reaping it, so that its stdout closes and the reader ends.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
    drop(done);
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    if watchdog.join().unwrap_or(false) {
        bail!("{name} took over 60 s");
    }
    let (first_line_ms, fields) = reader.join().map_err(|_| anyhow::anyhow!("reader"))??;
    let (hwm, status) = traced?;
    if libc::WIFSIGNALED(status) {
        bail!("{name} was killed by signal {}", libc::WTERMSIG(status));
    }
    let max_rss_kib =
        hwm.with_context(|| format!("{name}: its main thread ended without an exit stop"))?;
    if pinned == Some(0) {
        bail!("{name}: no thread named as a vCPU thread was found to pin");
    }
    Ok(Sample {
        first_line_ms: first_line_ms.context("the guest printed no probe line")?,
        wall_ms,
        max_rss_kib,
        fields,
    })
}

/// Follows the traced child `pid` to its end, passing on every signal; returns its `VmHWM` in
/// KiB as read at the main thread's exit stop (None if there was none), and its wait status.
fn trace_to_exit(pid: libc::pid_t) -> Result<(Option<u64>, i32)> {
    let mut hwm = None;
    let mut execed = false;
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r != pid {
            bail!("waitpid: {}", std::io::Error::last_os_error());
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Ok((hwm, status));
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;
        let pass = if event == libc::PTRACE_EVENT_EXIT {
            hwm = read_hwm(pid);
            0
        } else if event == libc::PTRACE_EVENT_EXEC {
            // A further exec (`ip netns exec NS VMM` becomes the VMM): its own, fresh VmHWM.
            0
        } else if sig == libc::SIGTRAP && event == 0 && !execed {
            execed = true;
            // The stop after exec: from here on, stop at the exit too, report later execs as
            // events (not as a SIGTRAP the program would die of), and kill the child if this
            // process dies.
            let opts =
                libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_TRACEEXEC | libc::PTRACE_O_EXITKILL;
            // SAFETY: ptrace requests on our stopped tracee.
            unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0, opts) };
            0
        } else {
            sig
        };
        // SAFETY: resuming our stopped tracee, passing on its signal.
        unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, pass) };
    }
}

/// Whether a thread name is a vCPU thread's, in tern (`tern-vcpu0`), Firecracker
/// (`fc_vcpu 0`), Cloud Hypervisor (`vcpu0`) or QEMU with `-name …,debug-threads=on`
/// (`CPU 0/KVM`).
fn is_vcpu_thread(name: &str) -> bool {
    name.contains("vcpu") || (name.starts_with("CPU ") && name.ends_with("/KVM"))
}

/// Moves every vCPU thread of process `pid` ([`is_vcpu_thread`]) to CPU `cpu` as it appears,
/// until `stop`; returns how many it moved. The process's other threads keep the affinity
/// they were started with. Polls `/proc/PID/task` every millisecond for the first half second
/// (threads start and take their names then), every 50 ms after that.
fn pin_vcpus(pid: libc::pid_t, cpu: usize, stop: &std::sync::atomic::AtomicBool) -> usize {
    let start = Instant::now();
    let mut pinned = std::collections::HashSet::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for tid in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        {
            if pinned.contains(&tid) {
                continue;
            }
            let Ok(name) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")) else {
                continue;
            };
            if is_vcpu_thread(name.trim_end()) && set_affinity(tid, cpu).is_ok() {
                pinned.insert(tid);
            }
        }
        let pause = if start.elapsed() < Duration::from_millis(500) {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(50)
        };
        std::thread::sleep(pause);
    }
    pinned.len()
}

/// Restricts thread `tid` (0: the calling one) to CPU `cpu`, which must be below
/// `CPU_SETSIZE`.
fn set_affinity(tid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside `set` for a `cpu` below its size (the callers' CPUs).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads `size_of::<cpu_set_t>()` bytes from `set`.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where a benchmark's `--pin` puts every VMM's vCPU thread. Everything else (the VMM's other
/// threads, where its devices do their I/O, and what the benchmark itself starts: a host peer,
/// fio) goes to the CPU at the other end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Pin {
    /// vCPU threads on the last CPU, the rest on CPU 0.
    VcpuLast,
    /// vCPU threads on CPU 0, the rest on the last CPU.
    VcpuFirst,
}

/// Applies `pin`: this process, and so everything it starts from now on, is restricted to the
/// CPU the VMMs' other threads get. Returns the CPU for their vCPU threads (for
/// [`sample_with`]), and the line that says so in a benchmark's output.
pub(crate) fn placement(pin: Option<Pin>) -> Result<Option<(usize, String)>> {
    let Some(pin) = pin else {
        return Ok(None);
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        bail!("--pin needs 2 CPUs, this process may use {cpus}");
    }
    let (vcpu, rest) = match pin {
        Pin::VcpuLast => (cpus - 1, 0),
        Pin::VcpuFirst => (0, cpus - 1),
    };
    set_affinity(0, rest).with_context(|| format!("sched_setaffinity(CPU {rest})"))?;
    Ok(Some((
        vcpu,
        format!(
            "pinned: every VMM's vCPU thread on CPU {vcpu}; its other threads, and what the \
             benchmark starts beside it, on CPU {rest}"
        ),
    )))
}

/// `VmHWM` of `pid`, in KiB.
fn read_hwm(pid: libc::pid_t) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Throughput of the `vrng` scenario: request size over the mean time per request.
fn rng_mib_s(s: &Sample) -> f64 {
    field(s, "chunk") / field(s, "ns_per_req") * 1e9 / f64::from(1u32 << 20)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) fn field(s: &Sample, k: &str) -> f64 {
    s.fields
        .iter()
        .find(|(key, _)| key == k)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Extracts one metric from a sample.
type Metric = Box<dyn Fn(&Sample) -> f64>;

/// One workload: the probe command line plus the extra flags each VMM needs for it.
struct Workload {
    cmdline: &'static str,
    /// The peers that run it too (see [`peer_workload`]).
    peers: &'static [Kind],
    tern: &'static [&'static str],
    qemu_machine: &'static str,
    qemu: &'static [&'static str],
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        cmdline: "probe.run=hello",
        peers: &[Kind::Firecracker, Kind::CloudHypervisor],
        tern: &[],
        qemu_machine: "microvm",
        qemu: &[],
    },
    Workload {
        cmdline: "probe.run=exits probe.exits=20000",
        peers: &[Kind::Firecracker, Kind::CloudHypervisor],
        tern: &[],
        qemu_machine: "microvm",
        qemu: &[],
    },
    // virtio-rng over virtio-mmio: QEMU microvm without ACPI so the probe finds the device on
    // the command line, and modern (v2) virtio-mmio; Firecracker's entropy device.
    Workload {
        cmdline: "probe.run=vrng probe.vrng_chunk=4096 probe.vrng_bytes=1048576",
        peers: &[Kind::Firecracker],
        tern: &["--transport", "mmio", "--rng"],
        qemu_machine: "microvm,acpi=off",
        qemu: &[
            "-global",
            "virtio-mmio.force-legacy=false",
            "-device",
            "virtio-rng-device",
        ],
    },
    // virtio-rng over modern virtio-pci: QEMU pc (SeaBIOS assigns the BARs); Cloud
    // Hypervisor's.
    Workload {
        cmdline: "probe.run=vrng probe.vrng_chunk=4096 probe.vrng_bytes=1048576",
        peers: &[Kind::CloudHypervisor],
        tern: &["--transport", "pci", "--rng"],
        qemu_machine: "pc",
        qemu: &["-device", "virtio-rng-pci,disable-legacy=on"],
    },
];

/// `tern run` on the probe with the benchmarks' machine (1 vCPU, 64 MiB, serial on stdout) and
/// command line `cmdline`.
pub(crate) fn probe_run_args(probe: &str, cmdline: &str) -> Vec<String> {
    [
        "run",
        "--kernel",
        probe,
        "--memory",
        "64M",
        "--cpus",
        "1",
        "--serial",
        "stdio",
        "--cmdline",
        cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn tern_args(probe: &str, w: &Workload) -> Vec<String> {
    let mut a = probe_run_args(probe, w.cmdline);
    a.extend(w.tern.iter().map(|s| s.to_string()));
    a
}

fn qemu_args(probe: &str, w: &Workload) -> Vec<String> {
    let mut a: Vec<String> = [
        "-accel",
        "kvm",
        "-M",
        w.qemu_machine,
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-m",
        "64",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
        probe,
        "-append",
        w.cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(w.qemu.iter().map(|s| s.to_string()));
    a
}

/// The arguments for workload `w` (number `i`) under `peer`.
fn peer_workload(peer: &Peer, probe: &Path, w: &Workload, i: usize) -> Result<Vec<String>> {
    let g = ProbeGuest {
        kernel: probe,
        cmdline: w.cmdline,
        memory_mib: 64,
        rng: w.tern.contains(&"--rng"),
        disk: None,
        tap: None,
        api_socket: None,
    };
    bench_peers::probe_args(peer, &g, &format!("w{i}"))
}

/// Runs the benchmark; `runs` samples of each workload per VMM, interleaved. With a baseline
/// among `terns`, it runs in the same runs as `tern` and QEMU and gets its own columns; so does
/// each of `peers`, on the workloads it has the devices for.
pub fn run(terns: &[Tern], peers: &[Peer], probe: &Path, qemu: &Path, runs: usize) -> Result<()> {
    let p = probe.display().to_string();
    // results[vmm][workload] = samples; vmm 0.. = the tern variants, then QEMU, then the peers.
    let q = terns.len();
    let mut results: Vec<Vec<Vec<Sample>>> = (0..=q + peers.len())
        .map(|_| (0..WORKLOADS.len()).map(|_| Vec::new()).collect())
        .collect();
    for run in 0..runs {
        for (w, wl) in WORKLOADS.iter().enumerate() {
            let samples = run_terns(terns, run, |t| {
                sample(&t.program, &t.args(&tern_args(&p, wl))).context(wl.cmdline)
            })?;
            for (t, s) in samples.into_iter().enumerate() {
                results[t][w].push(s);
            }
            let s =
                sample(qemu, &qemu_args(&p, wl)).with_context(|| format!("qemu {}", wl.cmdline))?;
            results[q][w].push(s);
            for (i, peer) in peers.iter().enumerate() {
                if !wl.peers.contains(&peer.kind) {
                    continue;
                }
                let args = peer_workload(peer, probe, wl, w)?;
                let s = sample(&peer.program, &args)
                    .with_context(|| format!("{} {}", peer.kind.short(), wl.cmdline))?;
                results[q + 1 + i][w].push(s);
            }
        }
    }
    let m = |v: usize, w: usize, f: &dyn Fn(&Sample) -> f64| {
        median(results[v][w].iter().map(f).collect())
    };
    println!(
        "probe guest on the host /dev/kvm: tern vs {} (microvm; pc for virtio-pci), {runs} interleaved runs each, medians",
        crate::util::first_line_of(qemu, "--version")
    );
    if let Some(d) = describe(terns) {
        println!("{d}");
    }
    for d in bench_peers::describe(peers) {
        println!("{d}");
    }
    println!(
        "{:<44} {:>12} {:>12} {:>12}{}{}",
        "metric",
        "tern",
        "qemu",
        "tern/qemu",
        baseline_heads(terns, 12),
        bench_peers::heads(peers, 10)
    );
    let rows: Vec<(&str, usize, Metric)> = vec![
        (
            "start -> first guest line, ms (hello)",
            0,
            Box::new(|s| s.first_line_ms),
        ),
        ("wall time, ms (hello)", 0, Box::new(|s| s.wall_ms)),
        (
            "peak RSS, MiB (64 MiB guest, hello)",
            0,
            Box::new(|s| s.max_rss_kib as f64 / 1024.0),
        ),
        (
            "wall time, ms (20,000 PIO + 20,000 MMIO exits)",
            1,
            Box::new(|s| s.wall_ms),
        ),
        (
            "peak RSS, MiB (exits)",
            1,
            Box::new(|s| s.max_rss_kib as f64 / 1024.0),
        ),
        (
            "PIO exit from ring 3, ns",
            1,
            Box::new(|s| field(s, "pio_ns")),
        ),
        (
            "MMIO exit from ring 3, ns",
            1,
            Box::new(|s| field(s, "mmio_ns")),
        ),
        (
            "PIO exit from ring 0, ns",
            1,
            Box::new(|s| field(s, "r0_pio_ns")),
        ),
        (
            "MMIO exit from ring 0, ns",
            1,
            Box::new(|s| field(s, "r0_mmio_ns")),
        ),
        (
            "virtio-rng over mmio, MiB/s (4 KiB requests)",
            2,
            Box::new(rng_mib_s),
        ),
        (
            "virtio-rng over pci, MiB/s (4 KiB requests)",
            3,
            Box::new(rng_mib_s),
        ),
    ];
    for (name, w, f) in rows {
        let t = m(0, w, &*f);
        let qv = m(q, w, &*f);
        println!(
            "{name:<44} {t:>12.2} {qv:>12.2} {:>12.3}{}{}",
            t / qv,
            baseline_cells(terns, 12, 2, |i| m(i, w, &*f)),
            bench_peers::cells(peers, 10, qv, |i| m(q + 1 + i, w, &*f))
        );
    }
    Ok(())
}
