//! `PATCH /v1/vm/disks/{id}` and `PATCH /v1/vm/nets/{id}`: a running VM's disks and interfaces
//! changed in place. Rate limits are swapped in the devices' shared token buckets (the next
//! request or frame meets the new limit, no pause); a disk grows through
//! `virtio::devices::BlockHandle::grow`, which tells the guest its new capacity. The VM's
//! configuration follows each change, so `GET /v1/vm`, snapshots and migrations carry it.

use ::api::devices::{DiskUpdate, NetUpdate};
use block::BlockError;
use virtio::devices::{BlockHandle, Limits, NetHandle};

use crate::api::Reply;
use crate::VmConfig;

/// The 404 answer for a device id the VM does not have, listing the ids it has.
pub fn unknown<'a>(what: &str, id: &str, ids: impl IntoIterator<Item = &'a str>) -> Reply {
    let known: Vec<&str> = ids.into_iter().collect();
    let known = if known.is_empty() {
        "it has none".to_string()
    } else {
        format!("it has {}", known.join(", "))
    };
    Reply::error(404, format!("the VM has no {what} `{id}` ({known})"))
}

/// Changes disk `id`'s limits and size; a refused change changes nothing.
pub fn update_disk(
    disks: &[(String, BlockHandle)],
    id: &str,
    u: &DiskUpdate,
    config: &mut VmConfig,
) -> Reply {
    let Some(i) = disks.iter().position(|(d, _)| d == id) else {
        return unknown("disk", id, disks.iter().map(|(i, _)| i.as_str()));
    };
    if *u == DiskUpdate::default() {
        return Reply::error(400, "nothing to change: give iops, bw or size");
    }
    let handle = &disks[i].1;
    let Some(cfg) = config.disks.get_mut(i) else {
        return Reply::error(500, format!("disk `{id}` is not in the configuration"));
    };
    if let Some(size) = u.size {
        let before = handle.size();
        match handle.grow(size) {
            Ok(()) if size != before => {
                tracing::info!("disk {id}: grown from {before} to {size} bytes")
            }
            Ok(()) => {}
            Err(e @ BlockError::Resize { .. }) => return Reply::error(400, e.to_string()),
            Err(e) => return Reply::error(500, e.to_string()),
        }
    }
    if u.iops.is_some() || u.bw.is_some() {
        cfg.iops = u.iops.unwrap_or(cfg.iops);
        cfg.bw = u.bw.unwrap_or(cfg.bw);
        handle.set_limits(cfg.iops, cfg.bw);
        tracing::info!(
            "disk {id}: limits now {} ops/s, {} bytes/s (0: none)",
            cfg.iops,
            cfg.bw
        );
    }
    Reply::done()
}

/// Changes interface `id`'s limits.
pub fn update_net(
    nets: &[(String, NetHandle)],
    id: &str,
    u: &NetUpdate,
    config: &mut VmConfig,
) -> Reply {
    let Some(i) = nets.iter().position(|(n, _)| n == id) else {
        return unknown("interface", id, nets.iter().map(|(i, _)| i.as_str()));
    };
    if *u == NetUpdate::default() {
        return Reply::error(
            400,
            "nothing to change: give rx_bw, tx_bw, rx_ops or tx_ops",
        );
    }
    let Some(cfg) = config.nets.get_mut(i) else {
        return Reply::error(500, format!("interface `{id}` is not in the configuration"));
    };
    cfg.rx_bw = u.rx_bw.unwrap_or(cfg.rx_bw);
    cfg.tx_bw = u.tx_bw.unwrap_or(cfg.tx_bw);
    cfg.rx_ops = u.rx_ops.unwrap_or(cfg.rx_ops);
    cfg.tx_ops = u.tx_ops.unwrap_or(cfg.tx_ops);
    nets[i].1.set_limits(
        Limits {
            ops: cfg.rx_ops,
            bytes: cfg.rx_bw,
        },
        Limits {
            ops: cfg.tx_ops,
            bytes: cfg.tx_bw,
        },
    );
    tracing::info!(
        "interface {id}: limits now rx {} frames/s {} bytes/s, tx {} frames/s {} bytes/s (0: none)",
        cfg.rx_ops,
        cfg.rx_bw,
        cfg.tx_ops,
        cfg.tx_bw
    );
    Reply::done()
}
