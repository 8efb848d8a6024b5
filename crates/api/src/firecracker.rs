//! Firecracker's API dialect as data: the bodies its clients send (following Firecracker's
//! published swagger document), the whole configuration `--config-file` holds, and how each
//! maps onto tern's own [`VmConfig`].
//!
//! What tern cannot honour is refused with a message naming the field, never dropped:
//! SMT, CPU templates, huge pages, vhost-user drives (`socket`), `one_time_burst` and the
//! logger's `module`. What tern does in its own way is taken and documented here:
//! - `cache_type: "Unsafe"` (Firecracker ignores the guest's flushes) gets tern's writeback
//!   cache, which honours them: slower on flush-heavy guests, never less safe.
//! - `io_engine: "Async"` is io_uring, `"Sync"` synchronous I/O, as in Firecracker.
//! - Drives are raw images (`format=raw`), as Firecracker's are: never probed for qcow2.
//! - A token bucket (`size` tokens refilled every `refill_time` ms) becomes tern's rate of
//!   `size * 1000 / refill_time` per second.
//! - Devices use virtio-mmio, announced on the kernel command line as Firecracker does, since
//!   its clients boot guests with `pci=off`.
//! - The root drive is the guest's `vda` and the command line gets `root=/dev/vda` (or
//!   `root=PARTUUID=…`) and `rw`/`ro`, as Firecracker adds them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{DiskConfig, NetConfig, Transport, VmConfig};

/// The Firecracker API version tern speaks (`GET /version`, `--version`).
pub const FIRECRACKER_VERSION: &str = "1.12.0";

/// Firecracker's kernel command line when `boot_args` is absent.
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 \
                                     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// `PUT /boot-source`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel.
    pub kernel_image_path: PathBuf,
    /// The initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /machine-config` and `GET /machine-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs.
    pub vcpu_count: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (refused when true).
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking, for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// A CPU template (refused unless `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages (refused unless `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    /// Firecracker's default: 1 vCPU, 128 MiB.
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

/// `PATCH /machine-config`: absent fields stay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigPatch {
    /// vCPUs.
    #[serde(default)]
    pub vcpu_count: Option<u32>,
    /// Guest RAM in MiB.
    #[serde(default)]
    pub mem_size_mib: Option<u64>,
    /// Simultaneous multithreading.
    #[serde(default)]
    pub smt: Option<bool>,
    /// Dirty page tracking.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// A CPU template.
    #[serde(default)]
    pub cpu_template: Option<String>,
    /// Huge pages.
    #[serde(default)]
    pub huge_pages: Option<String>,
}

impl MachineConfig {
    /// `self` with `p` applied.
    pub fn patched(&self, p: &MachineConfigPatch) -> MachineConfig {
        MachineConfig {
            vcpu_count: p.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: p.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: p.smt.unwrap_or(self.smt),
            track_dirty_pages: p.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            cpu_template: p.cpu_template.clone().or_else(|| self.cpu_template.clone()),
            huge_pages: p.huge_pages.clone().or_else(|| self.huge_pages.clone()),
        }
    }

