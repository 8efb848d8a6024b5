//! The virtio 1.x device state machine, once for both transports.
//!
//! [`VirtioCore`] owns the device and everything the driver configures through the common
//! registers, whatever their layout: device status and its state machine, feature selects and
//! the driver's features, queue select and the per-queue registers, the queue notification
//! eventfds, the interrupt status and configuration generation ([`InterruptState`]),
//! activation at DRIVER_OK, reset, failure (DEVICE_NEEDS_RESET) and the shared part of a
//! snapshot ([`TransportState`]). A transport decodes its registers into calls on the core and
//! delivers interrupts its own way (the `I` of [`VirtioCore<I>`]); it takes no state-machine
//! decision of its own.
//!
//! Failure follows the virtio 1.2 spec, section 2.1.2: a device that needs a reset sets
//! DEVICE_NEEDS_RESET and, if DRIVER_OK is set, sends a configuration change notification.
//! Only a reset (status 0) clears it. See [`VirtioCore::set_status`] for what a failed
//! activation leaves in the status.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::state::{QueueRegs, TransportState};
use crate::{GuestMemoryMmap, Interrupt, InterruptKind, QueueEvent, VirtioDevice, VmMemory};

/// What the driver reads of the interrupt side through either transport: virtio-mmio's
/// InterruptStatus or virtio-pci's ISR, and the configuration generation. It lives in the
/// transport's interrupt object, shared with the device's worker.
#[derive(Debug, Default)]
pub(crate) struct InterruptState {
    /// InterruptStatus (mmio) / ISR (pci).
    pub status: AtomicU32,
    /// ConfigGeneration (mmio) / config_generation (pci, which shows its low 8 bits).
    pub generation: AtomicU32,
}

impl InterruptState {
    /// Records a configuration change: the generation moves on, `bit` is set in the status.
    pub fn config_changed(&self, bit: u32) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.status.fetch_or(bit, Ordering::SeqCst);
    }
}

/// A transport's interrupt delivery, as the core uses it: the core hands it to the device at
/// activation, raises configuration changes through it, and resets its state.
pub(crate) trait TransportInterrupt: Interrupt + 'static {
    /// The interrupt status and configuration generation.
    fn state(&self) -> &InterruptState;
    /// Forgets what the driver configured for delivery (virtio-pci's vector mapping), at a
    /// device reset. The core clears the interrupt status itself.
    fn reset(&self) {}
}

/// The state machine of one virtio device, shared by virtio-mmio and virtio-pci.
pub(crate) struct VirtioCore<I: TransportInterrupt> {
    /// "virtio-mmio" or "virtio-pci", for messages.
    transport: &'static str,
    /// The VM's memory: queues are validated against its current view at activation, and the
    /// device gets a clone.
    mem: VmMemory,
    device: Box<dyn VirtioDevice>,
    interrupt: Arc<I>,
    /// One per queue, for the transport's life (registered as KVM ioeventfds).
    notify: Vec<EventFd>,
    queues: Vec<QueueRegs>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    /// The driver set a feature bit above 63, none of which is offered.
    driver_features_unknown: bool,
    status: u32,
    needs_reset: bool,
    /// Feature bits the transport does not implement: never offered, whatever the device says.
    hidden_features: u64,
}

