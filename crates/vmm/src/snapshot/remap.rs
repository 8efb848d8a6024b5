//! What the host side changes when a VM arrives from elsewhere (a snapshot restored, a
//! migration received): its disks and TAPs remapped, its serial port and console redirected.

use std::path::PathBuf;

use crate::VmConfig;

/// Applies what the host side changes on the way in (a restore or a migration): disks and
/// TAPs remapped, the serial port and console redirected. `whose` names the VM's origin in
/// messages ("the snapshot").
pub fn apply_host_side(
    c: &mut VmConfig,
    whose: &str,
    disk_remap: &std::collections::BTreeMap<PathBuf, PathBuf>,
    tap_remap: &std::collections::BTreeMap<String, String>,
    serial: Option<&crate::config::CharBackend>,
    console: Option<&crate::config::CharBackend>,
) -> Result<(), String> {
    for (old, new) in disk_remap {
        let i = c.disks.iter().position(|d| &d.path == old).ok_or_else(|| {
            format!(
                "disk remap: {whose} has no disk {} (it has: {})",
                old.display(),
                list(c.disks.iter().map(|d| d.path.display().to_string()))
            )
        })?;
        c.disks[i].path = new.clone();
        // Another file: its format is probed afresh (a stated format still holds).
        c.disks[i].probed_format = None;
    }
    for (old, new) in tap_remap {
        let (i, n) = c
            .nets
            .iter()
            .enumerate()
            .find(|(_, n)| &n.tap == old)
            .ok_or_else(|| {
                format!(
                    "TAP remap: {whose} has no TAP {old} (it has: {})",
                    list(c.nets.iter().map(|n| n.tap.clone()))
                )
            })?;
        // The guest keeps the MAC it has; only the host side moves.
        let mac = n.effective_mac(i);
        c.nets[i].mac = Some(mac);
        c.nets[i].tap = new.clone();
    }
    if let Some(s) = serial {
        c.serial = s.clone();
    }
    if let Some(con) = console {
        if c.console.is_none() {
            return Err(format!("{whose}'s VM has no virtio-console to redirect"));
        }
        c.console = Some(con.clone());
    }
    Ok(())
}

fn list(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