    /// Refuses what tern cannot do.
    pub fn check(&self) -> Result<(), String> {
        if self.vcpu_count == 0 || self.vcpu_count > 32 {
            return Err(format!(
                "vcpu_count {} is out of range: 1 to 32",
                self.vcpu_count
            ));
        }
        if self.smt {
            return Err("tern does not emulate SMT: smt must be false".into());
        }
        if self.cpu_template.as_deref().is_some_and(|t| t != "None") {
            return Err("tern has no CPU templates: cpu_template must be None".into());
        }
        if self.huge_pages.as_deref().is_some_and(|t| t != "None") {
            return Err(
                "tern backs guest memory with transparent huge pages by itself: huge_pages must be None"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A token bucket: `size` tokens (bytes or operations), refilled every `refill_time` ms.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens.
    pub size: u64,
    /// A one-time burst (refused unless 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill `size` tokens.
    pub refill_time: u64,
}

impl TokenBucket {
    /// The rate per second tern applies.
    pub fn rate(&self) -> Result<u64, String> {
        if self.one_time_burst.is_some_and(|b| b > 0) {
            return Err(
                "tern's rate limiters have no one-time burst: leave one_time_burst out".into(),
            );
        }
        if self.size == 0 || self.refill_time == 0 {
            return Ok(0);
        }
        // A slow rate stays a limit (0 would lift it).
        Ok((self.size.saturating_mul(1000) / self.refill_time).max(1))
    }
}

/// A rate limiter: bytes and operations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// `self` with the buckets `patch` names replaced; the others stay (as Firecracker's
    /// `PATCH` does).
    pub fn merged(&self, patch: &RateLimiter) -> RateLimiter {
        RateLimiter {
            bandwidth: patch.bandwidth.clone().or_else(|| self.bandwidth.clone()),
            ops: patch.ops.clone().or_else(|| self.ops.clone()),
        }
    }

    /// (bytes/s, operations/s) of the buckets given; None for a bucket left out.
    pub fn given_rates(&self) -> Result<(Option<u64>, Option<u64>), String> {
        let r = |b: &Option<TokenBucket>| b.as_ref().map(TokenBucket::rate).transpose();
        Ok((r(&self.bandwidth)?, r(&self.ops)?))
    }

    /// (bytes/s, operations/s); 0 is no limit.
    pub fn rates(&self) -> Result<(u64, u64), String> {
        let r = |b: &Option<TokenBucket>| b.as_ref().map_or(Ok(0), TokenBucket::rate);
        Ok((r(&self.bandwidth)?, r(&self.ops)?))
    }
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Its id.
    pub drive_id: String,
    /// The image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// The guest's root device.
    pub is_root_device: bool,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// The root partition's UUID (root device only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// `Unsafe` or `Writeback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// Its limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// `Sync` or `Async`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// A vhost-user-blk socket (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrivePatch {
    /// Its id.
    pub drive_id: String,
    /// A new image behind the drive.
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    /// New limits.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Its id.
    pub iface_id: String,
    /// The TAP.
    pub host_dev_name: String,
    /// The guest's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Limits on what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Limits on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfacePatch {
    /// Its id.
    pub iface_id: String,
    /// Limits on what the guest receives.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Limits on what the guest sends.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's CID.
    pub guest_cid: u32,
    /// The host side's Unix socket.
    pub uds_path: PathBuf,
    /// Deprecated id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /entropy`: a virtio-rng device, fed from the host's getrandom.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    /// Limits on what the guest draws; tern's virtio-rng has none, so only one that limits
    /// nothing (no bucket, or buckets of size 0) is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

impl Entropy {
    /// Refuses what tern cannot do.
    pub fn check(&self) -> Result<(), String> {
        match self.rate_limiter.as_ref().map(RateLimiter::rates) {
            None | Some(Ok((0, 0))) => Ok(()),
            Some(Err(e)) => Err(format!("entropy rate_limiter: {e}")),
            Some(Ok(_)) => Err(
                "entropy rate_limiter: tern's virtio-rng has no rate limiter; leave it out".into(),
            ),
        }
    }
}

/// `PUT /actions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    /// `InstanceStart`, `SendCtrlAltDel` or `FlushMetrics`.
    pub action_type: String,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStatePatch {
    /// `Paused` or `Resumed`.
    pub state: String,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// `Full` (the default) or `Diff`.
    #[serde(default)]
    pub snapshot_type: Option<String>,
    /// Where the VM's state goes: tern makes a snapshot directory there.
    pub snapshot_path: PathBuf,
    /// Where the guest memory goes: tern links the directory's memory file there.
    pub mem_file_path: PathBuf,
    /// A snapshot format version (refused: tern writes its own).
    #[serde(default)]
    pub version: Option<String>,
}

/// How `PUT /snapshot/load` finds guest memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// `File` (`Uffd` is refused: tern maps the file copy-on-write itself).
    pub backend_type: String,
    /// The memory file.
    pub backend_path: PathBuf,
}

/// A new TAP for an interface of a loaded snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its TAP here.
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    /// The snapshot (tern's snapshot directory).
    pub snapshot_path: PathBuf,
    /// The memory file (deprecated form of `mem_backend`).
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    /// The memory file.
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// Deprecated form of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    /// Track dirty pages after the load.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Run the VM at once (otherwise it stays paused).
    #[serde(default)]
    pub resume_vm: Option<bool>,
    /// New TAPs.
    #[serde(default)]
    pub network_overrides: Option<Vec<NetworkOverride>>,
}

/// `PUT /balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// The balloon's target size in MiB.
    pub amount_mib: u32,
    /// The guest's driver deflates the balloon when the guest runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between the guest's statistics; 0: none.
    #[serde(default)]
    pub stats_polling_interval_s: u32,
    /// The guest reports memory it freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_reporting: Option<bool>,
    /// Free page hinting (refused when true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_hinting: Option<bool>,
}

