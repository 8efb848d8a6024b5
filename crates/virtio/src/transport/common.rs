//! What the virtio-mmio and virtio-pci transports share: the driver's per-queue registers,
//! feature acceptance, and handing the device its queues at DRIVER_OK.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::{GuestMemoryMmap, Interrupt, QueueEvent, VirtioDevice};

/// The driver's configuration of one queue.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub(crate) struct QueueRegs {
    /// Queue size the driver chose (the register is 32 bits wide on virtio-mmio).
    pub size: u32,
    /// QueueReady (mmio) / queue_enable (pci).
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (available) ring address.
    pub driver: u64,
    /// Device (used) ring address.
    pub device: u64,
    /// Ring position the device starts from at activation (both the next available entry
    /// and the next used one): 0 for a driver's activation, where the device stopped for a
    /// restored snapshot (a paused device has answered every chain it took, so the two are
    /// equal).
    #[serde(default)]
    pub next: u16,
}

impl QueueRegs {
    /// Registers at reset: size = the device's maximum, nothing else set.
    pub fn new(max: u16) -> Self {
        QueueRegs {
            size: max.into(),
            ..Default::default()
        }
    }

    /// The queue these registers describe, validated against `mem`.
    pub fn build(&self, max: u16, event_idx: bool, mem: &GuestMemoryMmap) -> Result<Queue, String> {
        if !self.ready {
            return Err("not ready".into());
        }
        let e = |e: virtio_queue::Error| e.to_string();
        let mut q = Queue::new(max).map_err(e)?;
        let size = u16::try_from(self.size).map_err(|_| format!("size {}", self.size))?;
        q.try_set_size(size).map_err(e)?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(e)?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(e)?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(e)?;
        q.set_ready(true);
        q.set_event_idx(event_idx);
        q.set_next_avail(self.next);
        q.set_next_used(self.next);
        if !q.is_valid(mem) {
            return Err("rings outside guest memory".into());
        }
        Ok(q)
    }
}

/// A device's transport state as a snapshot keeps it: what the driver configured, and where
/// each queue stopped. Taken while the device is paused (every chain it took is answered).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransportState {
    pub(crate) device_type: u32,
    pub(crate) status: u32,
    pub(crate) needs_reset: bool,
    pub(crate) driver_features: u64,
    pub(crate) driver_features_unknown: bool,
    pub(crate) queue_select: u32,
    pub(crate) device_features_select: u32,
    pub(crate) driver_features_select: u32,
    pub(crate) queues: Vec<QueueRegs>,
    /// virtio-mmio InterruptStatus, or the virtio-pci ISR.
    pub(crate) interrupt_status: u32,
    pub(crate) config_generation: u32,
    /// virtio-pci only: configuration space and MSI-X.
    pub(crate) pci: Option<super::pci::PciState>,
}

impl TransportState {
    /// (guest address, length) of the used ring of every queue the device serves: the
    /// device writes them through the memory API, not through a buffer the driver gave.
    pub fn used_rings(&self) -> Vec<(u64, u64)> {
        let live = self.status & DRIVER_OK != 0 && !self.needs_reset;
        self.queues
            .iter()
            .filter(|q| live && q.ready)
            .map(|q| (q.device, 6 + 8 * u64::from(q.size)))
            .collect()
    }
}

/// Queue registers with each ready queue's position, read from its used ring in `mem` (the
/// used index is where the device stopped) when the device is live.
pub(crate) fn save_queues(regs: &[QueueRegs], live: bool, mem: &GuestMemoryMmap) -> Vec<QueueRegs> {
    regs.iter()
        .map(|r| {
            let mut r = *r;
            if live && r.ready {
                r.next = mem
                    .read_obj::<u16>(GuestAddress(r.device.wrapping_add(2)))
                    .unwrap_or(0);
            }
            r
        })
        .collect()
}

/// Checks that a saved state fits a device of `device_type` with `maxes` queues.
pub(crate) fn check_state(
    s: &TransportState,
    device_type: u32,
    maxes: &[u16],
) -> Result<(), String> {
    if s.device_type != device_type {
        return Err(format!(
            "saved device type {} does not match the configured device type {device_type}",
            s.device_type
        ));
    }
    if s.queues.len() != maxes.len() {
        return Err(format!(
            "device type {device_type}: {} queues saved, {} configured",
            s.queues.len(),
            maxes.len()
        ));
    }
    Ok(())
}

/// The status bits a driver sets, in the order it must set them.
const STATUS_ORDER: [u32; 4] = [ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK];

/// What a driver's write to the device status asks for, by the virtio 1.x state machine.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StatusWrite {
    /// 0: reset the device.
    Reset,
    /// FAILED set: the driver gave up on the device.
    Failed,
    /// The device needs a reset or has failed: the write is ignored.
    Ignored,
    /// Bits cleared, unknown or set out of order; the value (NEEDS_RESET dropped) is given
    /// for the message.
    Invalid(u32),
    /// A legal step to `val` (NEEDS_RESET dropped); `new` holds the bits it sets.
    Step {
        /// The new status.
        val: u32,
        /// Bits set by this write.
        new: u32,
    },
}

