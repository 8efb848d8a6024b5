//! `PATCH /v1/vm/disks/{id}` and `PATCH /v1/vm/nets/{id}`: a running VM's disks and interfaces
//! changed in place. Rate limits are swapped in the devices' shared token buckets (the next
//! request or frame meets the new limit, no pause); a disk grows through
//! `virtio::devices::BlockHandle::grow`, which tells the guest its new capacity; another image
//! goes behind a disk through `BlockHandle::replace` (its workers finish their requests on the
//! old image and go on with the new one; its locks and counters' path follow). The VM's
//! configuration follows each change, so `GET /v1/vm`, snapshots and migrations carry it.

use ::api::devices::{DiskUpdate, NetUpdate};
use block::BlockError;
use virtio::devices::{BlockHandle, Limits, NetHandle};

use crate::api::Reply;
use crate::device_set::{DeviceSet, DeviceStats};
use crate::VmConfig;

/// How long a disk's in-flight requests may take to finish before another image goes behind
/// it.
const REPLACE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

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
pub fn update_disk(devs: &mut DeviceSet, id: &str, u: &DiskUpdate, config: &mut VmConfig) -> Reply {
    let disks = &devs.disks;
    let Some(i) = disks.iter().position(|(d, _)| d == id) else {
        return unknown("disk", id, disks.iter().map(|(i, _)| i.as_str()));
    };
    if *u == DiskUpdate::default() {
        return Reply::error(400, "nothing to change: give iops, bw, size or path");
    }
    if u.path.is_some() && u.size.is_some() {
        return Reply::error(400, "give a new image (path) or a new size, not both");
    }
    let handle = disks[i].1.clone();
    if config.disks.get(i).is_none() {
        return Reply::error(500, format!("disk `{id}` is not in the configuration"));
    }
    if let Some(path) = &u.path {
        if let Err(r) = replace_image(devs, &handle, id, path, &mut config.disks[i]) {
            return r;
        }
    }
    let cfg = &mut config.disks[i];
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

/// Puts the image at `path` behind disk `id` (configured as `cfg`, which follows).
fn replace_image(
    devs: &mut DeviceSet,
    handle: &BlockHandle,
    id: &str,
    path: &std::path::Path,
    cfg: &mut crate::config::DiskConfig,
) -> Result<(), Reply> {
    sandbox::landlock::check(path, !cfg.readonly).map_err(|e| Reply::error(400, e))?;
    // The new image as the disk's was opened: its stated format, or probed afresh (a probed
    // qcow2 image gets no backing file); no data file, which belonged to the old image.
    let mut new = cfg.clone();
    new.path = path.to_path_buf();
    new.probed_format = None;
    new.data_file = None;
    let (disk, locks) = crate::virtio_devices::open_image(&new, true)
        .map_err(|e| Reply::error(400, format!("disk `{id}`: {e}")))?;
    let format = disk.format();
    let old = handle
        .replace(
            std::sync::Arc::new(disk),
            std::time::Instant::now() + REPLACE_WAIT,
        )
        .map_err(|e| {
            Reply::error(
                400,
                format!("disk `{id}`: cannot put {} behind it: {e}", path.display()),
            )
        })?;
    tracing::info!(
        "disk {id}: {} in place of {}",
        path.display(),
        old.path().display()
    );
    drop(old);
    devs.locks.retain(|(i, _)| i != id);
    devs.locks.extend(
        locks
            .into_iter()
            .map(|l| (id.to_string(), std::sync::Arc::new(l))),
    );
    for s in &mut devs.stats {
        if let DeviceStats::Block { id: i, path: p, .. } = s {
            if i == id {
                *p = path.display().to_string();
            }
        }
    }
    cfg.path = new.path;
    cfg.data_file = None;
    if cfg.format.is_none() {
        cfg.probed_format = Some(match format {
            block::ImageFormat::Raw => crate::config::DiskFormat::Raw,
            block::ImageFormat::Qcow2 => crate::config::DiskFormat::Qcow2,
        });
    }
    Ok(())
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
