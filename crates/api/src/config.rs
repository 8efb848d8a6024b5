//! `VmConfig`: the one description of a VM, produced by CLI flags, a config file (TOML or
//! JSON) or the API (`PUT /v1/vm`); validated once, here.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Default kernel command line: serial console, reboot through the i8042 reset line, reboot one
/// second after a panic, a quiet i8042.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Smallest guest RAM tern accepts (the VMM checks that its memory layout agrees).
pub const MIN_MEMORY: u64 = 16 << 20;
/// The hotpluggable part of guest memory (`max_memory - memory`) is a multiple of this: Linux's
/// memory block size, in which the guest adds memory.
pub const HOTPLUG_MEMORY_ALIGN: u64 = 128 << 20;
/// The block size of tern's virtio-mem device: memory is added and removed in steps of this.
pub const HOTPLUG_BLOCK_SIZE: u64 = 2 << 20;
/// Appended to the guest's command line when it has hotpluggable memory (see
/// [`VmConfig::effective_cmdline`]).
pub const MEMORY_HOTPLUG_CMDLINE: &str = "memhp_default_state=online_movable";
/// Largest guest RAM tern accepts, 1 TiB (the VMM checks that its memory layout agrees).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Longest kernel command line tern accepts, in bytes without the NUL (the VMM checks that its
/// memory layout agrees).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;

/// Configuration errors; each names the field and the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A field has a bad value.
    #[error("invalid {field} '{value}': {why}")]
    Invalid {
        /// Field name as the user wrote it.
        field: &'static str,
        /// The value.
        value: String,
        /// Why it is wrong.
        why: String,
    },
    /// A required field is missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// The config file could not be read or parsed.
    #[error("config file {path}: {why}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
}

fn invalid(field: &'static str, value: impl fmt::Display, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        why: why.into(),
    }
}

/// A memory size in bytes, written as `512M`, `2G`, `65536K`, `1T` or a plain number of MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemSize(pub u64);

impl FromStr for MemSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        let stripped = lower
            .strip_suffix("ib")
            .or_else(|| lower.strip_suffix('b'))
            .unwrap_or(&lower);
        let (num, shift) = match stripped.chars().last() {
            Some('k') => (&stripped[..stripped.len() - 1], 10),
            Some('m') => (&stripped[..stripped.len() - 1], 20),
            Some('g') => (&stripped[..stripped.len() - 1], 30),
            Some('t') => (&stripped[..stripped.len() - 1], 40),
            Some(c) if c.is_ascii_digit() => (stripped, 20),
            _ => return Err("expected a number with an optional K, M, G or T suffix".into()),
        };
        let n: u64 = num
            .trim()
            .parse()
            .map_err(|_| "expected a number with an optional K, M, G or T suffix".to_string())?;
        n.checked_mul(1u64 << shift)
            .map(MemSize)
            .ok_or_else(|| "too large".to_string())
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b.is_multiple_of(1 << 30) {
            write!(f, "{}G", b >> 30)
        } else if b.is_multiple_of(1 << 20) {
            write!(f, "{}M", b >> 20)
        } else {
            write!(f, "{}K", b >> 10)
        }
    }
}

impl Serialize for MemSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MemSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Mib(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Mib(n) => n
                .checked_mul(1 << 20)
                .map(MemSize)
                .ok_or_else(|| serde::de::Error::custom("memory size too large")),
            Raw::Text(t) => t
                .parse()
                .map_err(|e: String| serde::de::Error::custom(format!("memory '{t}': {e}"))),
        }
    }
}

/// Where a character device (the serial port) sends guest output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CharBackend {
    /// The terminal: output to stdout, stdin forwarded to the guest.
    #[default]
    Stdio,
    /// Output appended to a file.
    File(PathBuf),
    /// Discarded.
    None,
}

impl FromStr for CharBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(CharBackend::Stdio),
            "none" | "off" => Ok(CharBackend::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(CharBackend::File(PathBuf::from(p))),
                _ => Err("expected stdio, none or file:PATH".into()),
            },
        }
    }
}

impl fmt::Display for CharBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CharBackend::Stdio => write!(f, "stdio"),
            CharBackend::File(p) => write!(f, "file:{}", p.display()),
            CharBackend::None => write!(f, "none"),
        }
    }
}

impl Serialize for CharBackend {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CharBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let t = String::deserialize(d)?;
        t.parse()
            .map_err(|e: String| serde::de::Error::custom(format!("serial '{t}': {e}")))
    }
}

/// Kernel entry protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH when the ELF kernel has a PVH note, else the 64-bit Linux entry.
    #[default]
    Auto,
    /// PVH (ELF kernels with a PVH note).
    Pvh,
    /// Linux 64-bit boot protocol.
    Linux,
}

/// Where a bzImage's payload is decompressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decompress {
    /// By tern, on the host; the guest enters vmlinux directly.
    #[default]
    Host,
    /// By the kernel's own decompressor in the guest.
    Guest,
}

/// What a guest reboot does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnReboot {
    /// tern exits with status 0.
    #[default]
    Exit,
    /// The VM is rebuilt and boots again.
    Restart,
}

/// `FromStr`/`Display` for the lowercase keyword enums, matching their serde names.
macro_rules! keyword_enum {
    ($t:ty, $($v:ident => $s:literal),+) => {
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok(<$t>::$v),)+
                    _ => Err(format!("expected one of: {}", [$($s),+].join(", "))),
                }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self { $(<$t>::$v => write!(f, $s),)+ }
            }
        }
    };
}

keyword_enum!(BootProtocol, Auto => "auto", Pvh => "pvh", Linux => "linux");
keyword_enum!(Decompress, Host => "host", Guest => "guest");
keyword_enum!(OnReboot, Exit => "exit", Restart => "restart");
keyword_enum!(Transport, Pci => "pci", Mmio => "mmio");

/// How virtio devices attach to the VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// virtio-pci (modern) on the PCI root bus, with MSI-X.
    #[default]
    Pci,
    /// virtio-mmio (v2), announced in ACPI.
    Mmio,
}

