//! Devices while the guest runs: the bodies of `PATCH /v1/vm/disks/{id}` and
//! `PATCH /v1/vm/nets/{id}` (`tern disk update`, `tern net update`), what changes on a disk or
//! an interface; and what plugging one in answers.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::{byte_rate, ConfigError, MemSize};

/// A kind of device that comes and goes while the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A virtio-blk disk.
    Disk,
    /// A virtio-net interface.
    Net,
}

impl DeviceKind {
    /// What the user calls one.
    pub fn noun(self) -> &'static str {
        match self {
            DeviceKind::Disk => "disk",
            DeviceKind::Net => "interface",
        }
    }
}

/// What `PUT /v1/vm/disks` and `PUT /v1/vm/nets` answer: the new device's id and where the
/// guest finds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluggedDevice {
    /// The device's id.
    pub id: String,
    /// Its PCI address, `0000:00:SS.0`.
    pub bdf: String,
}

/// What to change on a disk; absent fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskUpdate {
    /// Another image to put behind the disk, as a drive whose medium changed: opened as the
    /// disk's was (its stated format, or probed afresh; read-only as before), in-flight
    /// requests finished on the old one, the guest told the new capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<std::path::PathBuf>,
    /// Operations per second (0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    /// Bytes per second (0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bw: Option<u64>,
    /// The disk's new size in bytes: at least its size now (disks in use only grow). A file
    /// or qcow2 image is grown by tern; a host block device must have been grown on the host.
    /// The guest is told at once (virtio-blk capacity change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// What to change on an interface; absent fields stay as they are. Rates as in
/// [`NetConfig`](crate::config::NetConfig) (0: no limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetUpdate {
    /// Guest receive bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_bw: Option<u64>,
    /// Guest transmit bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_bw: Option<u64>,
    /// Guest receive frames/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_ops: Option<u64>,
    /// Guest transmit frames/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_ops: Option<u64>,
}

fn invalid(field: &'static str, v: &str, why: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: v.to_string(),
        why: why.to_string(),
    }
}

fn number(field: &'static str, v: &str) -> Result<u64, ConfigError> {
    v.parse()
        .map_err(|_| invalid(field, v, "expected a number"))
}

/// A disk size: bytes, or a number with a K, M, G or T suffix.
fn disk_size(v: &str) -> Result<u64, ConfigError> {
    if let Ok(n) = v.parse::<u64>() {
        return Ok(n);
    }
    let size: MemSize = v
        .parse()
        .map_err(|why: String| invalid("disk size", v, &why))?;
    Ok(size.0)
}

/// Splits `k=v,k=v`, refusing an empty list.
fn items<'a>(s: &'a str, what: &'static str) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    if s.trim().is_empty() {
        return Err(ConfigError::Missing(what));
    }
    s.split(',')
        .map(|item| {
            item.split_once('=')
                .ok_or_else(|| invalid("update", item, "expected key=value"))
        })
        .collect()
}

impl FromStr for DiskUpdate {
    type Err = ConfigError;

    /// Parses `[iops=N][,bw=RATE][,size=SIZE][,path=PATH]` (at least one).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut u = DiskUpdate::default();
        for (k, v) in items(s, "a change (iops=N, bw=RATE, size=SIZE or path=PATH)")? {
            match k {
                "iops" => u.iops = Some(number("disk iops", v)?),
                "bw" => u.bw = Some(byte_rate("disk bw", v)?),
                "size" => u.size = Some(disk_size(v)?),
                "path" if !v.is_empty() => u.path = Some(v.into()),
                _ => return Err(invalid("disk update", k, "expected iops, bw, size or path")),
            }
        }
        Ok(u)
    }
}

impl FromStr for NetUpdate {
    type Err = ConfigError;

    /// Parses `[rx_bw=RATE][,tx_bw=RATE][,rx_ops=N][,tx_ops=N]` (at least one).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut u = NetUpdate::default();
        for (k, v) in items(s, "a change (rx_bw, tx_bw, rx_ops or tx_ops)")? {
            match k {
                "rx_bw" => u.rx_bw = Some(byte_rate("net rx_bw", v)?),
                "tx_bw" => u.tx_bw = Some(byte_rate("net tx_bw", v)?),
                "rx_ops" => u.rx_ops = Some(number("net rx_ops", v)?),
                "tx_ops" => u.tx_ops = Some(number("net tx_ops", v)?),
                _ => {
                    return Err(invalid(
                        "net update",
                        k,
                        "expected rx_bw, tx_bw, rx_ops or tx_ops",
                    ))
                }
            }
        }
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_parse_from_the_command_line() {
        assert_eq!(
            "iops=100,bw=10M,size=2G".parse::<DiskUpdate>().unwrap(),
            DiskUpdate {
                iops: Some(100),
                bw: Some(10 << 20),
                size: Some(2 << 30),
                path: None,
            }
        );
        assert_eq!(
            "size=1048576".parse::<DiskUpdate>().unwrap().size,
            Some(1 << 20)
        );
        assert_eq!(
            "path=/images/new.qcow2".parse::<DiskUpdate>().unwrap().path,
            Some("/images/new.qcow2".into())
        );
        assert_eq!(
            "tx_bw=1M,rx_ops=0".parse::<NetUpdate>().unwrap(),
            NetUpdate {
                tx_bw: Some(1 << 20),
                rx_ops: Some(0),
                ..NetUpdate::default()
            }
        );
        for bad in ["", "iops", "iops=x", "speed=1", "size=lots"] {
            let e = bad.parse::<DiskUpdate>().unwrap_err().to_string();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!("iops=1".parse::<NetUpdate>().is_err());
        assert!(serde_json::from_str::<DiskUpdate>(r#"{"iops": 5, "speed": 1}"#).is_err());
    }
}