/// Classifies a write of `val` to a status that is `old`; `blocked` when the device needs a
/// reset or has failed.
pub(crate) fn status_write(old: u32, val: u32, blocked: bool) -> StatusWrite {
    if val == 0 {
        return StatusWrite::Reset;
    }
    if val & FAILED != 0 {
        return StatusWrite::Failed;
    }
    if blocked || old & FAILED != 0 {
        return StatusWrite::Ignored;
    }
    let val = val & !NEEDS_RESET;
    let known = STATUS_ORDER.iter().fold(0, |a, b| a | b);
    let in_order = STATUS_ORDER
        .windows(2)
        .all(|w| val & w[1] == 0 || val & w[0] != 0);
    if val & !known != 0 || val & old != old || !in_order {
        return StatusWrite::Invalid(val);
    }
    StatusWrite::Step {
        val,
        new: val & !old,
    }
}

/// Whether the driver's feature choice can be accepted: VERSION_1 set, nothing the device did
/// not offer, no bit above 63 (`unknown`).
pub(crate) fn features_acceptable(
    transport: &str,
    driver: u64,
    unknown: bool,
    offered: u64,
) -> bool {
    if unknown || driver & !offered != 0 || driver & (1 << VIRTIO_F_VERSION_1) == 0 {
        ratelimit::warn_limited!(
            "{transport}: driver features {driver:#x} refused (offered {offered:#x})"
        );
        return false;
    }
    true
}

/// Checks a snapshot's accepted features against what the device offers here (`offered`):
/// once FEATURES_OK is set they must have passed [`features_acceptable`], so anything else
/// was not written by a tern driving this device and is refused.
pub(crate) fn check_restored_features(
    device_type: u32,
    driver: u64,
    unknown: bool,
    offered: u64,
) -> Result<(), String> {
    let extra = driver & !offered;
    if extra != 0 || unknown {
        return Err(format!(
            "virtio device type {device_type}: the snapshot's accepted features {driver:#x} include bits {extra:#x}{} the device does not offer (it offers {offered:#x})",
            if unknown { " and bits above 63" } else { "" }
        ));
    }
    if driver & (1 << VIRTIO_F_VERSION_1) == 0 {
        return Err(format!(
            "virtio device type {device_type}: the snapshot's accepted features {driver:#x} lack VERSION_1"
        ));
    }
    Ok(())
}

/// The end of a transport's restore, once its registers hold the saved state: the device
/// learns the accepted features (`features_ok`; they must be a subset of `offered`) and, when
/// the driver had started it (`live`), is activated on its saved queues, each of which is then
/// looked at once as if notified (a notification the driver sent while the device was pausing
/// died with the old process).
#[allow(clippy::too_many_arguments)]
pub(crate) fn restart_restored(
    device: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    regs: &[QueueRegs],
    notify: &[EventFd],
    (driver_features, driver_features_unknown, offered): (u64, bool, u64),
    features_ok: bool,
    live: bool,
) -> Result<(), String> {
    if features_ok {
        check_restored_features(
            device.device_type(),
            driver_features,
            driver_features_unknown,
            offered,
        )?;
        device.ack_features(driver_features);
    } else if live {
        return Err(format!(
            "virtio device type {}: the snapshot has the driver started without accepted features",
            device.device_type()
        ));
    }
    if !live {
        return Ok(());
    }
    let device_type = device.device_type();
    activate(device, mem, interrupt, regs, notify, driver_features)
        .map_err(|e| format!("cannot restart virtio device type {device_type}: {e}"))?;
    for (q, e) in regs.iter().zip(notify) {
        if q.ready {
            let _ = e.write(1);
        }
    }
    Ok(())
}

/// Builds every queue from the driver's registers and activates the device with them.
pub(crate) fn activate(
    device: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    regs: &[QueueRegs],
    notify: &[EventFd],
    driver_features: u64,
) -> Result<(), String> {
    let event_idx = driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
    let maxes = device.queue_max_sizes().to_vec();
    let min_queues = device.min_queues();
    let mut queues = Vec::with_capacity(maxes.len());
    for (i, ((r, max), n)) in regs.iter().zip(maxes).zip(notify).enumerate() {
        if !r.ready && i >= min_queues {
            // A driver may use only the first queues of a multiqueue device (Linux uses one
            // per vCPU); the device is told how many it got.
            break;
        }
        let queue = r
            .build(max, event_idx, mem)
            .map_err(|e| format!("queue {i}: {e}"))?;
        let event = n.try_clone().map_err(|e| e.to_string())?;
        queues.push(QueueEvent { queue, event });
    }
    device
        .activate(mem.clone(), interrupt, queues)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_state_machine() {
        use StatusWrite::*;
        assert_eq!(status_write(0xf, 0, false), Reset);
        assert_eq!(status_write(0x3, FAILED | 0x3, true), Failed);
        assert_eq!(status_write(0x1, 0x3, true), Ignored);
        assert_eq!(status_write(FAILED, 0x3, false), Ignored);
        assert_eq!(status_write(0, ACKNOWLEDGE, false), Step { val: 1, new: 1 });
        assert_eq!(
            status_write(1, 1 | DRIVER | NEEDS_RESET, false),
            Step { val: 3, new: 2 }
        );
        // Clearing a bit, an unknown bit, or skipping a step is invalid.
        assert_eq!(status_write(3, 1, false), Invalid(1));
        assert_eq!(status_write(1, 1 | 0x10, false), Invalid(0x11));
        assert_eq!(
            status_write(1, 1 | FEATURES_OK, false),
            Invalid(1 | FEATURES_OK)
        );
    }
}