/// Image format of a disk, as the user states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Plain image.
    Raw,
    /// QEMU copy-on-write.
    Qcow2,
}

/// Host caching of a disk image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// Through the host page cache; guest flushes reach the disk.
    #[default]
    Writeback,
    /// `O_DIRECT`: bypass the host page cache.
    None,
}

/// How a disk's requests are run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskIo {
    /// io_uring where the host allows it (raw images), synchronous otherwise.
    #[default]
    Auto,
    /// io_uring, falling back to synchronous I/O where unavailable.
    IoUring,
    /// Synchronous I/O on the device's worker threads.
    Sync,
}

keyword_enum!(DiskFormat, Raw => "raw", Qcow2 => "qcow2");
keyword_enum!(DiskCache, Writeback => "writeback", None => "none");
keyword_enum!(DiskIo, Auto => "auto", IoUring => "io_uring", Sync => "sync");

fn default_queues() -> u16 {
    1
}

/// One virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The disk's id, by which the API changes it (`PATCH /v1/vm/disks/{id}`) and snapshots
    /// keep its state; `disk0`, `disk1`… by position when absent (see [`VmConfig::disk_ids`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The image file.
    pub path: PathBuf,
    /// Its format as the user states it. Without it the format is probed (qcow2 magic), and a
    /// probed qcow2 image gets no backing or data file opened.
    #[serde(default)]
    pub format: Option<DiskFormat>,
    /// Set by tern, not by users: the format probed when the VM was first built, kept across
    /// reboots and snapshots so that a guest cannot change how its disk is opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probed_format: Option<DiskFormat>,
    /// The external data file a qcow2 image may use (it names it in its header; tern opens it
    /// only when it is this file, and only with `format=qcow2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_file: Option<PathBuf>,
    /// The guest cannot write (VIRTIO_BLK_F_RO); the file is opened read-only.
    #[serde(default)]
    pub readonly: bool,
    /// The disk's serial number (get-id), at most 20 bytes.
    #[serde(default)]
    pub serial: Option<String>,
    /// Host caching.
    #[serde(default)]
    pub cache: DiskCache,
    /// Request queues (VIRTIO_BLK_F_MQ when more than 1), 1..=16.
    #[serde(default = "default_queues")]
    pub queues: u16,
    /// Operations per second (0: no limit).
    #[serde(default)]
    pub iops: u64,
    /// Bytes per second (0: no limit).
    #[serde(default)]
    pub bw: u64,
    /// I/O engine.
    #[serde(default)]
    pub io: DiskIo,
}

fn on_off(field: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(invalid(field, v, "expected on or off")),
    }
}

/// A byte rate: a number with an optional K, M or G (binary) suffix and an optional `/s`.
pub(crate) fn byte_rate(field: &'static str, v: &str) -> Result<u64, ConfigError> {
    let t = v.strip_suffix("/s").unwrap_or(v);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| invalid(field, v, "expected bytes per second, e.g. 50M"))
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    /// Parses `path=IMG[,id=ID][,format=raw|qcow2][,data_file=PATH][,readonly=on][,serial=ID]
    /// [,cache=none|writeback][,queues=N][,iops=N][,bw=BYTES/s][,io=auto|io_uring|sync]`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut path = None;
        let mut d = DiskConfig {
            id: None,
            path: PathBuf::new(),
            format: None,
            probed_format: None,
            data_file: None,
            readonly: false,
            serial: None,
            cache: DiskCache::default(),
            queues: default_queues(),
            iops: 0,
            bw: 0,
            io: DiskIo::default(),
        };
        for item in s.split(',') {
            let Some((k, v)) = item.split_once('=') else {
                return Err(invalid("disk", item, "expected key=value"));
            };
            let kw = |field| move |why: String| invalid(field, v, why);
            match k {
                "id" => d.id = Some(v.to_string()),
                "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
                "format" => d.format = Some(v.parse().map_err(kw("disk format"))?),
                "data_file" if !v.is_empty() => d.data_file = Some(PathBuf::from(v)),
                "readonly" | "ro" => d.readonly = on_off("disk readonly", v)?,
                "serial" => d.serial = Some(v.to_string()),
                "cache" => d.cache = v.parse().map_err(kw("disk cache"))?,
                "io" => d.io = v.parse().map_err(kw("disk io"))?,
                "queues" => {
                    d.queues = v
                        .parse()
                        .map_err(|_| invalid("disk queues", v, "expected a number"))?
                }
                "iops" => {
                    d.iops = v
                        .parse()
                        .map_err(|_| invalid("disk iops", v, "expected a number"))?
                }
                "bw" => d.bw = byte_rate("disk bw", v)?,
                _ => {
                    return Err(invalid(
                        "disk",
                        item,
                        "expected id, path, format, data_file, readonly, serial, cache, queues, \
                         iops, bw or io",
                    ))
                }
            }
        }
        d.path = path.ok_or(ConfigError::Missing("disk path (--disk path=IMG)"))?;
        Ok(d)
    }
}

impl DiskConfig {
    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = self.path.display();
        if self.data_file.is_some() && self.format != Some(DiskFormat::Qcow2) {
            return Err(invalid(
                "disk data_file",
                self.data_file
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string()),
                format!("needs format=qcow2 ({name})"),
            ));
        }
        if !(1..=16).contains(&self.queues) {
            return Err(invalid(
                "disk queues",
                self.queues,
                format!("must be 1 to 16 ({name})"),
            ));
        }
        if let Some(s) = &self.serial {
            if s.len() > 20 || !s.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "disk serial",
                    s,
                    "must be at most 20 printable ASCII characters",
                ));
            }
        }
        Ok(())
    }
}

