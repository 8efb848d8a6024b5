//! Live migration as the API speaks it: the bodies of `PUT /v1/vm/migrate/send`
//! ([`SendOptions`]) and `PUT /v1/vm/migrate/receive` ([`ReceiveOptions`]), and the answer of
//! `GET /v1/vm/migrate` ([`MigrationStatus`]). `tern migrate` and `tern run --incoming` fill in
//! the same structures.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::CharBackend;

/// Where a migration stream goes or comes from: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationUrl {
    /// A TCP address (`HOST:PORT`; HOST a name, an IPv4 address or a bracketed IPv6 one).
    Tcp(String),
    /// A Unix stream socket path.
    Unix(PathBuf),
}

impl FromStr for MigrationUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(a) = s.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(MigrationUrl::Tcp(a.to_string()))
                }
                _ => Err(format!(
                    "invalid migration URL '{s}': expected tcp:HOST:PORT (e.g. tcp:10.0.0.2:4444)"
                )),
            }
        } else if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("invalid migration URL '{s}': expected unix:PATH"));
            }
            Ok(MigrationUrl::Unix(p.into()))
        } else {
            Err(format!(
                "invalid migration URL '{s}': expected tcp:HOST:PORT or unix:PATH"
            ))
        }
    }
}

impl fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUrl::Tcp(a) => write!(f, "tcp:{a}"),
            MigrationUrl::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Serialize for MigrationUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MigrationUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the source does when the migration has not converged by its timeout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Give up: the VM keeps running on the source.
    #[default]
    Cancel,
    /// Stop the VM and send what is left, however long that takes.
    Force,
}

impl FromStr for OnTimeout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cancel" => Ok(OnTimeout::Cancel),
            "force" => Ok(OnTimeout::Force),
            _ => Err(format!(
                "invalid --on-timeout '{s}': expected cancel or force"
            )),
        }
    }
}

/// Default downtime limit (ms).
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Default time a migration may take before `on_timeout` applies (s).
pub const DEFAULT_TIMEOUT_S: u64 = 3600;

fn default_downtime() -> u64 {
    DEFAULT_DOWNTIME_MS
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_S
}

/// The body of `PUT /v1/vm/migrate/send`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendOptions {
    /// The destination tern (`tern run --incoming URL`).
    pub url: MigrationUrl,
    /// The longest the VM may stand still at the switch-over: pre-copy rounds go on until
    /// what is left can be sent in this time at the measured bandwidth.
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Seconds after which a migration that has not converged is given up or forced.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// What happens at the timeout.
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// Bytes per second the stream may use (0: as fast as it goes).
    #[serde(default)]
    pub max_bandwidth: u64,
    /// Slow down the vCPUs of a guest that writes memory faster than it can be sent.
    #[serde(default)]
    pub auto_converge: bool,
    /// A local migration (a live upgrade to a new tern on this host, over `unix:`): guest
    /// memory, shared (`memory_shared`), is handed over as a file descriptor, not copied.
    #[serde(default)]
    pub local: bool,
}

impl SendOptions {
    /// Options with every default, to `url`.
    pub fn to(url: MigrationUrl) -> Self {
        SendOptions {
            url,
            downtime_ms: DEFAULT_DOWNTIME_MS,
            timeout_s: DEFAULT_TIMEOUT_S,
            on_timeout: OnTimeout::Cancel,
            max_bandwidth: 0,
            auto_converge: false,
            local: false,
        }
    }

    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), String> {
        if self.downtime_ms == 0 || self.downtime_ms > 60_000 {
            return Err(format!(
                "downtime_ms {} is out of range: 1 to 60000",
                self.downtime_ms
            ));
        }
        if self.local && !matches!(self.url, MigrationUrl::Unix(_)) {
            return Err(format!(
                "a local migration hands memory over a Unix socket: {} is not unix:PATH",
                self.url
            ));
        }
        if self.timeout_s == 0 || self.timeout_s > 7 * 24 * 3600 {
            return Err(format!(
                "timeout_s {} is out of range: 1 to 604800",
                self.timeout_s
            ));
        }
        Ok(())
    }
}

/// Parses a byte rate as the command line writes it (`100M`, `1G/s`, a plain number of bytes).
pub fn parse_rate(v: &str) -> Result<u64, String> {
    crate::config::byte_rate("max bandwidth", v).map_err(|e| e.to_string())
}