impl Balloon {
    /// tern's balloon for it.
    pub fn config(&self) -> Result<crate::balloon::BalloonConfig, String> {
        if self.free_page_hinting == Some(true) {
            return Err("tern's balloon has no free page hinting: use free_page_reporting".into());
        }
        if self.stats_polling_interval_s > crate::balloon::MAX_STATS_S {
            return Err(format!(
                "stats_polling_interval_s {} is over {} s",
                self.stats_polling_interval_s,
                crate::balloon::MAX_STATS_S
            ));
        }
        Ok(crate::balloon::BalloonConfig {
            deflate_on_oom: self.deflate_on_oom,
            free_page_reporting: self.free_page_reporting.unwrap_or(false),
            stats_s: self.stats_polling_interval_s,
            size: (self.amount_mib > 0)
                .then(|| crate::config::MemSize(u64::from(self.amount_mib) << 20)),
        })
    }
}

/// `PATCH /balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// The balloon's new target size in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// Seconds between the guest's statistics.
    pub stats_polling_interval_s: u32,
}

/// `PUT /logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Where log lines go (a file or FIFO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// `Error`, `Warning`, `Info`, `Debug`, `Trace` or `Off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Each line names its level (tern's lines always do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Each line names its source file and line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only this module's lines (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl Logger {
    /// The tracing filter for `level`.
    pub fn filter(&self) -> Result<Option<&'static str>, String> {
        if self.module.is_some() {
            return Err("tern does not filter its log by module: leave module out".into());
        }
        // Firecracker takes the level in any case.
        let level = self.level.as_deref().map(str::to_ascii_lowercase);
        Ok(match level.as_deref() {
            None => None,
            Some("off") => Some("off"),
            Some("error") => Some("error"),
            Some("warning" | "warn") => Some("warn"),
            Some("info") => Some("info"),
            Some("debug") => Some("debug"),
            Some("trace") => Some("trace"),
            Some(_) => {
                let l = self.level.as_deref().unwrap_or_default();
                return Err(format!(
                    "unknown log level {l:?}: Error, Warning, Info, Debug, Trace or Off"
                ));
            }
        })
    }
}

/// `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Where JSON lines of metrics go (a file or FIFO).
    pub metrics_path: PathBuf,
}

/// `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// `Firecracker`.
    pub app_name: String,
    /// The instance id (`--id`).
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// [`FIRECRACKER_VERSION`].
    pub vmm_version: String,
}

/// Every error's body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What went wrong.
    pub fault_message: String,
}

/// The whole configuration: `--config-file`, and `GET /vm/config`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullConfig {
    /// The kernel.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// The drives, in the order they were put.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// The interfaces, in the order they were put.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// virtio-vsock with Firecracker's Unix-socket backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// The logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// The metrics sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// A balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    /// A virtio-rng device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Entropy>,
}