/// A MAC address, written `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut m = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err("expected six hex bytes like 52:54:00:12:34:56".into());
        }
        for (b, p) in m.iter_mut().zip(parts) {
            *b = u8::from_str_radix(p, 16)
                .ok()
                .filter(|_| p.len() == 2)
                .ok_or("expected six hex bytes like 52:54:00:12:34:56")?;
        }
        if m[0] & 1 != 0 {
            return Err("a multicast address cannot be a NIC's address".into());
        }
        Ok(MacAddr(m))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let t = String::deserialize(d)?;
        t.parse()
            .map_err(|e: String| serde::de::Error::custom(format!("mac '{t}': {e}")))
    }
}

fn default_mtu() -> u16 {
    1500
}

fn default_true() -> bool {
    true
}

/// One virtio-net interface on a TAP device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The interface's id, by which the API changes it (`PATCH /v1/vm/nets/{id}`) and
    /// snapshots keep its state; `net0`, `net1`… by position when absent (see
    /// [`VmConfig::net_ids`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// An existing TAP's name, or `auto` to create one for the VM's lifetime.
    pub tap: String,
    /// The guest's MAC; a locally administered one derived from the TAP name when absent.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Queue pairs (VIRTIO_NET_F_MQ above 1; the TAP must then be multi-queue), 1..=8.
    #[serde(default = "default_queues")]
    pub queues: u16,
    /// MTU the guest is told, 68..=65535.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Offer checksum and TSO offloads.
    #[serde(default = "default_true")]
    pub offload: bool,
    /// Guest receive bytes/s (0: no limit).
    #[serde(default)]
    pub rx_bw: u64,
    /// Guest transmit bytes/s (0: no limit).
    #[serde(default)]
    pub tx_bw: u64,
    /// Guest receive frames/s (0: no limit).
    #[serde(default)]
    pub rx_ops: u64,
    /// Guest transmit frames/s (0: no limit).
    #[serde(default)]
    pub tx_ops: u64,
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    /// Parses `tap=NAME|auto[,id=ID][,mac=M][,queues=N][,mtu=N][,offload=on|off][,rx_bw=R][,tx_bw=R]
    /// [,rx_ops=N][,tx_ops=N]`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut n = NetConfig {
            id: None,
            tap: String::new(),
            mac: None,
            queues: default_queues(),
            mtu: default_mtu(),
            offload: true,
            rx_bw: 0,
            tx_bw: 0,
            rx_ops: 0,
            tx_ops: 0,
        };
        for item in s.split(',') {
            let Some((k, v)) = item.split_once('=') else {
                return Err(invalid("net", item, "expected key=value"));
            };
            let number = |field: &'static str| {
                v.parse::<u64>()
                    .map_err(|_| invalid(field, v, "expected a number"))
            };
            match k {
                "id" => n.id = Some(v.to_string()),
                "tap" if !v.is_empty() => n.tap = v.to_string(),
                "mac" => n.mac = Some(v.parse().map_err(|why| invalid("net mac", v, why))?),
                "queues" => {
                    n.queues = number("net queues")?
                        .try_into()
                        .map_err(|_| invalid("net queues", v, "too large"))?
                }
                "mtu" => {
                    n.mtu = number("net mtu")?
                        .try_into()
                        .map_err(|_| invalid("net mtu", v, "must be 68 to 65535"))?
                }
                "offload" => n.offload = on_off("net offload", v)?,
                "rx_bw" => n.rx_bw = byte_rate("net rx_bw", v)?,
                "tx_bw" => n.tx_bw = byte_rate("net tx_bw", v)?,
                "rx_ops" => n.rx_ops = number("net rx_ops")?,
                "tx_ops" => n.tx_ops = number("net tx_ops")?,
                _ => return Err(invalid(
                    "net",
                    item,
                    "expected id, tap, mac, queues, mtu, offload, rx_bw, tx_bw, rx_ops or tx_ops",
                )),
            }
        }
        if n.tap.is_empty() {
            return Err(ConfigError::Missing("net tap (--net tap=NAME or tap=auto)"));
        }
        Ok(n)
    }
}

impl NetConfig {
    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=8).contains(&self.queues) {
            return Err(invalid("net queues", self.queues, "must be 1 to 8"));
        }
        if self.mtu < 68 {
            return Err(invalid("net mtu", self.mtu, "must be 68 to 65535"));
        }
        if self.tap != "auto"
            && (self.tap.len() > 15 || self.tap.contains('/') || self.tap.contains('%'))
        {
            return Err(invalid(
                "net tap",
                &self.tap,
                "must be an interface name of at most 15 characters, or auto",
            ));
        }
        Ok(())
    }

    /// The MAC the guest gets: the configured one, or a locally administered address derived
    /// from the TAP name and the interface's position (stable across runs of the same VM).
    pub fn effective_mac(&self, index: usize) -> MacAddr {
        if let Some(m) = self.mac {
            return m;
        }
        let h = format!("{}#{index}", self.tap)
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        let b = h.to_le_bytes();
        MacAddr([0x02, 0x74, 0x6e, b[0], b[1], b[2]])
    }
}

fn default_cpus() -> u32 {
    1
}

fn default_memory() -> MemSize {
    MemSize(512 << 20)
}

/// A virtio-vsock device (`--vsock cid=N,socket=PATH`): the guest's CID, and the Unix socket
/// on the host where host programs connect (`CONNECT <port>\n`) and beside which guest
/// connections to host port P reach `PATH_P`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id: 3 to 4294967294.
    pub cid: u32,
    /// The host's Unix socket (made by tern; a stale one is replaced).
    pub socket: PathBuf,
}

impl VsockConfig {
    /// Checks the CID.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cid < 3 || self.cid == u32::MAX {
            return Err(invalid(
                "vsock cid",
                self.cid.to_string(),
                "0 to 2 are reserved (2 is the host) and 4294967295 means any: give 3 to 4294967294",
            ));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(ConfigError::Missing("vsock socket (socket=PATH)"));
        }
        Ok(())
    }
}

impl FromStr for VsockConfig {
    type Err = ConfigError;