/// The body of `PUT /v1/vm/migrate/receive` (an empty tern waits for a migration there), and
/// what `tern run --incoming URL` and its flags ask for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveOptions {
    /// Where to listen.
    pub url: MigrationUrl,
    /// Disk images to open instead of the ones the source names (old path → new path).
    #[serde(default)]
    pub disk_remap: BTreeMap<PathBuf, PathBuf>,
    /// TAPs to use instead of the ones the source names (old name → new name).
    #[serde(default)]
    pub tap_remap: BTreeMap<String, String>,
    /// Where the serial port writes, instead of the source's setting.
    #[serde(default)]
    pub serial: Option<CharBackend>,
    /// Where the virtio-console writes, instead of the source's setting.
    #[serde(default)]
    pub console: Option<CharBackend>,
    /// The vsock's host socket, instead of the one the source names (a VM migrating between
    /// two terns on one host needs another, as the source's stays in use until it ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_socket: Option<PathBuf>,
    /// Directories this host lets the source's VM use files from as the source names them
    /// (kernel, initrd, disk images with their data and backing files, serial and console
    /// files). A file the source names outside them, and not replaced by a remap or by
    /// `serial`/`console` here, is refused: the source does not choose this host's files.
    #[serde(default)]
    pub accept_dirs: Vec<PathBuf>,
    /// TAP names this host lets the source's VM use as the source names them (exact names,
    /// or a prefix ending in `*`); any other TAP needs a `tap_remap` entry.
    #[serde(default)]
    pub accept_taps: Vec<String>,
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// No migration was started.
    #[default]
    None,
    /// Connecting and agreeing on the VM with the destination.
    Setup,
    /// Copying memory while the guest runs.
    Active,
    /// The VM is stopped; the last pages and the state are on their way.
    Completing,
    /// The destination runs the VM.
    Completed,
    /// It failed; the VM runs on here.
    Failed,
    /// It was cancelled; the VM runs on here.
    Cancelled,
}

impl MigrationState {
    /// Whether the migration is over (or never started).
    pub fn finished(self) -> bool {
        !matches!(
            self,
            MigrationState::Setup | MigrationState::Active | MigrationState::Completing
        )
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// The body of `GET /v1/vm/migrate`: the last (or current) outgoing migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Where it is.
    pub state: MigrationState,
    /// The destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Pre-copy round (1: all of memory; then rounds of pages written meanwhile).
    pub iteration: u32,
    /// Bytes sent so far (pages, state and framing).
    pub bytes_sent: u64,
    /// Bytes of written pages still to send, as of the last round.
    pub bytes_remaining: u64,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Pages sent (a page sent again counts again).
    pub pages_sent: u64,
    /// Pages found all zero, sent as a marker only.
    pub zero_pages: u64,
    /// Bytes per second the guest wrote in the last round.
    pub dirty_rate: u64,
    /// Bytes per second the stream carried in the last round.
    pub bandwidth: u64,
    /// The downtime the switch-over would take now (what is left at the measured bandwidth).
    pub expected_downtime_ms: f64,
    /// The limit asked for.
    pub downtime_limit_ms: u64,
    /// How long the VM stood still: from stopping on the source until the destination said
    /// it runs (set once completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// Milliseconds since the migration started.
    pub total_ms: u64,
    /// Whether auto-converge slows the vCPUs, and by how much (percent of time parked).
    pub throttle_percent: u32,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_print_back() {
        for u in [
            "tcp:127.0.0.1:4444",
            "tcp:[::1]:5",
            "tcp:host.example:1",
            "unix:/run/m.sock",
        ] {
            assert_eq!(u.parse::<MigrationUrl>().unwrap().to_string(), u);
        }
        for bad in [
            "tcp:4444",
            "tcp:host:",
            "tcp:host:99999",
            "unix:",
            "http://x",
            "",
        ] {
            let e = bad.parse::<MigrationUrl>().unwrap_err();
            assert!(e.starts_with("invalid migration URL"), "{e}");
        }
    }

    #[test]
    fn a_send_body_needs_only_the_url_and_checks_its_numbers() {
        let o: SendOptions = serde_json::from_str(r#"{"url":"unix:/m"}"#).unwrap();
        assert_eq!(o, SendOptions::to(MigrationUrl::Unix("/m".into())));
        o.validate().unwrap();
        let o: SendOptions = serde_json::from_str(r#"{"url":"unix:/m","downtime_ms":0}"#).unwrap();
        assert!(o.validate().unwrap_err().contains("downtime_ms 0"));
        assert!(serde_json::from_str::<SendOptions>(r#"{"url":"unix:/m","x":1}"#).is_err());
        assert!(serde_json::from_str::<SendOptions>(r#"{"url":"ftp:/m"}"#).is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100M").unwrap(), 100 << 20);
        assert_eq!(parse_rate("1G/s").unwrap(), 1 << 30);
        assert_eq!(parse_rate("4096").unwrap(), 4096);
        assert!(parse_rate("fast").is_err());
    }
}