impl<I: TransportInterrupt> VirtioCore<I> {
    /// Wraps `device`, signalling through `interrupt`; `hidden_features` are never offered.
    pub fn new(
        transport: &'static str,
        mem: VmMemory,
        device: Box<dyn VirtioDevice>,
        interrupt: Arc<I>,
        hidden_features: u64,
    ) -> std::io::Result<Self> {
        let maxes = device.queue_max_sizes();
        let notify = maxes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<_>>()?;
        let queues = maxes.iter().map(|&m| QueueRegs::new(m)).collect();
        Ok(VirtioCore {
            transport,
            mem,
            device,
            interrupt,
            notify,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            driver_features_unknown: false,
            status: 0,
            needs_reset: false,
            hidden_features,
        })
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device, for its configuration space and for pausing it.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The transport's interrupt object.
    pub fn interrupt(&self) -> &Arc<I> {
        &self.interrupt
    }

    /// The queue notification eventfds, one per queue.
    pub fn notify_events(&self) -> &[EventFd] {
        &self.notify
    }

    /// A notification of queue `queue` that reached the transport (not an ioeventfd).
    pub fn notify(&self, queue: u64) {
        let Some(e) = usize::try_from(queue).ok().and_then(|q| self.notify.get(q)) else {
            return;
        };
        if let Err(e) = e.write(1) {
            ratelimit::warn_limited!("{}: cannot signal queue {queue}: {e}", self.transport);
        }
    }

    /// How many queues the device has.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The features offered to the driver.
    fn offered_features(&self) -> u64 {
        self.device.features() & !self.hidden_features
    }

    /// The 32 offered feature bits `device_features_select` selects (0 past bit 63).
    pub fn device_features_word(&self) -> u32 {
        word(self.offered_features(), self.device_features_select)
    }

    /// The 32 bits of the driver's features `driver_features_select` selects.
    pub fn driver_features_word(&self) -> u32 {
        word(self.driver_features, self.driver_features_select)
    }

    /// The driver's features, as written so far.
    #[cfg(test)]
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The driver writes 32 feature bits at `driver_features_select`; ignored unless it is
    /// negotiating (DRIVER set, FEATURES_OK not yet).
    pub fn write_driver_features(&mut self, val: u32) {
        if self.status & DRIVER == 0 || self.status & FEATURES_OK != 0 {
            return;
        }
        let v = u64::from(val);
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
            _ => self.driver_features_unknown |= val != 0,
        }
    }

    pub fn device_features_select(&self) -> u32 {
        self.device_features_select
    }

    pub fn set_device_features_select(&mut self, sel: u32) {
        self.device_features_select = sel;
    }

    pub fn driver_features_select(&self) -> u32 {
        self.driver_features_select
    }

    pub fn set_driver_features_select(&mut self, sel: u32) {
        self.driver_features_select = sel;
    }

    pub fn queue_select(&self) -> u32 {
        self.queue_select
    }

    pub fn set_queue_select(&mut self, sel: u32) {
        self.queue_select = sel;
    }

    /// The maximum size of the selected queue; 0 if there is no such queue.
    pub fn queue_max(&self) -> u16 {
        usize::try_from(self.queue_select)
            .ok()
            .and_then(|i| self.device.queue_max_sizes().get(i).copied())
            .unwrap_or(0)
    }