impl FullConfig {
    /// Puts `d` in place of the drive with its id, or last.
    pub fn put_drive(&mut self, d: Drive) -> Result<(), String> {
        check_drive(&d)?;
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|o| o.is_root_device && o.drive_id != d.drive_id)
        {
            return Err("a root device is configured already".into());
        }
        match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(o) => *o = d,
            None => self.drives.push(d),
        }
        Ok(())
    }

    /// Puts `n` in place of the interface with its id, or last.
    pub fn put_net(&mut self, n: NetworkInterface) -> Result<(), String> {
        net_config(&n)?;
        match self
            .network_interfaces
            .iter_mut()
            .find(|o| o.iface_id == n.iface_id)
        {
            Some(o) => *o = n,
            None => self.network_interfaces.push(n),
        }
        Ok(())
    }

    /// The VM tern builds for this configuration.
    pub fn vm_config(&self) -> Result<VmConfig, String> {
        let boot = self
            .boot_source
            .as_ref()
            .ok_or("no boot source: PUT /boot-source first")?;
        let m = &self.machine_config;
        m.check()?;
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
        // The root drive first: the guest's vda.
        let mut drives: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(self.drives.iter().filter(|d| !d.is_root_device));
        if let Some(root) = drives.first().filter(|d| d.is_root_device) {
            let dev = match &root.partuuid {
                Some(u) => format!("PARTUUID={u}"),
                None => "/dev/vda".into(),
            };
            let mode = if root.is_read_only == Some(true) {
                "ro"
            } else {
                "rw"
            };
            cmdline.push_str(&format!(" root={dev} {mode}"));
        }
        let mut c = VmConfig {
            kernel: Some(boot.kernel_image_path.clone()),
            initrd: boot.initrd_path.clone(),
            cmdline: Some(cmdline),
            cpus: m.vcpu_count,
            memory: crate::config::MemSize(
                m.mem_size_mib
                    .checked_mul(1 << 20)
                    .ok_or_else(|| format!("mem_size_mib {} is too large", m.mem_size_mib))?,
            ),
            transport: Transport::Mmio,
            track_dirty_pages: m.track_dirty_pages,
            ..VmConfig::default()
        };
        c.balloon = self.balloon.as_ref().map(Balloon::config).transpose()?;
        if let Some(e) = &self.entropy {
            e.check()?;
            c.rng = true;
        }
        c.vsock = self.vsock.as_ref().map(|v| crate::config::VsockConfig {
            cid: v.guest_cid,
            socket: v.uds_path.clone(),
        });
        c.disks = drives
            .into_iter()
            .map(disk_config)
            .collect::<Result<_, _>>()?;
        c.nets = self
            .network_interfaces
            .iter()
            .map(net_config)
            .collect::<Result<_, _>>()?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }
}

fn check_drive(d: &Drive) -> Result<(), String> {
    if d.socket.is_some() {
        return Err(format!(
            "drive {}: tern has no vhost-user-blk drives: give path_on_host instead of socket",
            d.drive_id
        ));
    }
    if d.path_on_host.is_none() {
        return Err(format!("drive {}: path_on_host is missing", d.drive_id));
    }
    if d.partuuid.is_some() && !d.is_root_device {
        return Err(format!(
            "drive {}: partuuid goes with is_root_device",
            d.drive_id
        ));
    }
    disk_config(d).map(|_| ())
}

/// The tern disk for drive `d`.
pub fn disk_config(d: &Drive) -> Result<DiskConfig, String> {
    let path = d
        .path_on_host
        .as_ref()
        .ok_or_else(|| format!("drive {}: path_on_host is missing", d.drive_id))?;
    let io = match d.io_engine.as_deref() {
        None => "auto",
        Some("Sync") => "sync",
        Some("Async") => "io_uring",
        Some(e) => {
            return Err(format!(
                "drive {}: unknown io_engine {e:?}: Sync or Async",
                d.drive_id
            ))
        }
    };
    match d.cache_type.as_deref() {
        None | Some("Unsafe" | "Writeback") => {}
        Some(t) => {
            return Err(format!(
                "drive {}: unknown cache_type {t:?}: Unsafe or Writeback",
                d.drive_id
            ))
        }
    }
    let (bw, iops) = match &d.rate_limiter {
        Some(r) => r
            .rates()
            .map_err(|e| format!("drive {}: {e}", d.drive_id))?,
        None => (0, 0),
    };
    // Firecracker's drives are raw images: never probed (a guest could write a qcow2 header
    // into its own disk).
    serde_json::from_value(serde_json::json!({
        "id": d.drive_id,
        "path": path,
        "format": "raw",
        "readonly": d.is_read_only.unwrap_or(false),
        "io": io,
        "bw": bw,
        "iops": iops,
    }))
    .map_err(|e| format!("drive {}: {e}", d.drive_id))
}

