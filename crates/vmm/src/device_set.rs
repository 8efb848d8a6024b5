//! The VM's disks and interfaces as the VMM keeps them while the guest runs: each by id with
//! its handle (limits, size), its counters, its image locks and its TAP to announce. Filled at
//! build, changed by device hotplug.

use std::sync::Arc;

use net::Tap;
use virtio::devices::{Block, BlockCounters, BlockHandle, Net, NetCounters, NetHandle};

use crate::config::DiskConfig;

/// A device's counters, as the API reports them.
#[derive(Clone)]
pub enum DeviceStats {
    /// A virtio-blk disk.
    Block {
        /// Its id.
        id: String,
        /// The image.
        path: String,
        /// Its counters.
        counters: Arc<BlockCounters>,
    },
    /// A virtio-net interface.
    Net {
        /// Its id.
        id: String,
        /// The TAP.
        tap: String,
        /// Its counters.
        counters: Arc<NetCounters>,
    },
}

impl DeviceStats {
    /// The counters as the API reports them.
    pub fn counters(&self) -> ::api::DeviceCounters {
        use std::sync::atomic::Ordering::Relaxed;
        match self {
            DeviceStats::Block {
                id,
                path,
                counters: c,
            } => ::api::DeviceCounters::Block {
                id: Some(id.clone()),
                path: path.clone(),
                read_ops: c.read_ops.load(Relaxed),
                read_bytes: c.read_bytes.load(Relaxed),
                write_ops: c.write_ops.load(Relaxed),
                write_bytes: c.write_bytes.load(Relaxed),
                flush_ops: c.flush_ops.load(Relaxed),
                discard_ops: c.discard_ops.load(Relaxed),
                errors: c.errors.load(Relaxed),
                throttled: c.throttled.load(Relaxed),
            },
            DeviceStats::Net {
                id,
                tap,
                counters: c,
            } => ::api::DeviceCounters::Net {
                id: Some(id.clone()),
                tap: tap.clone(),
                rx_frames: c.rx_frames.load(Relaxed),
                rx_bytes: c.rx_bytes.load(Relaxed),
                rx_dropped: c.rx_dropped.load(Relaxed),
                tx_frames: c.tx_frames.load(Relaxed),
                tx_bytes: c.tx_bytes.load(Relaxed),
                tx_dropped: c.tx_dropped.load(Relaxed),
                link_down: c.link_down.load(Relaxed),
                throttled: c.throttled.load(Relaxed),
            },
        }
    }
}

/// The disks and interfaces, in the order the guest got them.
#[derive(Default)]
pub struct DeviceSet {
    /// Each disk's id and handle (limits and size change through it).
    pub disks: Vec<(String, BlockHandle)>,
    /// Each interface's id and handle (limits change through it).
    pub nets: Vec<(String, NetHandle)>,
    /// I/O counters of each, for the API.
    pub stats: Vec<DeviceStats>,
    /// Each disk's image locks, by disk id (handed over by a migration).
    pub locks: Vec<(String, Arc<block::ImageLock>)>,
    /// Each NIC's id, TAP and guest MAC, to announce the guest after a migration.
    pub announcers: Vec<(String, Arc<Tap>, [u8; 6])>,
}

impl DeviceSet {
    /// Keeps disk `id` (`d`, opened as `blk` with its locks); returns the device to attach.
    pub fn add_disk(
        &mut self,
        id: &str,
        d: &DiskConfig,
        (blk, locks): (Block, Vec<block::ImageLock>),
    ) -> Block {
        self.locks
            .extend(locks.into_iter().map(|l| (id.to_string(), Arc::new(l))));
        self.stats.push(DeviceStats::Block {
            id: id.to_string(),
            path: d.path.display().to_string(),
            counters: blk.counters(),
        });
        self.disks.push((id.to_string(), blk.handle()));
        blk
    }

    /// Keeps interface `id`; returns the device to attach.
    pub fn add_net(&mut self, id: &str, net: Net) -> Net {
        self.announcers.extend(
            net.announcer()
                .into_iter()
                .map(|(tap, mac)| (id.to_string(), tap, mac)),
        );
        self.stats.push(DeviceStats::Net {
            id: id.to_string(),
            tap: net.tap_name().to_string(),
            counters: net.counters(),
        });
        self.nets.push((id.to_string(), net.handle()));
        net
    }

    /// Forgets disk or interface `id` (unplugged): its locks go with it.
    pub fn remove(&mut self, id: &str) {
        self.disks.retain(|(i, _)| i != id);
        self.nets.retain(|(i, _)| i != id);
        self.stats.retain(|s| s.id() != id);
        self.locks.retain(|(i, _)| i != id);
        self.announcers.retain(|(i, _, _)| i != id);
    }

    /// Every disk's locks.
    pub fn all_locks(&self) -> Vec<Arc<block::ImageLock>> {
        self.locks.iter().map(|(_, l)| l.clone()).collect()
    }
}

impl DeviceStats {
    /// The device's id.
    pub fn id(&self) -> &str {
        match self {
            DeviceStats::Block { id, .. } | DeviceStats::Net { id, .. } => id,
        }
    }
}