    /// The selected queue's registers, if it exists.
    pub fn selected_queue(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::try_from(self.queue_select).ok()?)
    }

    /// The selected queue's registers, if it exists and may still be configured (the driver
    /// has not set DRIVER_OK, the device does not need a reset).
    pub fn selected_queue_mut(&mut self) -> Option<&mut QueueRegs> {
        if self.status & DRIVER_OK != 0 || self.needs_reset {
            return None;
        }
        self.queues
            .get_mut(usize::try_from(self.queue_select).ok()?)
    }

    /// The device status as the driver reads it: what it set, plus DEVICE_NEEDS_RESET when
    /// the transport or the device found something wrong.
    pub fn status(&self) -> u32 {
        let broken = self.needs_reset || self.device.broken();
        self.status | if broken { NEEDS_RESET } else { 0 }
    }

    /// Whether the device runs: the driver set DRIVER_OK and nothing failed since.
    fn live(&self) -> bool {
        self.status & DRIVER_OK != 0 && !self.needs_reset
    }

    /// The driver writes `val` to the device status.
    ///
    /// A failed activation (queues the device cannot use, a device that refuses to start)
    /// leaves DRIVER_OK set, with DEVICE_NEEDS_RESET and a configuration change
    /// notification. DRIVER_OK is the driver's bit: it wrote it, and from then on may use the
    /// queues; the spec gives the device one way to report trouble in that state,
    /// DEVICE_NEEDS_RESET plus the notification it requires when DRIVER_OK is set (section
    /// 2.1.2), and no way to take DRIVER_OK back. Clearing it would show the driver a status
    /// it never wrote and would fall outside that rule. tern's own idea of a running device
    /// ([`live`](Self::live): snapshots, frozen queue registers, restore) already excludes
    /// a device that needs a reset.
    pub fn set_status(&mut self, val: u32) {
        let (mut val, new) = match status_write(self.status, val, self.needs_reset) {
            StatusWrite::Reset => return self.reset(),
            StatusWrite::Failed => {
                // The driver gave up on the device; it will reset it before trying again.
                self.status |= FAILED;
                return;
            }
            StatusWrite::Ignored => return,
            StatusWrite::Invalid(val) => {
                let old = self.status;
                return self.fail(&format!("invalid status transition {old:#x} -> {val:#x}"));
            }
            StatusWrite::Step { val, new } => (val, new),
        };
        if new & FEATURES_OK != 0 && !self.accept_features() {
            // The driver reads the status back and finds FEATURES_OK missing.
            val &= !FEATURES_OK;
            if val & DRIVER_OK != 0 {
                return self.fail("DRIVER_OK without accepted features");
            }
        }
        self.status = val;
        if new & DRIVER_OK != 0 {
            if let Err(e) = self.activate() {
                // DRIVER_OK stays set (see above); `fail` notifies the driver.
                self.fail(&format!("activation failed: {e}"));
            }
        }
    }

    /// Resets the device and forgets everything the driver configured (the generation
    /// counter goes on).
    fn reset(&mut self) {
        self.device.reset();
        for (regs, &max) in self.queues.iter_mut().zip(self.device.queue_max_sizes()) {
            *regs = QueueRegs::new(max);
        }
        for e in &self.notify {
            // Drop notifications that were never served; WouldBlock means there were none.
            let _ = e.read();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.driver_features_unknown = false;
        self.status = 0;
        self.needs_reset = false;
        self.interrupt.state().status.store(0, Ordering::SeqCst);
        self.interrupt.reset();
    }

    /// The device needs a reset: DEVICE_NEEDS_RESET, and a configuration change notification
    /// if DRIVER_OK is set (virtio 1.2, section 2.1.2). Before DRIVER_OK the driver is still
    /// setting the device up and reads the status back at its next step.
    fn fail(&mut self, why: &str) {
        ratelimit::warn_limited!(
            "{} (type {}): {why}; device needs a reset",
            self.transport,
            self.device.device_type()
        );
        self.needs_reset = true;
        if self.status & DRIVER_OK != 0 {
            if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                ratelimit::warn_limited!(
                    "{}: cannot signal the configuration change: {e}",
                    self.transport
                );
            }
        }
    }

    fn accept_features(&mut self) -> bool {
        let (f, offered) = (self.driver_features, self.offered_features());
        if self.driver_features_unknown || f & !offered != 0 || f & (1 << VIRTIO_F_VERSION_1) == 0 {
            ratelimit::warn_limited!(
                "{}: driver features {f:#x} refused (offered {offered:#x})",
                self.transport
            );
            return false;
        }
        self.device.ack_features(f);
        true
    }

    /// Builds every queue from the driver's registers and activates the device with them.
    fn activate(&mut self) -> Result<(), String> {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let maxes = self.device.queue_max_sizes().to_vec();
        let min_queues = self.device.min_queues();
        let mut queues = Vec::with_capacity(maxes.len());
        let mem = self.mem.memory();
        for (i, ((r, max), n)) in self.queues.iter().zip(maxes).zip(&self.notify).enumerate() {
            if !r.ready && i >= min_queues {
                // A driver may use only the first queues of a multiqueue device (Linux uses
                // one per vCPU); the device is told how many it got.
                break;
            }
            let queue =
                build_queue(r, max, event_idx, &mem).map_err(|e| format!("queue {i}: {e}"))?;
            let event = n.try_clone().map_err(|e| e.to_string())?;
            queues.push(QueueEvent { queue, event });
        }
        let interrupt: Arc<dyn Interrupt> = self.interrupt.clone();
        self.device
            .activate(self.mem.clone(), interrupt, queues)
            .map_err(|e| e.to_string())
    }

    /// The shared part of a snapshot (`pci` left empty): the registers, each ready queue's
    /// position read from its used ring when the device runs (the used index is where the
    /// paused device stopped), the interrupt status and generation.
    pub fn save(&self) -> TransportState {
        let live = self.live();
        let mem = self.mem.memory();
        let queues = self
            .queues
            .iter()
            .map(|r| {
                let mut r = *r;
                if live && r.ready {
                    r.next = mem
                        .read_obj::<u16>(GuestAddress(r.device.wrapping_add(2)))
                        .unwrap_or(0);
                }
                r
            })
            .collect();
        let irq = self.interrupt.state();
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            needs_reset: self.needs_reset,
            driver_features: self.driver_features,
            driver_features_unknown: self.driver_features_unknown,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            queues,
            interrupt_status: irq.status.load(Ordering::SeqCst),
            config_generation: irq.generation.load(Ordering::SeqCst),
            pci: None,
        }
    }

    /// Checks that a saved state is of this device: same type, same number of queues.
    pub fn check_state(&self, s: &TransportState) -> Result<(), String> {
        let device_type = self.device.device_type();
        if s.device_type != device_type {
            return Err(format!(
                "saved device type {} does not match the configured device type {device_type}",
                s.device_type
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "device type {device_type}: {} queues saved, {} configured",
                s.queues.len(),
                self.queues.len()
            ));
        }
        Ok(())
    }

    /// The first half of a restore: resets the device, then loads the saved registers,
    /// interrupt status and generation. The transport then restores its own part and calls
    /// [`restart`](Self::restart).
    pub fn restore_registers(&mut self, s: &TransportState) -> Result<(), String> {
        self.check_state(s)?;
        self.reset();
        self.queue_select = s.queue_select;
        self.device_features_select = s.device_features_select;
        self.driver_features_select = s.driver_features_select;
        self.driver_features = s.driver_features;
        self.driver_features_unknown = s.driver_features_unknown;
        self.queues.clone_from(&s.queues);
        // Device status is an 8-bit field on both transports.
        self.status = s.status & 0xff;
        self.needs_reset = s.needs_reset;
        let irq = self.interrupt.state();
        irq.status.store(s.interrupt_status, Ordering::SeqCst);
        irq.generation.store(s.config_generation, Ordering::SeqCst);
        Ok(())
    }

    /// The end of a restore, once the registers hold the saved state: the device learns the
    /// accepted features (they must be ones it offers here) and, when the driver had started
    /// it, is activated on its saved queues, each of which is then looked at once as if
    /// notified (a notification the driver sent while the device was pausing died with the
    /// old process).
    pub fn restart(&mut self) -> Result<(), String> {
        let device_type = self.device.device_type();
        let live = self.live();
        if self.status & FEATURES_OK != 0 {
            check_restored_features(
                device_type,
                self.driver_features,
                self.driver_features_unknown,
                self.offered_features(),
            )?;
            self.device.ack_features(self.driver_features);
        } else if live {
            return Err(format!(
                "virtio device type {device_type}: the snapshot has the driver started without accepted features"
            ));
        }
        if !live {
            return Ok(());
        }
        self.activate()
            .map_err(|e| format!("cannot restart virtio device type {device_type}: {e}"))?;
        for (q, e) in self.queues.iter().zip(&self.notify) {
            if q.ready {
                let _ = e.write(1);
            }
        }
        Ok(())
    }
}