/// The tern interface for `n`.
pub fn net_config(n: &NetworkInterface) -> Result<NetConfig, String> {
    let rates = |r: &Option<RateLimiter>| match r {
        Some(r) => r
            .rates()
            .map_err(|e| format!("interface {}: {e}", n.iface_id)),
        None => Ok((0, 0)),
    };
    let (rx_bw, rx_ops) = rates(&n.rx_rate_limiter)?;
    let (tx_bw, tx_ops) = rates(&n.tx_rate_limiter)?;
    let mut v = serde_json::json!({
        "id": n.iface_id,
        "tap": n.host_dev_name,
        "rx_bw": rx_bw,
        "rx_ops": rx_ops,
        "tx_bw": tx_bw,
        "tx_ops": tx_ops,
    });
    if let Some(mac) = &n.guest_mac {
        v["mac"] = serde_json::Value::String(mac.clone());
    }
    serde_json::from_value(v).map_err(|e| format!("interface {}: {e}", n.iface_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(json: &str) -> Result<VmConfig, String> {
        let c: FullConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        c.vm_config()
    }

    #[test]
    fn a_config_file_in_firecrackers_shape_becomes_a_vm() {
        let c = full(
            r#"{
              "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0 pci=off"},
              "drives": [
                {"drive_id": "scratch", "path_on_host": "/s.img", "is_root_device": false,
                 "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}}},
                {"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true,
                 "is_read_only": true, "io_engine": "Sync", "cache_type": "Unsafe"}
              ],
              "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
              "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                "guest_mac": "06:00:ac:10:00:02",
                "tx_rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}]
            }"#,
        )
        .unwrap();
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory.0, 256 << 20);
        assert_eq!(c.transport, Transport::Mmio);
        assert_eq!(
            c.cmdline.as_deref(),
            Some("console=ttyS0 pci=off root=/dev/vda ro")
        );
        assert_eq!(c.disks[0].id.as_deref(), Some("rootfs"));
        assert!(c.disks[0].readonly);
        assert_eq!(c.disks[0].io, crate::config::DiskIo::Sync);
        assert_eq!(c.disks[1].bw, 10 << 20);
        assert_eq!(c.nets[0].tap, "tap0");
        assert_eq!(c.nets[0].tx_ops, 100);
        assert_eq!(c.nets[0].mac.unwrap().0, [6, 0, 0xac, 0x10, 0, 2]);
    }

    #[test]
    fn what_tern_cannot_do_is_refused_by_name() {
        let boot = r#""boot-source": {"kernel_image_path": "/k"}"#;
        for (extra, needle) in [
            (
                r#""machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": true}"#,
                "smt",
            ),
            (
                r#""machine-config": {"vcpu_count": 1, "mem_size_mib": 256, "cpu_template": "T2"}"#,
                "cpu_template",
            ),
            (
                r#""machine-config": {"vcpu_count": 1, "mem_size_mib": 256, "huge_pages": "2M"}"#,
                "huge_pages",
            ),
            (
                r#""vsock": {"guest_cid": 2, "uds_path": "/v.sock"}"#,
                "vsock cid",
            ),
            (
                r#""drives": [{"drive_id": "d", "path_on_host": "/d", "is_root_device": false, "rate_limiter": {"ops": {"size": 1, "refill_time": 1, "one_time_burst": 5}}}]"#,
                "one_time_burst",
            ),
            (
                r#""drives": [{"drive_id": "d", "path_on_host": "/d", "is_root_device": false, "io_engine": "Turbo"}]"#,
                "io_engine",
            ),
            (
                r#""balloon": {"amount_mib": 0, "deflate_on_oom": false, "free_page_hinting": true}"#,
                "hinting",
            ),
            (
                r#""mmds-config": {"network_interfaces": []}"#,
                "mmds-config",
            ),
        ] {
            let e = full(&format!("{{{boot}, {extra}}}")).unwrap_err();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let e = full("{}").unwrap_err();
        assert!(e.contains("boot source"), "{e}");
        let mut c = FullConfig::default();
        let d = |id: &str| Drive {
            drive_id: id.into(),
            path_on_host: Some("/d".into()),
            is_root_device: true,
            is_read_only: None,
            partuuid: None,
            cache_type: None,
            rate_limiter: None,
            io_engine: None,
            socket: None,
        };
        c.put_drive(d("a")).unwrap();
        c.put_drive(d("a")).unwrap();
        assert!(c.put_drive(d("b")).unwrap_err().contains("root device"));
        let mut s = d("c");
        s.socket = Some("/vhost.sock".into());
        s.is_root_device = false;
        assert!(c.put_drive(s).unwrap_err().contains("vhost-user"));
    }

    #[test]
    fn patches_change_only_what_they_name() {
        let m = MachineConfig::default().patched(&MachineConfigPatch {
            mem_size_mib: Some(512),
            ..Default::default()
        });
        assert_eq!((m.vcpu_count, m.mem_size_mib), (1, 512));
    }
}
