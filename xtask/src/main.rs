//! Developer tasks for tern: guest images, the nested test rig, boot benchmarks.
//!
//! ```text
//! cargo xtask images                 build kernels + initramfs images into build/images/
//! cargo xtask rig [--group core] [--filter S] [--tern PATH] [--keep-logs DIR] [--list]
//! cargo xtask bench-probe [--runs N] [TERNS] [PEERS]
//! cargo xtask bench-blk [--runs N] [TERNS]
//! cargo xtask bench-net [--runs N] [--pin] [TERNS] [PEERS]
//! cargo xtask bench-snapshot [--runs N] [--sizes 256M,1G,4G] [--clones N] [TERNS]
//! cargo xtask bench-migrate [--runs N] [--sizes 256M,1G] [--dirty 0,10,100] [--transports unix,tcp]
//!                           [--qemu PATH] [TERNS]
//! cargo xtask bench-boot [--runs N] [--kernel bzimage|vmlinux] [--cpus N] [--tern PATH]
//! cargo xtask bench-vsock [--runs N] [--mib N] [--tern PATH]
//! cargo xtask shell [--tern PATH]    interactive L1 with the guest images and VMMs
//! cargo xtask extract-vmlinux BZIMAGE OUT
//! cargo xtask link-order            regenerate crates/tern/link-order.txt and rodata-order.ld (valgrind)
//! cargo xtask fuzz [--target NAME] [--seconds N] [--runs N]
//! ```
//! TERNS: [--tern PATH] [--baseline PATH] [--baseline-args "ARGS"] (bench_terns.rs).
//! PEERS: [--firecracker PATH] [--cloud-hypervisor PATH] (bench_peers.rs).
//! See shared/design/TESTING.md for why the rig exists and what it measures.

use arch::bzimage;