    /// Parses `cid=N,socket=PATH`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (mut cid, mut socket) = (None, None);
        for item in s.split(',') {
            match item.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(v.parse::<u32>().map_err(|_| {
                        invalid("vsock cid", v, "expected a number from 3 to 4294967294")
                    })?)
                }
                Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
                _ => return Err(invalid("vsock", item, "expected cid=N and socket=PATH")),
            }
        }
        let c = VsockConfig {
            cid: cid.ok_or(ConfigError::Missing("vsock cid (cid=N)"))?,
            socket: socket.ok_or(ConfigError::Missing("vsock socket (socket=PATH)"))?,
        };
        c.validate()?;
        Ok(c)
    }
}

/// Everything needed to build and boot one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: bzImage or ELF vmlinux.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Firmware that boots the OS from the VM's disks instead of a kernel (`bios`, `uefi` or
    /// an image path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<crate::firmware::Firmware>,
    /// The file holding this VM's UEFI variables (`uefi` firmware only): created from OVMF's
    /// template when missing, then kept across boots. Without it, variables last as long as
    /// the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uefi_vars: Option<PathBuf>,
    /// Initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; [`DEFAULT_CMDLINE`] when absent.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Number of vCPUs, 1..=254.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Most vCPUs the VM may have through CPU hotplug (`tern resize --cpus`), cpus..=254; the
    /// same as `cpus` when absent (no hotplug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<u32>,
    /// Guest RAM at boot.
    #[serde(default = "default_memory")]
    pub memory: MemSize,
    /// Most guest RAM the VM may have through memory hotplug (`tern resize --memory`): a
    /// virtio-mem device of `max_memory - memory` bytes, which must be a multiple of
    /// [`HOTPLUG_MEMORY_ALIGN`]; the same as `memory` when absent (no memory hotplug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<MemSize>,
    /// Serial port (COM1) backend.
    #[serde(default)]
    pub serial: CharBackend,
    /// Kernel entry protocol.
    #[serde(default)]
    pub boot_protocol: BootProtocol,
    /// bzImage decompression.
    #[serde(default)]
    pub decompress: Decompress,
    /// Guest reboot behaviour.
    #[serde(default)]
    pub on_reboot: OnReboot,
    /// virtio transport for every virtio device.
    #[serde(default)]
    pub transport: Transport,
    /// A virtio-rng device backed by the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    /// A virtio-console device (the guest's `hvc0`) and its backend.
    #[serde(default)]
    pub console: Option<CharBackend>,
    /// virtio-blk disks, in order (the first is the guest's `vda`).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces on TAP devices, in order (the first is the guest's `eth0`).
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// Seconds the guest has to power off after SIGTERM presses its power button (0: SIGTERM
    /// stops the VM at once, pressing nothing).
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: u64,
    /// Track the guest memory the guest and the devices write (KVM dirty logging), so a
    /// snapshot can hold only what changed since the previous one (a diff snapshot).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Back guest memory with a shared memory file (memfd) instead of private anonymous
    /// memory, so that a local migration (`tern migrate --local`) hands the memory itself to
    /// the new tern instead of copying it.
    #[serde(default)]
    pub memory_shared: bool,
    /// A virtio-balloon device, through which the host asks the guest for memory back.
    #[serde(default)]
    pub balloon: Option<crate::balloon::BalloonConfig>,
    /// A virtio-vsock device: stream sockets between the guest and Unix sockets on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Set by tern, not by users: the PCI slot of each virtio device by id, recorded when the
    /// VM is built and as devices are plugged in and out, so that a snapshot or a migration
    /// rebuilds every device where the guest knows it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub pci_slots: std::collections::BTreeMap<String, u8>,
}

fn default_shutdown_timeout() -> u64 {
    20
}

/// Ids of tern's own components, which a disk or interface cannot take (nor `vcpu` followed
/// by a number).
pub const RESERVED_IDS: &[&str] = &[
    "kvm-vm",
    "pci-hotplug",
    "com1",
    "rtc",
    "acpi-pm",
    "vmgenid",
    "pci-root",
    "cpu-hotplug",
    "virtio-rng",
    "virtio-console",
    "virtio-balloon",
    "virtio-mem",
];

/// Longest device id.
pub const MAX_ID_LEN: usize = 32;

/// A disk's or interface's own id: 1 to [`MAX_ID_LEN`] letters, digits, `-`, `_` and `.`,
/// starting with a letter or digit, and none of tern's own ([`RESERVED_IDS`]).
pub fn check_device_id(id: &str) -> Result<(), ConfigError> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || !ok_chars
        || !id.as_bytes()[0].is_ascii_alphanumeric()
    {
        return Err(invalid(
            "device id",
            head(id, 64),
            format!(
                "must be 1 to {MAX_ID_LEN} letters, digits, '-', '_' or '.', starting with a letter or digit"
            ),
        ));
    }
    let vcpu = id
        .strip_prefix("vcpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if vcpu || RESERVED_IDS.contains(&id) {
        return Err(invalid(
            "device id",
            id,
            "is the id of one of tern's own devices",
        ));
    }
    Ok(())
}

/// Longest `shutdown_timeout` accepted: one day, in seconds.
pub const MAX_SHUTDOWN_TIMEOUT: u64 = 24 * 60 * 60;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn head(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: None,
            firmware: None,
            uefi_vars: None,
            initrd: None,
            cmdline: None,
            cpus: default_cpus(),
            max_cpus: None,
            memory: default_memory(),
            max_memory: None,
            serial: CharBackend::default(),
            boot_protocol: BootProtocol::default(),
            decompress: Decompress::default(),
            on_reboot: OnReboot::default(),
            transport: Transport::default(),
            rng: false,
            console: None,
            disks: Vec::new(),
            nets: Vec::new(),
            shutdown_timeout: default_shutdown_timeout(),
            track_dirty_pages: false,
            memory_shared: false,
            balloon: None,
            vsock: None,
            pci_slots: Default::default(),
        }
    }
}

