//! The peers a benchmark can run beside tern and QEMU: Firecracker and Cloud Hypervisor,
//! built by the user from their public sources outside this tree (`docs/benchmarks.md` gives
//! the commits and commands) and named with `--firecracker PATH` and `--cloud-hypervisor PATH`.
//! Each gets its own columns: its figure and its ratio to QEMU's.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The options that name the peers, flattened into a benchmark's command.
#[derive(clap::Args, Default)]
pub(crate) struct PeerOpts {
    /// A Firecracker binary to run the same guest under, in the same runs (extra columns).
    #[arg(long, value_name = "PATH")]
    firecracker: Option<PathBuf>,
    /// A Cloud Hypervisor binary to run the same guest under, in the same runs.
    #[arg(long, value_name = "PATH")]
    cloud_hypervisor: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Firecracker,
    CloudHypervisor,
}

/// One peer: which VMM, its binary, and a directory for the files it needs.
pub(crate) struct Peer {
    pub kind: Kind,
    pub program: PathBuf,
    pub dir: PathBuf,
    /// The first line of its `--version`.
    pub version: String,
}

impl PeerOpts {
    /// The peers named, each checked to run (`--version`), with a fresh scratch directory.
    pub fn peers(&self) -> Result<Vec<Peer>> {
        let mut v = Vec::new();
        for (kind, p) in [
            (Kind::Firecracker, &self.firecracker),
            (Kind::CloudHypervisor, &self.cloud_hypervisor),
        ] {
            let Some(program) = p else { continue };
            let out = std::process::Command::new(program)
                .arg("--version")
                .output()
                .with_context(|| format!("cannot run {}", program.display()))?;
            if !out.status.success() {
                bail!("{} --version failed", program.display());
            }
            let dir = std::env::temp_dir().join(format!(
                "tern-bench-{}-{}",
                kind.short(),
                std::process::id()
            ));
            std::fs::create_dir_all(&dir)?;
            v.push(Peer {
                kind,
                program: program.clone(),
                dir,
                version: String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            });
        }
        Ok(v)
    }
}

impl Kind {
    /// Whether this peer has a disk like the one asked for: Firecracker's are raw files over
    /// virtio-mmio through the page cache; Cloud Hypervisor's are virtio-pci, raw or qcow2,
    /// with or without `O_DIRECT`.
    pub fn has_disk(self, transport: &str, direct: bool, qcow2: bool) -> bool {
        transport == self.transport()
            && match self {
                Kind::Firecracker => !direct && !qcow2,
                Kind::CloudHypervisor => true,
            }
    }

    /// The virtio transport its devices use.
    pub fn transport(self) -> &'static str {
        match self {
            Kind::Firecracker => "mmio",
            Kind::CloudHypervisor => "pci",
        }
    }

    /// The rig's name for it.
    pub fn vmm(self) -> crate::scenarios::Vmm {
        match self {
            Kind::Firecracker => crate::scenarios::Vmm::Firecracker,
            Kind::CloudHypervisor => crate::scenarios::Vmm::CloudHypervisor,
        }
    }

    /// The column name.
    pub fn short(self) -> &'static str {
        match self {
            Kind::Firecracker => "fc",
            Kind::CloudHypervisor => "ch",
        }
    }
}

/// What a probe-guest workload needs of a peer.
pub(crate) struct ProbeGuest<'a> {
    pub kernel: &'a Path,
    pub cmdline: &'a str,
    pub memory_mib: u32,
    /// A virtio-rng device (over mmio for Firecracker, pci for Cloud Hypervisor).
    pub rng: bool,
    /// A virtio-blk disk (over mmio for Firecracker, pci for Cloud Hypervisor).
    pub disk: Option<ProbeDisk<'a>>,
    /// A virtio-net device on this existing TAP device (over mmio for Firecracker, pci for
    /// Cloud Hypervisor).
    pub tap: Option<&'a str>,
    /// The VMM's API socket; without one Firecracker runs with `--no-api` and Cloud Hypervisor
    /// without `--api-socket`.
    pub api_socket: Option<&'a Path>,
}

/// A disk for the probe guest.
pub(crate) struct ProbeDisk<'a> {
    pub path: &'a Path,
    /// `O_DIRECT` on the host (Cloud Hypervisor's `direct=on`; Firecracker has no such option).
    pub direct: bool,
}

