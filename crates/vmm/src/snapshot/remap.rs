//! What the host side changes when a VM arrives from elsewhere (a snapshot restored, a
//! migration received): its disks and TAPs remapped, its serial port and console redirected,
//! its vsock on another socket.

use std::path::PathBuf;

use crate::VmConfig;

/// What the host side changes on the way in.
#[derive(Clone, Copy)]
pub struct HostSide<'a> {
    /// Disk images to open instead (old path → new path).
    pub disk_remap: &'a std::collections::BTreeMap<PathBuf, PathBuf>,
    /// TAPs to use instead (old name → new name).
    pub tap_remap: &'a std::collections::BTreeMap<String, String>,
    /// Where the serial port writes instead.
    pub serial: Option<&'a crate::config::CharBackend>,
    /// Where the virtio-console writes instead.
    pub console: Option<&'a crate::config::CharBackend>,
    /// The vsock's host socket instead.
    pub vsock_socket: Option<&'a PathBuf>,
}

impl<'a> HostSide<'a> {
    /// What a restore's options change.
    pub fn restore(o: &'a api::restore::RestoreOptions) -> HostSide<'a> {
        HostSide {
            disk_remap: &o.disk_remap,
            tap_remap: &o.tap_remap,
            serial: o.serial.as_ref(),
            console: o.console.as_ref(),
            vsock_socket: o.vsock_socket.as_ref(),
        }
    }

    /// What a migration's receiving options change.
    pub fn receive(o: &'a api::migrate::ReceiveOptions) -> HostSide<'a> {
        HostSide {
            disk_remap: &o.disk_remap,
            tap_remap: &o.tap_remap,
            serial: o.serial.as_ref(),
            console: o.console.as_ref(),
            vsock_socket: o.vsock_socket.as_ref(),
        }
    }
}

/// Applies what the host side changes on the way in (a restore or a migration): disks and
/// TAPs remapped, the serial port and console redirected, the vsock on another socket.
/// `whose` names the VM's origin in messages ("the snapshot").
pub fn apply_host_side(c: &mut VmConfig, whose: &str, h: &HostSide<'_>) -> Result<(), String> {
    let HostSide {
        disk_remap,
        tap_remap,
        serial,
        console,
        vsock_socket,
    } = *h;
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
    if let Some(p) = vsock_socket {
        let Some(v) = c.vsock.as_mut() else {
            return Err(format!(
                "{whose}'s VM has no vsock to put on another socket"
            ));
        };
        v.socket = p.clone();
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