mod agent;
mod bench_api;
mod bench_blk;
mod bench_firecracker;
mod bench_migrate;
mod bench_net;
mod bench_peers;
mod bench_probe;
mod bench_snapshot;
mod bench_snapshot_peers;
mod bench_terns;
mod bench_vsock;
mod ci;
mod cpio;
mod debian;
mod debian_fw;
mod debs;
mod fuzz;
mod images;
mod l0_watch;
mod link_order;
mod modules;
mod rig;
mod scenarios;
mod spec;
mod util;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "xtask", about = "tern developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum KernelArg {
    Bzimage,
    Vmlinux,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the rig's kernels and initramfs images into build/images/ (cached).
    Images {
        /// tern binary to put into the L1 initramfs (skipped if missing).
        #[arg(long)]
        tern: Option<PathBuf>,
    },
    /// Run every test: lints, unit tests, probe-guest tests on /dev/kvm, the nested rig.
    Test {
        /// Skip the nested-rig scenarios.
        #[arg(long)]
        no_rig: bool,
    },
    /// Build tern and boot a Debian guest (directly, or in the rig on emulation-backed KVM).
    Demo,
    /// tern vs QEMU on the probe guest on the host /dev/kvm; medians and ratios.
    BenchProbe {
        #[command(flatten)]
        terns: bench_terns::TernOpts,
        #[command(flatten)]
        peers: bench_peers::PeerOpts,
        /// Interleaved runs per VMM and workload.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// virtio-blk throughput, tern vs QEMU on the probe guest, with fio on the host file.
    BenchBlk {
        #[command(flatten)]
        terns: bench_terns::TernOpts,
        #[command(flatten)]
        peers: bench_peers::PeerOpts,
        /// Interleaved boots per VMM and setup.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// The same placement for every VMM, not the scheduler's: its vCPU thread on the last
        /// CPU (`vcpu-last`, the default) or CPU 0 (`vcpu-first`), its other threads (where
        /// its disk I/O runs) and fio on the other.
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "vcpu-last")]
        pin: Option<bench_probe::Pin>,
    },
    /// virtio-net packet rate and TSO throughput, tern vs QEMU on the probe guest (needs root).
    BenchNet {
        #[command(flatten)]
        terns: bench_terns::TernOpts,
        #[command(flatten)]
        peers: bench_peers::PeerOpts,
        /// Interleaved boots per VMM and transport.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// The same placement for every VMM, not the scheduler's: its vCPU thread on the last
        /// CPU (`vcpu-last`, the default) or CPU 0 (`vcpu-first`), its other threads and the
        /// host peer on the other.
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "vcpu-last")]
        pin: Option<bench_probe::Pin>,
        /// Only these tests (comma-separated), and no rate-limiter rows [default: all].
        #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(bench_net::TESTS))]
        tests: Vec<String>,
        /// Only this transport (`mmio` or `pci`), and no rate-limiter rows [default: both].
        #[arg(long, value_parser = ["mmio", "pci"])]
        transport: Option<String>,
    },
    /// Control-API latency (GET /v1/vm, pause+resume) and tern's CPU use serving it.
    BenchApi {
        /// tern binary to measure [default: build target/x86_64-unknown-linux-gnu/release/tern].
        #[arg(long)]
        tern: Option<PathBuf>,
    },
    /// What the Firecracker dialect costs over tern's own API: boot to the first guest
    /// instruction and snapshot load, interleaved.
    BenchFirecracker {
        /// tern binary to measure [default: build target/x86_64-unknown-linux-gnu/release/tern].
        #[arg(long)]
        tern: Option<PathBuf>,
        /// Interleaved rounds.
        #[arg(long, default_value_t = 15)]
        runs: usize,
    },
    /// Snapshot, restore and clone times, tern vs QEMU (migrate to file / -incoming).
    BenchSnapshot {
        #[command(flatten)]
        terns: bench_terns::TernOpts,
        #[command(flatten)]
        peers: bench_peers::PeerOpts,
        /// Interleaved runs per guest size.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Guest sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G",
              value_parser = bench_snapshot::parse_size_mib)]
        sizes: Vec<u64>,
        /// Clones restored at once from one snapshot (0: skip).
        #[arg(long, default_value_t = 8)]
        clones: usize,
    },
    /// Live migration, tern vs QEMU on the probe guest (same host): total time, bytes sent,
    /// downtime as the guest sees it and as each VMM reports it.
    BenchMigrate {
        #[command(flatten)]
        terns: bench_terns::TernOpts,
        /// Interleaved runs per size, dirty rate and transport.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Guest sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "256M,1G",
              value_parser = bench_snapshot::parse_size_mib)]
        sizes: Vec<u64>,
        /// Guest dirty rates in MiB/s, comma-separated (0: no memory rewritten).
        #[arg(long, value_delimiter = ',', default_value = "0,10,100")]
        dirty: Vec<u64>,
        /// Migration transports, comma-separated.
        #[arg(long, value_delimiter = ',', value_enum, default_value = "unix,tcp")]
        transports: Vec<bench_migrate::Transport>,
        /// QEMU binary [default: qemu-system-x86_64 on PATH].
        #[arg(long)]
        qemu: Option<PathBuf>,
    },
    /// Run Linux-guest scenarios in the nested rig (L1 = QEMU TCG with AMD-V).
    Rig {
        /// tern binary [default: target/x86_64-unknown-linux-gnu/release/tern].
        #[arg(long)]
        tern: Option<PathBuf>,
        /// Scenario group: core, block, block-qemu, hotplug, net, net-qemu, snapshot, migrate, debian, firmware, compare,
        /// debug, qemu-extra, all.
        #[arg(long, default_value = "core")]
        group: String,
        /// Only scenarios whose name contains this; a comma-separated list selects those
        /// matching any part, and a part `=NAME` matches that name exactly.
        #[arg(long)]
        filter: Option<String>,
        /// Also copy logs and results here.
        #[arg(long)]
        keep_logs: Option<PathBuf>,
        /// List scenarios and exit.
        #[arg(long)]
        list: bool,
        /// Run each selected scenario N times (interleaved), e.g. to count L1 freezes.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// At most N runs per L1 boot; a fresh L1 runs the next ones.
        #[arg(long)]
        per_l1: Option<usize>,
    },
    /// Paired tern/QEMU boots of the same guest in one rig run; prints medians and ratios.
    BenchBoot {
        #[arg(long)]
        tern: Option<PathBuf>,
        /// Boots per VMM.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, value_enum, default_value = "bzimage")]
        kernel: KernelArg,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Boot tern's bzImage with --decompress guest (the kernel's own decompressor).
        #[arg(long)]
        guest_decompress: bool,
        #[arg(long)]
        keep_logs: Option<PathBuf>,
        /// The peers boot only the ELF vmlinux (`--kernel vmlinux`).
        #[command(flatten)]
        peers: bench_peers::PeerOpts,
    },
    /// virtio-vsock stream throughput in the rig, tern vs QEMU's vhost-vsock, both ways.
    BenchVsock {
        #[arg(long)]
        tern: Option<PathBuf>,
        /// Runs per VMM (interleaved).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// MiB streamed each way per run.
        #[arg(long, default_value_t = 64)]
        mib: u32,
        #[arg(long)]
        keep_logs: Option<PathBuf>,
    },
    /// Boot L1 interactively (console on this terminal) with the guest images and VMMs.
    Shell {
        #[arg(long)]
        tern: Option<PathBuf>,
    },
    /// Extract the ELF vmlinux from a bzImage.
    ExtractVmlinux { bzimage: PathBuf, output: PathBuf },
    /// Regenerate crates/tern/link-order.txt and rodata-order.ld: the functions the probe's
    /// workloads run (callgrind) and the read-only data they read (lackey, and real runs),
    /// which release builds place first.
    LinkOrder,
    /// Build the fuzz targets (fuzz/), replay their regression inputs, then fuzz each for a
    /// bounded time; a crash or hang fails, naming the target and the input.
    Fuzz {
        /// Only this target (default: all).
        #[arg(long)]
        target: Option<String>,
        /// Fuzzing time per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Stop a target after this many runs, if sooner.
        #[arg(long)]
        runs: Option<u64>,
    },
    /// (inside L1) Run the scenarios in SPEC and report on the console.
    #[command(hide = true)]
    RigAgent { spec: String },
    /// Build (or find cached) the rig's Debian disk (build/images/debian-disk.ext4) and print
    /// its path.
    #[command(hide = true)]
    DebianImage,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: Cmd) -> Result<()> {
    match command {
        Cmd::Images { tern } => {
            let imgs = images::build()?;
            let tern = tern.unwrap_or_else(rig::default_tern);
            let tern = tern.is_file().then_some(tern.as_path());
            let initrd = images::build_l1_initrd(&imgs, tern, &[], &rig::default_spec_json()?)?;
            rig::print_images(&imgs, &initrd);
            Ok(())
        }
        Cmd::Rig {
            tern,
            group,
            filter,
            keep_logs,
            list,
            repeat,
            per_l1,
        } => {
            if list {
                rig::list(&group, filter.as_deref());
                return Ok(());
            }
            let opts = rig::RigOptions {
                repeat,
                per_l1,
                ..rig::RigOptions::new(tern.unwrap_or_else(rig::default_tern), keep_logs)
            };
            rig::rig(&opts, &group, filter.as_deref())
        }
        Cmd::BenchBoot {
            tern,
            runs,
            kernel,
            cpus,
            guest_decompress,
            keep_logs,
            peers,
        } => {
            let peers = peers.peers()?;
            let opts = rig::RigOptions {
                peers: peers
                    .iter()
                    .map(|p| (p.kind.vmm(), p.program.clone()))
                    .collect(),
                ..rig::RigOptions::new(tern.unwrap_or_else(rig::default_tern), keep_logs)
            };
            for line in bench_peers::describe(&peers) {
                println!("{line}");
            }
            let kernel = match kernel {
                KernelArg::Bzimage => scenarios::KernelForm::BzImage,
                KernelArg::Vmlinux => scenarios::KernelForm::Vmlinux,
            };
            rig::bench(&opts, runs, kernel, cpus, guest_decompress)
        }
        Cmd::BenchVsock {
            tern,
            runs,
            mib,
            keep_logs,
        } => {
            let opts = rig::RigOptions::new(tern.unwrap_or_else(rig::default_tern), keep_logs);
            bench_vsock::run(&opts, runs, mib)
        }
        Cmd::Fuzz {
            target,
            seconds,
            runs,
        } => fuzz::run(&fuzz::FuzzOptions {
            target,
            seconds,
            runs,
        }),
        Cmd::Shell { tern } => rig::shell(&tern.unwrap_or_else(rig::default_tern)),
        Cmd::LinkOrder => {
            let tern = ci::build_tern()?;
            let probe = ci::build_probe()?;
            link_order::run(&tern, &probe)
        }
        Cmd::ExtractVmlinux { bzimage, output } => {
            let image = std::fs::read(&bzimage)
                .with_context(|| format!("cannot read {}", bzimage.display()))?;
            let info = bzimage::setup_header_info(&image)?;
            let vmlinux = bzimage::extract_vmlinux(&image)?;
            std::fs::write(&output, &vmlinux)
                .with_context(|| format!("cannot write {}", output.display()))?;
            println!(
                "{}: boot protocol {}.{:02}, {} payload; wrote {} ({} bytes)",
                bzimage.display(),
                info.protocol_version >> 8,
                info.protocol_version & 0xff,
                info.payload_format
                    .map_or("unknown".to_string(), |f| f.to_string()),
                output.display(),
                vmlinux.len()
            );
            Ok(())
        }
        Cmd::RigAgent { spec } => agent::main(&spec),
        Cmd::DebianImage => {
            println!("{}", debian::build()?.display());
            Ok(())
        }
        Cmd::Test { no_rig } => ci::test(no_rig),
        Cmd::Demo => ci::demo(),
        Cmd::BenchProbe { terns, peers, runs } => {
            let peers = peers.peers()?;
            let terns = terns.terns()?;
            let probe = ci::build_probe()?;
            let qemu = util::ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
            bench_probe::run(&terns, &peers, &probe, &qemu, runs)
        }
        Cmd::BenchBlk {
            terns,
            peers,
            runs,
            pin,
        } => {
            let terns = terns.terns()?;
            let peers = peers.peers()?;
            let probe = ci::build_probe()?;
            let qemu = util::ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
            bench_blk::run(&terns, &peers, &probe, &qemu, runs, pin)
        }
        Cmd::BenchNet {
            terns,
            peers,
            runs,
            pin,
            tests,
            transport,
        } => {
            let terns = terns.terns()?;
            let peers = peers.peers()?;
            let probe = ci::build_probe()?;
            let qemu = util::ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
            let select = bench_net::Select { tests, transport };
            bench_net::run(&terns, &peers, &probe, &qemu, runs, pin, &select)
        }
        Cmd::BenchApi { tern } => {
            let tern = match tern {
                Some(t) => t,
                None => ci::build_tern()?,
            };
            let probe = ci::build_probe()?;
            bench_api::run(&tern, &probe)
        }
        Cmd::BenchFirecracker { tern, runs } => {
            let tern = match tern {
                Some(t) => t,
                None => ci::build_tern()?,
            };
            let probe = ci::build_probe()?;
            bench_firecracker::run(&tern, &probe, runs)
        }
        Cmd::BenchSnapshot {
            terns,
            peers,
            runs,
            sizes,
            clones,
        } => {
            // Checked before the builds: this benchmark installs nothing.
            let qemu = util::which("qemu-system-x86_64").context(
                "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86); \
                 bench-snapshot compares tern with it",
            )?;
            let terns = terns.terns()?;
            let peers = peers.peers()?;
            let probe = ci::build_probe()?;
            let opts = bench_snapshot::Options {
                sizes_mib: sizes,
                runs,
                clones,
            };
            bench_snapshot::run(&terns, &peers, &probe, &qemu, &opts)
        }
        Cmd::BenchMigrate {
            terns,
            runs,
            sizes,
            dirty,
            transports,
            qemu,
        } => {
            // Checked before the builds: this benchmark installs nothing.
            let qemu = match qemu {
                Some(q) if q.is_file() => q,
                Some(q) => anyhow::bail!("QEMU binary {} does not exist", q.display()),
                None => util::which("qemu-system-x86_64").context(
                    "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86); \
                     bench-migrate compares tern with it",
                )?,
            };
            let terns = terns.terns()?;
            let probe = ci::build_probe()?;
            let opts = bench_migrate::Options {
                sizes_mib: sizes,
                dirty,
                transports,
                runs,
            };
            bench_migrate::run(&terns, &probe, &qemu, &opts)
        }
    }
}