impl VmConfig {
    /// Parses a config file: JSON when it starts with `{`, TOML otherwise.
    pub fn from_file_text(path: &str, text: &str) -> Result<Self, ConfigError> {
        let file_err = |why: String| ConfigError::File {
            path: path.to_string(),
            why,
        };
        if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| file_err(e.to_string()))
        } else {
            toml::from_str(text).map_err(|e| file_err(e.message().to_string()))
        }
    }

    /// Each disk's id, in order: its own, or `disk{n}` for the lowest `n` no device uses
    /// (`disk0`, `disk1`… when no disk has its own).
    pub fn disk_ids(&self) -> Vec<String> {
        let (disks, _) = self.device_ids();
        disks
    }

    /// Each interface's id, in order: its own, or `net{n}` for the lowest `n` no device uses.
    pub fn net_ids(&self) -> Vec<String> {
        let (_, nets) = self.device_ids();
        nets
    }

    fn device_ids(&self) -> (Vec<String>, Vec<String>) {
        let mut taken: std::collections::HashSet<String> = self
            .disks
            .iter()
            .filter_map(|d| d.id.clone())
            .chain(self.nets.iter().filter_map(|n| n.id.clone()))
            .collect();
        let mut fill = |given: Vec<Option<String>>, prefix: &str| {
            let mut next = 0usize;
            given
                .into_iter()
                .map(|id| {
                    id.unwrap_or_else(|| loop {
                        let id = format!("{prefix}{next}");
                        next += 1;
                        if taken.insert(id.clone()) {
                            break id;
                        }
                    })
                })
                .collect::<Vec<_>>()
        };
        let disks = fill(self.disks.iter().map(|d| d.id.clone()).collect(), "disk");
        let nets = fill(self.nets.iter().map(|n| n.id.clone()).collect(), "net");
        (disks, nets)
    }

    /// The id a new disk or interface gets when it is given none: `{prefix}{n}` for the
    /// lowest `n` no device uses.
    pub fn free_device_id(&self, prefix: &str) -> String {
        let (disks, nets) = self.device_ids();
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .find(|c| !disks.contains(c) && !nets.contains(c))
            .expect("there are ever more ids")
    }

    /// Writes every disk's and interface's id into the configuration (those without one get
    /// theirs from [`disk_ids`](Self::disk_ids) and [`net_ids`](Self::net_ids)), so that
    /// `GET /v1/vm` shows them and they stay as they are when devices come and go.
    pub fn assign_device_ids(&mut self) {
        let (disks, nets) = self.device_ids();
        for (d, id) in self.disks.iter_mut().zip(disks) {
            d.id = Some(id);
        }
        for (n, id) in self.nets.iter_mut().zip(nets) {
            n.id = Some(id);
        }
    }

    /// Most vCPUs the VM may have (`max_cpus`, or `cpus` without hotplug).
    pub fn effective_max_cpus(&self) -> u32 {
        self.max_cpus.unwrap_or(self.cpus).max(self.cpus)
    }

    /// Bytes of hotpluggable memory (`max_memory - memory`; zero without memory hotplug).
    pub fn hotplug_memory(&self) -> u64 {
        self.max_memory
            .map_or(0, |m| m.0.saturating_sub(self.memory.0))
    }

    /// The command line the guest gets: `cmdline` or [`DEFAULT_CMDLINE`]; with hotpluggable
    /// memory, [`MEMORY_HOTPLUG_CMDLINE`] appended unless the line sets
    /// `memhp_default_state` itself, so that Linux onlines the memory virtio-mem adds as
    /// movable (which it can take away again).
    pub fn effective_cmdline(&self) -> std::borrow::Cow<'_, str> {
        let base = self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE);
        if self.hotplug_memory() > 0 && !base.contains("memhp_default_state=") {
            format!("{base} {MEMORY_HOTPLUG_CMDLINE}").into()
        } else {
            base.into()
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        if let Some(size) = self.balloon.and_then(|b| b.size) {
            if size.0 >= self.memory.0 {
                return Err(invalid(
                    "balloon size",
                    size,
                    format!(
                        "it must leave the guest some of its memory ({})",
                        self.memory
                    ),
                ));
            }
        }
        match (&self.kernel, &self.firmware) {
            (None, None) => {
                return Err(ConfigError::Missing(
                    "kernel (--kernel PATH) or firmware (--firmware bios|uefi|PATH)",
                ))
            }
            (Some(_), Some(f)) => {
                return Err(invalid(
                    "firmware",
                    f,
                    "the firmware boots the OS from the VM's disks: give --kernel or --firmware, not both",
                ))
            }
            (None, Some(f)) => {
                if let Err(why) = f.image() {
                    if *f == crate::firmware::Firmware::Uefi {
                        return Err(invalid("firmware", f, why));
                    }
                }
                for (given, field) in [
                    (self.initrd.is_some(), "initrd"),
                    (self.cmdline.is_some(), "cmdline"),
                ] {
                    if given {
                        return Err(invalid(
                            "firmware",
                            f,
                            format!("{field} is for a kernel tern boots; a firmware boot takes the bootloader's"),
                        ));
                    }
                }
            }
            (Some(_), None) => {}
        }
        if let Some(v) = &self.uefi_vars {
            if self.firmware != Some(crate::firmware::Firmware::Uefi) {
                return Err(invalid(
                    "uefi_vars",
                    v.display(),
                    "UEFI variables are for --firmware uefi",
                ));
            }
        }
        if !(1..=254).contains(&self.cpus) {
            return Err(invalid("cpus", self.cpus, "must be between 1 and 254"));
        }
        if let Some(m) = self.max_cpus {
            if !(self.cpus..=254).contains(&m) {
                return Err(invalid(
                    "max_cpus",
                    m,
                    format!("must be between cpus ({}) and 254", self.cpus),
                ));
            }
        }
        let m = self.memory.0;
        if m < MIN_MEMORY {
            return Err(invalid("memory", self.memory, "must be at least 16M"));
        }
        if m > MAX_MEMORY {
            return Err(invalid("memory", self.memory, "must be at most 1T"));
        }
        if !m.is_multiple_of(4096) {
            return Err(invalid("memory", self.memory, "must be a multiple of 4K"));
        }
        if let Some(max) = self.max_memory {
            let extra = max.0.checked_sub(m).ok_or_else(|| {
                invalid(
                    "max_memory",
                    max,
                    format!("must be at least memory ({})", self.memory),
                )
            })?;
            if max.0 > MAX_MEMORY {
                return Err(invalid("max_memory", max, "must be at most 1T"));
            }
            if !extra.is_multiple_of(HOTPLUG_MEMORY_ALIGN) {
                return Err(invalid(
                    "max_memory",
                    max,
                    format!(
                        "must exceed memory ({}) by a multiple of 128M (the hotpluggable part)",
                        self.memory
                    ),
                ));
            }
        }
        let cmd = self.effective_cmdline();
        if cmd.len() > CMDLINE_MAX_SIZE {
            return Err(invalid(
                "cmdline",
                format!("{}...", head(&cmd, 32)),
                format!(
                    "is {} bytes; at most {} are allowed",
                    cmd.len(),
                    CMDLINE_MAX_SIZE
                ),
            ));
        }
        if self.serial == CharBackend::Stdio && self.console == Some(CharBackend::Stdio) {
            return Err(invalid(
                "console",
                "stdio",
                "the serial port already uses stdio; give one of them --serial none or a file",
            ));
        }
        if self.shutdown_timeout > MAX_SHUTDOWN_TIMEOUT {
            return Err(invalid(
                "shutdown_timeout",
                self.shutdown_timeout,
                format!("must be at most {MAX_SHUTDOWN_TIMEOUT} seconds (one day)"),
            ));
        }
        for d in &self.disks {
            d.validate()?;
        }
        for n in &self.nets {
            n.validate()?;
        }
        let mut seen = std::collections::HashSet::new();
        for id in self
            .disks
            .iter()
            .filter_map(|d| d.id.as_deref())
            .chain(self.nets.iter().filter_map(|n| n.id.as_deref()))
        {
            check_device_id(id)?;
            if !seen.insert(id) {
                return Err(invalid("device id", id, "is used by two devices"));
            }
        }
        // Set by tern (and read back from snapshots and migration streams).
        let mut taken = std::collections::BTreeMap::new();
        for (id, &slot) in &self.pci_slots {
            if !(1..32).contains(&slot) {
                return Err(invalid(
                    "pci_slots",
                    format!("{id}={slot}"),
                    "PCI slots for devices are 1 to 31",
                ));
            }
            if let Some(other) = taken.insert(slot, id) {
                return Err(invalid(
                    "pci_slots",
                    format!("{id}={slot}"),
                    format!("{other} is in that slot"),
                ));
            }
        }
        if cmd.contains('\0') {
            return Err(invalid(
                "cmdline",
                cmd.replace('\0', "\\0"),
                "contains a NUL byte",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_given_or_generated_and_checked() {
        let mut c = VmConfig {
            kernel: Some("k".into()),
            disks: vec![
                "path=a".parse().unwrap(),
                "path=b,id=disk0".parse().unwrap(),
                "path=c".parse().unwrap(),
            ],
            nets: vec![
                "tap=t0".parse().unwrap(),
                "tap=t1,id=uplink".parse().unwrap(),
            ],
            ..VmConfig::default()
        };
        assert_eq!(c.disk_ids(), ["disk1", "disk0", "disk2"]);
        assert_eq!(c.net_ids(), ["net0", "uplink"]);
        c.validate().unwrap();
        c.assign_device_ids();
        assert_eq!(c.disks[0].id.as_deref(), Some("disk1"));
        assert_eq!(c.nets[0].id.as_deref(), Some("net0"));
        assert_eq!(c.disk_ids(), ["disk1", "disk0", "disk2"]);
        for (id, why) in [
            ("uplink", "used by two devices"),
            ("vcpu3", "tern's own"),
            ("virtio-rng", "tern's own"),
            ("", "1 to 32"),
            ("-x", "starting with"),
            ("a/b", "letters, digits"),
            (&"x".repeat(33), "1 to 32"),
        ] {
            let mut bad = c.clone();
            bad.disks[2].id = Some(id.to_string());
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(why), "{id}: {e}");
        }
    }

    #[test]
    fn free_ids_and_pci_slots() {
        let mut c = VmConfig {
            kernel: Some("k".into()),
            disks: vec![
                "path=a".parse().unwrap(),
                "path=b,id=disk1".parse().unwrap(),
            ],
            nets: vec!["tap=t0,id=net0".parse().unwrap()],
            ..VmConfig::default()
        };
        assert_eq!(c.free_device_id("disk"), "disk2");
        assert_eq!(c.free_device_id("net"), "net1");
        c.pci_slots = [("disk0".to_string(), 1), ("net0".to_string(), 31)].into();
        c.validate().unwrap();
        for (slots, why) in [
            (
                vec![("disk0", 0)],
                "invalid pci_slots 'disk0=0': PCI slots for devices are 1 to 31",
            ),
            (vec![("disk0", 32)], "invalid pci_slots 'disk0=32'"),
            (vec![("disk0", 255)], "invalid pci_slots 'disk0=255'"),
            (
                vec![("disk0", 3), ("net0", 3)],
                "invalid pci_slots 'net0=3': disk0 is in that slot",
            ),
        ] {
            c.pci_slots = slots.into_iter().map(|(i, s)| (i.to_string(), s)).collect();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(why), "{e}");
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!("512M".parse::<MemSize>(), Ok(MemSize(512 << 20)));
        assert_eq!("512".parse::<MemSize>(), Ok(MemSize(512 << 20)));
        assert_eq!("2g".parse::<MemSize>(), Ok(MemSize(2 << 30)));
        assert_eq!("2GiB".parse::<MemSize>(), Ok(MemSize(2 << 30)));
        assert_eq!("65536K".parse::<MemSize>(), Ok(MemSize(64 << 20)));
        assert_eq!("1T".parse::<MemSize>(), Ok(MemSize(1 << 40)));
        assert!("".parse::<MemSize>().is_err());
        assert!("M".parse::<MemSize>().is_err());
        assert!("12X".parse::<MemSize>().is_err());
        assert!("-1M".parse::<MemSize>().is_err());
        assert!("99999999999999999999G".parse::<MemSize>().is_err());
        assert!("18446744073709551615G".parse::<MemSize>().is_err());
        assert_eq!(MemSize(512 << 20).to_string(), "512M");
        assert_eq!(MemSize(2 << 30).to_string(), "2G");
    }

    #[test]
    fn keywords() {
        assert_eq!("pvh".parse::<BootProtocol>(), Ok(BootProtocol::Pvh));
        assert_eq!(BootProtocol::Linux.to_string(), "linux");
        assert_eq!("guest".parse::<Decompress>(), Ok(Decompress::Guest));
        assert_eq!("restart".parse::<OnReboot>(), Ok(OnReboot::Restart));
        assert_eq!(
            "x".parse::<OnReboot>(),
            Err("expected one of: exit, restart".to_string())
        );
    }

    #[test]
    fn serial_backends() {
        assert_eq!("stdio".parse::<CharBackend>(), Ok(CharBackend::Stdio));
        assert_eq!("none".parse::<CharBackend>(), Ok(CharBackend::None));
        assert_eq!(
            "file:/tmp/x".parse::<CharBackend>(),
            Ok(CharBackend::File("/tmp/x".into()))
        );
        assert!("file:".parse::<CharBackend>().is_err());
        assert!("tcp:1".parse::<CharBackend>().is_err());
    }

    fn valid() -> VmConfig {
        VmConfig {
            kernel: Some("/k".into()),
            ..Default::default()
        }
    }

    #[test]
    fn uefi_variables_go_with_uefi_only() {
        let vars = Some(PathBuf::from("/vm/vars.fd"));
        for (kernel, firmware) in [
            (Some(PathBuf::from("/k")), None),
            (None, Some(crate::firmware::Firmware::Bios)),
        ] {
            let e = VmConfig {
                kernel,
                firmware,
                uefi_vars: vars.clone(),
                ..VmConfig::default()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert_eq!(
                e,
                "invalid uefi_vars '/vm/vars.fd': UEFI variables are for --firmware uefi"
            );
        }
        let uefi = VmConfig {
            firmware: Some(crate::firmware::Firmware::Uefi),
            uefi_vars: vars,
            ..VmConfig::default()
        };
        match crate::firmware::uefi_files() {
            Ok(_) => assert_eq!(uefi.validate(), Ok(())),
            Err(why) => assert!(uefi.validate().unwrap_err().to_string().contains(&why)),
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(valid().validate().is_ok());
        assert_eq!(
            VmConfig::default().validate(),
            Err(ConfigError::Missing(
                "kernel (--kernel PATH) or firmware (--firmware bios|uefi|PATH)"
            ))
        );
        let e = VmConfig { cpus: 0, ..valid() }
            .validate()
            .unwrap_err()
            .to_string();
        assert_eq!(e, "invalid cpus '0': must be between 1 and 254");
        assert!(VmConfig {
            cpus: 255,
            ..valid()
        }
        .validate()
        .is_err());
        assert!(VmConfig {
            cpus: 254,
            ..valid()
        }
        .validate()
        .is_ok());
        let e = VmConfig {
            memory: MemSize(1 << 20),
            ..valid()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert_eq!(e, "invalid memory '1M': must be at least 16M");
        assert!(VmConfig {
            memory: MemSize((16 << 20) + 1),
            ..valid()
        }
        .validate()
        .is_err());
        assert!(VmConfig {
            memory: MemSize(2 << 40),
            ..valid()
        }
        .validate()
        .is_err());
        assert!(VmConfig {
            cmdline: Some("x".repeat(70000)),
            ..valid()
        }
        .validate()
        .is_err());
        assert!(VmConfig {
            cmdline: Some("a\0b".into()),
            ..valid()
        }
        .validate()
        .is_err());
    }

    /// An over-long command line is refused with a short excerpt of it, even when a
    /// multi-byte character straddles the excerpt's end.
    #[test]
    fn long_cmdline_with_multibyte_characters() {
        for pad in 0..4 {
            let cmd = format!("{}{}", "a".repeat(30 + pad), "é€😀".repeat(20_000));
            let e = VmConfig {
                cmdline: Some(cmd.clone()),
                ..valid()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("invalid cmdline 'aaaa"), "{e}");
            assert!(e.contains(&format!("is {} bytes", cmd.len())), "{e}");
        }
        assert_eq!(head("aé", 2), "a");
        assert_eq!(head("aé", 3), "aé");
        assert_eq!(head("ab", 32), "ab");
    }

    /// A shutdown timeout is bounded (one day), so the deadline it sets cannot overflow.
    #[test]
    fn shutdown_timeout_is_bounded() {
        let ok = VmConfig {
            shutdown_timeout: MAX_SHUTDOWN_TIMEOUT,
            ..valid()
        };
        assert!(ok.validate().is_ok());
        for t in [MAX_SHUTDOWN_TIMEOUT + 1, u64::MAX] {
            let e = VmConfig {
                shutdown_timeout: t,
                ..valid()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert_eq!(
                e,
                format!("invalid shutdown_timeout '{t}': must be at most 86400 seconds (one day)")
            );
        }
        let c = VmConfig::from_file_text(
            "vm.json",
            r#"{"kernel": "/k", "shutdown_timeout": 18446744073709551615}"#,
        )
        .unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn virtio_settings() {
        let c = VmConfig::from_file_text(
            "vm.toml",
            "kernel = \"/k\"\nrng = true\nconsole = \"none\"\ntransport = \"mmio\"\n",
        )
        .unwrap();
        assert!(c.rng);
        assert_eq!(c.console, Some(CharBackend::None));
        assert_eq!(c.transport, Transport::Mmio);
        assert!(c.validate().is_ok());
        assert_eq!(VmConfig::default().transport, Transport::Pci);
        let e = VmConfig {
            console: Some(CharBackend::Stdio),
            ..valid()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("invalid console 'stdio'"), "{e}");
        assert!(VmConfig {
            console: Some(CharBackend::Stdio),
            serial: CharBackend::None,
            ..valid()
        }
        .validate()
        .is_ok());
        assert_eq!("mmio".parse::<Transport>(), Ok(Transport::Mmio));
    }

    #[test]
    fn toml_and_json_files() {
        let t = "kernel = \"/boot/vmlinuz\"\ncpus = 2\nmemory = \"1G\"\nserial = \"file:/tmp/s\"\nboot_protocol = \"pvh\"\n";
        let c = VmConfig::from_file_text("vm.toml", t).unwrap();
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory, MemSize(1 << 30));
        assert_eq!(c.serial, CharBackend::File("/tmp/s".into()));
        assert_eq!(c.boot_protocol, BootProtocol::Pvh);
        let j = r#"{"kernel": "/k", "memory": 256, "on_reboot": "restart"}"#;
        let c = VmConfig::from_file_text("vm.json", j).unwrap();
        assert_eq!(c.memory, MemSize(256 << 20));
        assert_eq!(c.on_reboot, OnReboot::Restart);
        // Unknown fields and bad values are named.
        let e = VmConfig::from_file_text("vm.toml", "kernal = \"/k\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kernal"), "{e}");
        let e = VmConfig::from_file_text("vm.json", r#"{"memory": "lots"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lots"), "{e}");
        // Round trip.
        let c = VmConfig {
            cmdline: Some("quiet".into()),
            ..valid()
        };
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn disk_specs() {
        let d: DiskConfig = "path=/a.img,format=qcow2,readonly=on,serial=s1,cache=none,queues=4,iops=100,bw=50M,io=sync"
            .parse()
            .unwrap();
        assert_eq!(d.path, PathBuf::from("/a.img"));
        assert_eq!(d.format, Some(DiskFormat::Qcow2));
        assert!(d.readonly);
        assert_eq!(d.serial.as_deref(), Some("s1"));
        assert_eq!(d.cache, DiskCache::None);
        assert_eq!((d.queues, d.iops, d.bw), (4, 100, 50 << 20));
        assert_eq!(d.io, DiskIo::Sync);
        let d: DiskConfig = "path=/b.raw".parse().unwrap();
        assert_eq!(
            (d.format, d.readonly, d.queues, d.io),
            (None, false, 1, DiskIo::Auto)
        );
        // An external data file is named by the user, and only for a stated qcow2 image.
        let d: DiskConfig = "path=/c.qcow2,format=qcow2,data_file=/c.data"
            .parse()
            .unwrap();
        assert_eq!(d.data_file, Some(PathBuf::from("/c.data")));
        d.validate().unwrap();
        let d: DiskConfig = "path=/c.qcow2,data_file=/c.data".parse().unwrap();
        let e = d.validate().unwrap_err().to_string();
        assert!(e.contains("data_file") && e.contains("format=qcow2"), "{e}");
        // What tern probed is not shown where nothing was probed, and comes back as it went.
        assert!(!serde_json::to_string(&d).unwrap().contains("probed_format"));
        let p = DiskConfig {
            probed_format: Some(DiskFormat::Raw),
            ..d
        };
        let back: DiskConfig = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        for (bad, why) in [
            ("format=raw", "missing disk path"),
            ("path=/a,readonly=maybe", "invalid disk readonly 'maybe'"),
            ("path=/a,bw=1X", "invalid disk bw '1X'"),
            ("path=/a,what=1", "invalid disk 'what=1'"),
            ("path=/a,x", "invalid disk 'x': expected key=value"),
        ] {
            let e = bad.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let mut c = VmConfig {
            kernel: Some("/k".into()),
            ..VmConfig::default()
        };
        c.disks.push("path=/a,queues=17".parse().unwrap());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("must be 1 to 16"));
        c.disks[0] = "path=/a,serial=123456789012345678901".parse().unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn net_specs_and_macs() {
        let n: NetConfig =
            "tap=tap0,mac=52:54:00:ab:cd:ef,queues=2,mtu=9000,offload=off,rx_bw=10M,tx_ops=5"
                .parse()
                .unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:ab:cd:ef");
        assert_eq!((n.queues, n.mtu, n.offload), (2, 9000, false));
        assert_eq!((n.rx_bw, n.tx_ops, n.tx_bw, n.rx_ops), (10 << 20, 5, 0, 0));
        // Generated MACs are locally administered, unicast and stable.
        let a: NetConfig = "tap=auto".parse().unwrap();
        let m = a.effective_mac(0);
        assert_eq!(m.0[0] & 3, 2);
        assert_eq!(m, a.effective_mac(0));
        assert_ne!(m, a.effective_mac(1));
        for bad in [
            "mac=52:54:00:ab:cd:ef",
            "tap=t,mac=01:00:5e:00:00:01",
            "tap=t,mac=zz",
            "tap=t,mtu=70000",
            "tap=t,nope=1",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
        let mut c = VmConfig {
            kernel: Some("/k".into()),
            ..VmConfig::default()
        };
        c.nets.push("tap=t,queues=9".parse().unwrap());
        assert!(c.validate().is_err());
        c.nets[0] = "tap=averyveryverylongname".parse().unwrap();
        assert!(c.validate().is_err());
        c.nets[0] = "tap=tap0".parse().unwrap();
        c.validate().unwrap();
        // The same in a config file.
        let f = VmConfig::from_file_text(
            "t.toml",
            "kernel = \"/k\"\n[[disks]]\npath = \"/d.img\"\nreadonly = true\n[[nets]]\ntap = \"tap0\"\nmac = \"02:00:00:00:00:01\"\n",
        )
        .unwrap();
        assert!(f.disks[0].readonly);
        assert_eq!(f.nets[0].mac.unwrap().0, [2, 0, 0, 0, 0, 1]);
    }
}
