//! The body of `PUT /v1/vm/restore`, which `tern run --restore DIR` and its flags fill in too:
//! which snapshot to bring back, and what of the host side (disks, TAPs, serial port and
//! console) changes on the way. The VMM opens the snapshot with them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::CharBackend;

/// How a snapshot is brought back (`tern run --restore` flags, or the body of
/// `PUT /v1/vm/restore`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreOptions {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// `lazy` (the default) maps the memory file copy-on-write; `eager` reads it and checks
    /// its checksum.
    #[serde(default)]
    pub mode: RestoreMode,
    /// Stay paused after restoring.
    #[serde(default)]
    pub paused: bool,
    /// Disk images to open instead of the ones the snapshot names (old path → new path): a
    /// clone needs its own copy or overlay of every writable disk.
    #[serde(default)]
    pub disk_remap: BTreeMap<PathBuf, PathBuf>,
    /// TAPs to use instead of the ones the snapshot names (old name → new name).
    #[serde(default)]
    pub tap_remap: BTreeMap<String, String>,
    /// Where the serial port writes, instead of the snapshot's setting.
    #[serde(default)]
    pub serial: Option<CharBackend>,
    /// Where the virtio-console writes, instead of the snapshot's setting (only for a VM that
    /// has one).
    #[serde(default)]
    pub console: Option<CharBackend>,
    /// The vsock's host socket, instead of the one the snapshot names (only for a VM that has
    /// a vsock): each clone restored beside another needs its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_socket: Option<PathBuf>,
}

/// How guest memory comes back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    /// Map the memory file copy-on-write: pages load on first touch.
    #[default]
    Lazy,
    /// Read the whole file and check its checksum.
    Eager,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_body_needs_only_the_directory() {
        let o: RestoreOptions = serde_json::from_str(r#"{"dir":"/snap"}"#).unwrap();
        assert_eq!(o.dir, PathBuf::from("/snap"));
        assert_eq!(o.mode, RestoreMode::Lazy);
        assert!(!o.paused && o.disk_remap.is_empty() && o.tap_remap.is_empty());
        assert_eq!((o.serial, o.console), (None, None));
        let o: RestoreOptions = serde_json::from_str(
            r#"{"dir":"/snap","mode":"eager","paused":true,"tap_remap":{"tap0":"tap1"},
                "disk_remap":{"/a.img":"/b.img"},"serial":"none"}"#,
        )
        .unwrap();
        assert_eq!(o.mode, RestoreMode::Eager);
        assert_eq!(o.tap_remap["tap0"], "tap1");
        assert_eq!(
            o.disk_remap[&PathBuf::from("/a.img")],
            PathBuf::from("/b.img")
        );
        assert_eq!(o.serial, Some(CharBackend::None));
        // What a client sends reads back the same.
        let again: RestoreOptions =
            serde_json::from_str(&serde_json::to_string(&o).unwrap()).unwrap();
        assert_eq!(again, o);
    }

    #[test]
    fn unknown_fields_and_modes_are_refused() {
        for bad in [
            r#"{"dir":"/snap","lazy":true}"#,
            r#"{"dir":"/snap","mode":"Lazy"}"#,
            r#"{"mode":"eager"}"#,
        ] {
            assert!(
                serde_json::from_str::<RestoreOptions>(bad).is_err(),
                "{bad}"
            );
        }
    }
}