/// The command line that boots `g` under `peer`, with the serial console on stdout; the probe
/// ends the VM itself (Firecracker: the i8042 reset; Cloud Hypervisor: the ACPI sleep control
/// register). `tag` names the workload's files.
pub(crate) fn probe_args(peer: &Peer, g: &ProbeGuest, tag: &str) -> Result<Vec<String>> {
    match peer.kind {
        Kind::Firecracker => {
            let mut cfg = serde_json::json!({
                "boot-source": {
                    "kernel_image_path": g.kernel,
                    "boot_args": g.cmdline,
                },
                "machine-config": { "vcpu_count": 1, "mem_size_mib": g.memory_mib },
                "drives": [],
            });
            if g.rng {
                cfg["entropy"] = serde_json::json!({});
            }
            if let Some(d) = &g.disk {
                if d.direct {
                    bail!("Firecracker has no O_DIRECT disks");
                }
                // Async: io_uring, as tern and QEMU use; Writeback: flushes reach the file.
                cfg["drives"] = serde_json::json!([{
                    "drive_id": "d0",
                    "path_on_host": d.path,
                    "is_root_device": false,
                    "is_read_only": false,
                    "cache_type": "Writeback",
                    "io_engine": "Async",
                }]);
            }
            if let Some(tap) = g.tap {
                cfg["network-interfaces"] = serde_json::json!([{
                    "iface_id": "n0",
                    "host_dev_name": tap,
                    "guest_mac": "52:54:00:12:34:56",
                }]);
            }
            let path = peer.dir.join(format!("{tag}.json"));
            std::fs::write(&path, serde_json::to_vec_pretty(&cfg)?)?;
            let mut a: Vec<String> = match g.api_socket {
                Some(s) => vec!["--api-sock".into(), s.display().to_string()],
                None => vec!["--no-api".into()],
            };
            a.extend([
                "--config-file".into(),
                path.display().to_string(),
                "--level".into(),
                "Error".into(),
            ]);
            Ok(a)
        }
        Kind::CloudHypervisor => {
            let mut a: Vec<String> = vec![
                "--kernel".into(),
                g.kernel.display().to_string(),
                "--cmdline".into(),
                g.cmdline.into(),
                "--cpus".into(),
                "boot=1".into(),
                "--memory".into(),
                format!("size={}M", g.memory_mib),
                "--serial".into(),
                "tty".into(),
                "--console".into(),
                "off".into(),
            ];
            if g.rng {
                a.extend(["--rng".into(), "src=/dev/urandom".into()]);
            }
            if let Some(d) = &g.disk {
                a.push("--disk".into());
                a.push(format!(
                    "path={},direct={}",
                    d.path.display(),
                    if d.direct { "on" } else { "off" }
                ));
            }
            if let Some(tap) = g.tap {
                a.extend(["--net".into(), format!("tap={tap},mac=52:54:00:12:34:56")]);
            }
            if let Some(s) = g.api_socket {
                a.extend(["--api-socket".into(), format!("path={}", s.display())]);
            }
            Ok(a)
        }
    }
}

/// The report's lines on the peers.
pub(crate) fn describe(peers: &[Peer]) -> Vec<String> {
    peers
        .iter()
        .map(|p| {
            format!(
                "{}: {} ({})",
                p.kind.short(),
                p.program.display(),
                p.version
            )
        })
        .collect()
}

/// Header cells for the peers: each one's figure and its ratio to QEMU's.
pub(crate) fn heads(peers: &[Peer], w: usize) -> String {
    peers
        .iter()
        .map(|p| {
            let s = p.kind.short();
            format!(" {s:>w$} {:>w$}", format!("{s}/qemu"))
        })
        .collect()
}

/// The median of `key` over a peer's samples, NaN where it has none (a row it did not run,
/// or a test its device could not do).
pub(crate) fn median_of(samples: &[crate::bench_probe::Sample], key: &str) -> f64 {
    let v: Vec<f64> = samples
        .iter()
        .map(|x| crate::bench_probe::field(x, key))
        .filter(|v| v.is_finite())
        .collect();
    if v.is_empty() {
        f64::NAN
    } else {
        crate::bench_probe::median(v)
    }
}

/// Cells for the peers; `value(i)` is peer `i`'s figure (NaN where it has none), `qemu` QEMU's.
pub(crate) fn cells(peers: &[Peer], w: usize, qemu: f64, value: impl Fn(usize) -> f64) -> String {
    (0..peers.len())
        .map(|i| {
            let v = value(i);
            if v.is_nan() {
                format!(" {:>w$} {:>w$}", "-", "-")
            } else {
                format!(" {v:>w$.2} {:>w$.3}", v / qemu)
            }
        })
        .collect()
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