/// Bits `32 * sel ..` of `v`: 0 past bit 63.
fn word(v: u64, sel: u32) -> u32 {
    match sel {
        0 => v as u32,
        1 => (v >> 32) as u32,
        _ => 0,
    }
}

/// The queue `r` describes, validated against `mem`.
fn build_queue(
    r: &QueueRegs,
    max: u16,
    event_idx: bool,
    mem: &GuestMemoryMmap,
) -> Result<Queue, String> {
    if !r.ready {
        return Err("not ready".into());
    }
    let e = |e: virtio_queue::Error| e.to_string();
    let mut q = Queue::new(max).map_err(e)?;
    let size = u16::try_from(r.size).map_err(|_| format!("size {}", r.size))?;
    q.try_set_size(size).map_err(e)?;
    q.try_set_desc_table_address(GuestAddress(r.desc))
        .map_err(e)?;
    q.try_set_avail_ring_address(GuestAddress(r.driver))
        .map_err(e)?;
    q.try_set_used_ring_address(GuestAddress(r.device))
        .map_err(e)?;
    q.set_ready(true);
    q.set_event_idx(event_idx);
    q.set_next_avail(r.next);
    q.set_next_used(r.next);
    if !q.is_valid(mem) {
        return Err("rings outside guest memory".into());
    }
    Ok(q)
}

/// Checks a snapshot's accepted features against what the device offers here (`offered`):
/// once FEATURES_OK is set they passed the core's acceptance check, so anything else was not
/// written by a tern driving this device and is refused.
fn check_restored_features(
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

/// The status bits a driver sets, in the order it must set them.
const STATUS_ORDER: [u32; 4] = [ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK];

/// What a driver's write to the device status asks for, by the virtio 1.x state machine.
#[derive(Debug, PartialEq, Eq)]
enum StatusWrite {
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
/// reset.
fn status_write(old: u32, val: u32, blocked: bool) -> StatusWrite {
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
