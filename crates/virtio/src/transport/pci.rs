//! The modern (virtio 1.x, non-transitional) virtio-pci transport, spec section 4.1, as a
//! [`PciDevice`] for [`devices::pci::PciRoot`].
//!
//! Written in-tree for the same reason as virtio-mmio: no maintained crate models transports.
//!
//! Identity: vendor 0x1af4, device 0x1040 + device type, subsystem vendor 0x1af4, subsystem
//! 0x0040, revision 1, a class per device type. Interrupts are MSI-X, with `num_queues + 1`
//! vectors, or INTA# (interrupt pin 1) for a driver that leaves MSI-X off. A queue or the configuration mapped to
//! [`VIRTIO_MSI_NO_VECTOR`], or any interrupt while the driver has MSI-X disabled, raises
//! nothing (the ISR bits are still set, so a polling driver sees them).
//!
//! Everything lives in BAR 0, a 64-bit non-prefetchable memory BAR:
//!
//! | offset | region | capability |
//! |---|---|---|
//! | [`COMMON_CFG_OFFSET`] | common configuration (0x38 bytes) | `VIRTIO_PCI_CAP_COMMON_CFG` |
//! | [`ISR_OFFSET`] | ISR status (1 byte, read-to-clear) | `VIRTIO_PCI_CAP_ISR_CFG` |
//! | [`DEVICE_CFG_OFFSET`] | device configuration (up to 4 KiB) | `VIRTIO_PCI_CAP_DEVICE_CFG` |
//! | [`NOTIFY_OFFSET`] | notifications: queue `i` at `+ 4 * i` | `VIRTIO_PCI_CAP_NOTIFY_CFG` (multiplier 4) |
//! | [`MSIX_TABLE_OFFSET`] | MSI-X table, then the PBA on the next 4 KiB boundary | MSI-X |
//!
//! plus a `VIRTIO_PCI_CAP_PCI_CFG` window for drivers that reach BAR 0 through configuration
//! space.
//!
//! Queue notifications: the VMM registers each queue's eventfd
//! ([`VirtioPciDevice::queue_notify_events`]) as a KVM ioeventfd on its notification address,
//! without datamatch and for any length (drivers write the queue index as 16 bits); a
//! notification that reaches [`PciDevice::bar_write`] signals the same eventfd.
//!
//! Hostile input is judged by the shared `VirtioCore`, as on virtio-mmio: an invalid status
//! transition, DRIVER_OK without accepted features, a queue that is not enabled, has a bad
//! size or lies outside guest memory at DRIVER_OK, or a device that fails to activate sets
//! DEVICE_NEEDS_RESET (with a configuration change notification if DRIVER_OK is set); only a
//! reset (writing 0 to device_status) clears it. Every queue the device has must be enabled at
//! DRIVER_OK. Accesses of any width and offset are accepted and never panic; reads of unbacked
//! offsets return zeros.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::pci::config::{PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR};
use devices::pci::{
    BarInfo, BarKind, BarRelocation, MsiRouting, MsixState, PciConfigError, PciConfiguration,
    PciDevice, PciHeader,
};
use virtio_bindings::bindings::virtio_config::{
    VIRTIO_F_ADMIN_VQ, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_NOTIF_CONFIG_DATA,
    VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_SR_IOV,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::core::{InterruptState, TransportInterrupt, VirtioCore};
use super::state::{PciState, QueueRegs, TransportState};
use crate::{Interrupt, InterruptKind, VirtioDevice, VmMemory};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem ID of modern devices (0x40 and up).
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x0040;
/// "No MSI-X vector" in config_msix_vector / queue_msix_vector.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// virtio PCI capability types.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// Notification capability.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// ISR status capability.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// Device configuration capability.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// Configuration-space access window capability.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// The BAR everything lives in.
pub const VIRTIO_BAR: u8 = 0;
/// Common configuration offset in BAR 0.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Common configuration length (virtio 1.1 layout, up to queue_device).
pub const COMMON_CFG_LEN: u64 = 0x38;
/// ISR status offset.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device configuration offset.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Device configuration length.
pub const DEVICE_CFG_LEN: u64 = 0x1000;
/// Notification region offset.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Most queues the notification region holds.
pub const MAX_QUEUES: usize = 0x1000 / NOTIFY_OFF_MULTIPLIER as usize;
/// MSI-X table offset.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;

/// ISR bit: a queue was used (only when MSI-X is disabled).
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: the device configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// Transport features this transport does not implement: never offered, whatever the device
/// says.
const UNSUPPORTED_FEATURES: u64 = 1 << VIRTIO_F_RING_PACKED
    | 1 << VIRTIO_F_SR_IOV
    | 1 << VIRTIO_F_NOTIFICATION_DATA
    | 1 << VIRTIO_F_NOTIF_CONFIG_DATA
    | 1 << VIRTIO_F_RING_RESET
    | 1 << VIRTIO_F_ADMIN_VQ;

// Common configuration fields (offset, width).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC_LO: u64 = 0x20;
const QUEUE_DESC_HI: u64 = 0x24;
const QUEUE_DRIVER_LO: u64 = 0x28;
const QUEUE_DRIVER_HI: u64 = 0x2c;
const QUEUE_DEVICE_LO: u64 = 0x30;
const QUEUE_DEVICE_HI: u64 = 0x34;
const COMMON_FIELDS: [(u64, usize); 19] = [
    (DEVICE_FEATURE_SELECT, 4),
    (DEVICE_FEATURE, 4),
    (DRIVER_FEATURE_SELECT, 4),
    (DRIVER_FEATURE, 4),
    (CONFIG_MSIX_VECTOR, 2),
    (NUM_QUEUES, 2),
    (DEVICE_STATUS, 1),
    (CONFIG_GENERATION, 1),
    (QUEUE_SELECT, 2),
    (QUEUE_SIZE, 2),
    (QUEUE_MSIX_VECTOR, 2),
    (QUEUE_ENABLE, 2),
    (QUEUE_NOTIFY_OFF, 2),
    (QUEUE_DESC_LO, 4),
    (QUEUE_DESC_HI, 4),
    (QUEUE_DRIVER_LO, 4),
    (QUEUE_DRIVER_HI, 4),
    (QUEUE_DEVICE_LO, 4),
    (QUEUE_DEVICE_HI, 4),
];

/// Errors of wrapping a device (bugs of the device or the VMM, not guest input).
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// More queues than the notification region holds.
    #[error("{0} queues is more than virtio-pci supports ({MAX_QUEUES})")]
    TooManyQueues(usize),
    /// A queue maximum size that is not a power of two in 1..=32768.
    #[error("queue {queue} has an invalid maximum size {size}")]
    BadQueueMaxSize {
        /// Queue index.
        queue: usize,
        /// Its maximum size.
        size: u16,
    },
    /// Building configuration space failed.
    #[error("configuration space: {0}")]
    Config(#[from] PciConfigError),
    /// Creating an eventfd failed.
    #[error("cannot create a queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// One queue's notification address, for a KVM ioeventfd.
#[derive(Debug)]
pub struct QueueNotify {
    /// Queue index.
    pub queue: u16,
    /// Guest-physical address of the queue's notification register (at the BAR's current
    /// address): register with no datamatch and any length.
    pub addr: u64,
    /// A duplicate of the queue's eventfd (same counter; registering it is registering the
    /// transport's).
    pub event: EventFd,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a thread panicked earlier; keep serving the guest.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A level-triggered legacy interrupt line (INTx). The VMM implements it with a KVM irqfd in
/// resample mode: `assert` raises the line; KVM lowers it when the guest acknowledges the
/// interrupt and tells the VMM, which raises it again while [`VirtioPciDevice::intx_pending`]
/// says the ISR is still set.
pub trait IntxLine: Send + Sync {
    /// Raises the line.
    fn assert(&self) -> std::io::Result<()>;
}

/// Interrupt state shared with the device's worker: ISR and configuration generation (the
/// core's [`InterruptState`]), vector mapping and the MSI-X state. Never locks the transport.
struct PciInterrupt {
    msix: Mutex<MsixState>,
    intx: std::sync::OnceLock<Arc<dyn IntxLine>>,
    state: InterruptState,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
}

impl PciInterrupt {
    /// The ISR as the driver reads it (8 bits).
    fn isr(&self) -> u8 {
        self.state.status.load(Ordering::SeqCst) as u8
    }
}

impl TransportInterrupt for PciInterrupt {
    fn state(&self) -> &InterruptState {
        &self.state
    }

    fn reset(&self) {
        for v in &self.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
    }
}

impl Interrupt for PciInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let vector = match kind {
            InterruptKind::Config => {
                self.state.config_changed(ISR_CONFIG.into());
                self.config_vector.load(Ordering::SeqCst)
            }
            InterruptKind::Queue(q) => self
                .queue_vectors
                .get(usize::from(q))
                .ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no queue {q}"))
                })?
                .load(Ordering::SeqCst),
        };
        let mut msix = lock(&self.msix);
        if !msix.enabled() {
            // Without MSI-X: set the ISR bit and raise INTx (when the VMM wired it).
            if matches!(kind, InterruptKind::Queue(_)) {
                self.state
                    .status
                    .fetch_or(ISR_QUEUE.into(), Ordering::SeqCst);
            }
            return match self.intx.get() {
                Some(line) => line.assert(),
                None => Ok(()),
            };
        }
        if vector == VIRTIO_MSI_NO_VECTOR {
            return Ok(());
        }
        msix.trigger(vector).map(|_| ())
    }
}

/// PCI class code for a virtio device type.
fn class_code(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_00_00, // network controller, Ethernet
        2 => 0x01_00_00, // mass storage, SCSI (what QEMU reports for virtio-blk)
        3 => 0x07_80_00, // simple communication controller, other
        _ => 0xff_00_00, // unassigned class
    }
}

/// A virtio device behind the modern virtio-pci transport: configuration space, BAR 0's
/// layout and interrupt delivery over the `VirtioCore`, which takes every state-machine
/// decision.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    msix_cap: u16,
    pci_cfg_cap: u16,
    msix_pba_offset: u64,
    bar_size: u64,
    core: VirtioCore<PciInterrupt>,
    /// The core's interrupt object (the same `Arc`), for MSI-X and the vectors.
    interrupt: Arc<PciInterrupt>,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl super::PauseDevice for VirtioPciDevice {
    fn pause_device(&mut self, deadline: std::time::Instant) -> bool {
        self.core.device_mut().pause(deadline)
    }

    fn resume_device(&mut self) {
        self.core.device_mut().resume();
    }

    fn save_state(&self) -> TransportState {
        let mut config = vec![0u8; CONFIG_SPACE_SAVED];
        self.config.read(0, &mut config);
        let msix = lock(&self.interrupt.msix);
        let mut msix_table = vec![0u8; msix.table_size() as usize];
        msix.table_read(0, &mut msix_table);
        let msix_pending = msix.pending_bits();
        drop(msix);
        let mut s = self.core.save();
        // config_generation is an 8-bit register here.
        s.config_generation &= 0xff;
        s.pci = Some(PciState {
            config,
            msix_table,
            msix_pending,
            config_vector: self.interrupt.config_vector.load(Ordering::SeqCst),
            queue_vectors: self
                .interrupt
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
        });
        s
    }

    fn restore_state(&mut self, s: &TransportState) -> Result<(), String> {
        self.core.check_state(s)?;
        let Some(p) = &s.pci else {
            return Err(
                "the snapshot has a virtio-mmio device where a virtio-pci one is configured".into(),
            );
        };
        if p.config.len() != CONFIG_SPACE_SAVED
            || p.queue_vectors.len() != self.core.num_queues()
            || p.msix_table.len() as u64 != lock(&self.interrupt.msix).table_size()
        {
            return Err(format!(
                "virtio-pci device type {}: the saved PCI state has the wrong size",
                s.device_type
            ));
        }
        // Resets the device (and with it the vector mapping), then loads the shared registers.
        self.core.restore_registers(s)?;
        // The registers that are narrower here than in the saved state.
        let sel = self.core.queue_select() as u16;
        self.core.set_queue_select(sel.into());
        let irq = &self.interrupt.state;
        irq.status.fetch_and(0xff, Ordering::SeqCst);
        irq.generation.fetch_and(0xff, Ordering::SeqCst);
        // The MSI-X table first, then configuration space (whose message control enables
        // MSI-X and so routes every unmasked vector). Configuration space goes back through
        // the guest's own write path, a dword at a time, so read-only bits stay as this tern
        // builds them; the access window's data field is not a register and is skipped.
        lock(&self.interrupt.msix).table_write(0, &p.msix_table);
        let window = self.pci_cfg_cap + 16;
        for reg in (0..CONFIG_SPACE_SAVED as u16).step_by(4) {
            if reg == window {
                continue;
            }
            let r = usize::from(reg);
            if let Some(m) = self.config.write(reg, &p.config[r..r + 4]) {
                return Err(format!(
                    "virtio-pci device type {}: BAR {} is at {:#x} in the snapshot and {:#x} here",
                    s.device_type, m.bar, m.new_addr, m.old_addr
                ));
            }
        }
        let ctrl = self.config.read_u16(self.msix_cap + 2);
        let mut msix = lock(&self.interrupt.msix);
        msix.set_message_control(ctrl);
        msix.restore_pending(&p.msix_pending);
        drop(msix);
        let nvec = self.num_vectors();
        let vector = |v: u16| if v < nvec { v } else { VIRTIO_MSI_NO_VECTOR };
        self.interrupt
            .config_vector
            .store(vector(p.config_vector), Ordering::SeqCst);
        for (q, &v) in self.interrupt.queue_vectors.iter().zip(&p.queue_vectors) {
            q.store(vector(v), Ordering::SeqCst);
        }
        self.core.restart()
    }

    fn device(&self) -> &dyn VirtioDevice {
        self.core.device()
    }

    fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.core.device_mut()
    }
}

super::transport_component!(VirtioPciDevice);

/// How much of configuration space a snapshot keeps: the header and the capabilities, which
/// all live in the first 256 bytes.
const CONFIG_SPACE_SAVED: usize = 256;

impl VirtioPciDevice {
    /// Wires the legacy interrupt line used when the driver leaves MSI-X disabled (once).
    pub fn set_intx(&self, line: Arc<dyn IntxLine>) {
        let _ = self.interrupt.intx.set(line);
    }

    /// Whether an INTx-delivered interrupt is still pending (the ISR is not yet read), for
    /// the VMM's resample handling. Safe to call from any thread.
    pub fn intx_pending(&self) -> Arc<dyn Fn() -> bool + Send + Sync> {
        let i = self.interrupt.clone();
        Arc::new(move || i.isr() != 0 && !lock(&i.msix).enabled())
    }

    /// Wraps `device`; its MSI-X vectors are delivered through `msi`.
    pub fn new(
        mem: VmMemory,
        device: Box<dyn VirtioDevice>,
        msi: Arc<dyn MsiRouting>,
    ) -> Result<Self, VirtioPciError> {
        let maxes = device.queue_max_sizes().to_vec();
        if maxes.len() > MAX_QUEUES {
            return Err(VirtioPciError::TooManyQueues(maxes.len()));
        }
        for (queue, &size) in maxes.iter().enumerate() {
            if Queue::new(size).is_err() {
                return Err(VirtioPciError::BadQueueMaxSize { queue, size });
            }
        }
        let num_queues = maxes.len() as u16;
        let msix = MsixState::new(num_queues + 1, msi);
        let msix_pba_offset = MSIX_TABLE_OFFSET + align_up(msix.table_size(), 0x1000);
        let bar_size = (msix_pba_offset + align_up(msix.pba_size(), 0x1000)).next_power_of_two();

        let device_type = device.device_type();
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device_type as u16),
            class_code: class_code(device_type),
            revision: 1,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
            // INTA#; it only fires when the VMM wires it (`set_intx`) and MSI-X is off.
            interrupt_pin: 1,
        });
        config.add_bar(VIRTIO_BAR, BarKind::Mem64, bar_size, false)?;
        let notify_len = (u32::from(num_queues) * NOTIFY_OFF_MULTIPLIER).max(4);
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &virtio_cap(
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_LEN,
                &[],
            ),
            &[],
        )?;
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                u64::from(notify_len),
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1, &[]),
            &[],
        )?;
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &virtio_cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_LEN,
                &[],
            ),
            &[],
        )?;
        // The access window: bar, offset and length are the driver's; the data is served by
        // `config_read`/`config_write`.
        let body = virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut wmask = vec![0u8; body.len()];
        wmask[2] = 0xff;
        wmask[6..14].fill(0xff);
        let pci_cfg_cap = config.add_capability(PCI_CAP_ID_VNDR, &body, &wmask)?;
        let (body, wmask) = msix.capability(
            VIRTIO_BAR,
            MSIX_TABLE_OFFSET as u32,
            VIRTIO_BAR,
            msix_pba_offset as u32,
        );
        let msix_cap = config.add_capability(PCI_CAP_ID_MSIX, &body, &wmask)?;

        let interrupt = Arc::new(PciInterrupt {
            msix: Mutex::new(msix),
            intx: std::sync::OnceLock::new(),
            state: InterruptState::default(),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: maxes
                .iter()
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
        });
        let core = VirtioCore::new(
            "virtio-pci",
            mem,
            device,
            interrupt.clone(),
            UNSUPPORTED_FEATURES,
        )
        .map_err(VirtioPciError::EventFd)?;
        Ok(VirtioPciDevice {
            config,
            msix_cap,
            pci_cfg_cap,
            msix_pba_offset,
            bar_size,
            core,
            interrupt,
        })
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u32 {
        self.core.device().device_type()
    }

    /// Size of BAR 0.
    pub fn bar_size(&self) -> u64 {
        self.bar_size
    }

    /// Each queue's notification address (at BAR 0's current address) and eventfd, for KVM
    /// ioeventfds (no datamatch, any length). Ask again after a [`BarRelocation`]. The
    /// eventfds stay the same for the transport's life, across resets.
    pub fn queue_notify_events(&self) -> std::io::Result<Vec<QueueNotify>> {
        let base = self.config.bar(VIRTIO_BAR).map_or(0, |b| b.addr);
        self.core
            .notify_events()
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Ok(QueueNotify {
                    queue: i as u16,
                    addr: base + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                    event: e.try_clone()?,
                })
            })
            .collect()
    }

    /// device_status as the driver reads it.
    pub fn status(&self) -> u8 {
        // The core's status is 8 bits wide.
        self.core.status() as u8
    }

    fn num_vectors(&self) -> u16 {
        lock(&self.interrupt.msix).num_vectors()
    }

    /// The selected queue, if it exists and may still be configured: besides the core's rule
    /// (not after DRIVER_OK or DEVICE_NEEDS_RESET), a queue is set up before it is enabled,
    /// and its registers stay as they were at queue_enable.
    fn queue_mut(&mut self) -> Option<&mut QueueRegs> {
        self.core.selected_queue_mut().filter(|q| !q.ready)
    }

    /// A validated MSI-X vector: in range, or NO_VECTOR (which the driver reads back to learn
    /// that the mapping failed).
    fn vector(&self, v: u16) -> u16 {
        if v < self.num_vectors() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// The value of the common configuration field at `off`.
    fn common_field(&self, off: u64) -> u64 {
        let core = &self.core;
        let sel = core.selected_queue();
        let qsel = core.queue_select() as usize;
        let half = |v: u64, hi: bool| if hi { v >> 32 } else { v & 0xffff_ffff };
        match off {
            DEVICE_FEATURE_SELECT => core.device_features_select().into(),
            DEVICE_FEATURE => core.device_features_word().into(),
            DRIVER_FEATURE_SELECT => core.driver_features_select().into(),
            DRIVER_FEATURE => core.driver_features_word().into(),
            CONFIG_MSIX_VECTOR => self.interrupt.config_vector.load(Ordering::SeqCst).into(),
            NUM_QUEUES => core.num_queues() as u64,
            DEVICE_STATUS => self.status().into(),
            CONFIG_GENERATION => {
                (self.interrupt.state.generation.load(Ordering::SeqCst) as u8).into()
            }
            QUEUE_SELECT => core.queue_select().into(),
            QUEUE_SIZE => sel.map_or(0, |q| q.size.into()),
            QUEUE_MSIX_VECTOR => self
                .interrupt
                .queue_vectors
                .get(qsel)
                .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::SeqCst))
                .into(),
            QUEUE_ENABLE => sel.map_or(0, |q| q.ready.into()),
            QUEUE_NOTIFY_OFF => sel.map_or(0, |_| qsel as u64),
            QUEUE_DESC_LO | QUEUE_DESC_HI => sel.map_or(0, |q| half(q.desc, off == QUEUE_DESC_HI)),
            QUEUE_DRIVER_LO | QUEUE_DRIVER_HI => {
                sel.map_or(0, |q| half(q.driver, off == QUEUE_DRIVER_HI))
            }
            QUEUE_DEVICE_LO | QUEUE_DEVICE_HI => {
                sel.map_or(0, |q| half(q.device, off == QUEUE_DEVICE_HI))
            }
            _ => 0,
        }
    }

    fn set_common_field(&mut self, off: u64, val: u64) {
        let lo = |old: u64| (old & !0xffff_ffff) | (val & 0xffff_ffff);
        let hi = |old: u64| (old & 0xffff_ffff) | (val << 32);
        match off {
            DEVICE_FEATURE_SELECT => self.core.set_device_features_select(val as u32),
            DRIVER_FEATURE_SELECT => self.core.set_driver_features_select(val as u32),
            DRIVER_FEATURE => self.core.write_driver_features(val as u32),
            CONFIG_MSIX_VECTOR => {
                let v = self.vector(val as u16);
                self.interrupt.config_vector.store(v, Ordering::SeqCst);
            }
            DEVICE_STATUS => self.core.set_status(u32::from(val as u8)),
            QUEUE_SELECT => self.core.set_queue_select(u32::from(val as u16)),
            QUEUE_MSIX_VECTOR => {
                let v = self.vector(val as u16);
                let sel = self.core.queue_select() as usize;
                if let Some(q) = self.interrupt.queue_vectors.get(sel) {
                    q.store(v, Ordering::SeqCst);
                }
            }
            QUEUE_SIZE => {
                if let Some(q) = self.queue_mut() {
                    q.size = u32::from(val as u16);
                }
            }
            QUEUE_ENABLE => {
                if let Some(q) = self.queue_mut() {
                    // Writing 0 is not allowed; only a reset disables a queue.
                    q.ready = val == 1;
                }
            }
            QUEUE_DESC_LO | QUEUE_DESC_HI | QUEUE_DRIVER_LO | QUEUE_DRIVER_HI | QUEUE_DEVICE_LO
            | QUEUE_DEVICE_HI => {
                let Some(q) = self.queue_mut() else { return };
                let reg = match off & !0x7 {
                    QUEUE_DESC_LO => &mut q.desc,
                    QUEUE_DRIVER_LO => &mut q.driver,
                    _ => &mut q.device,
                };
                *reg = if off & 0x4 == 0 { lo(*reg) } else { hi(*reg) };
            }
            // Read-only fields.
            _ => {}
        }
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset + i as u64;
            *b = COMMON_FIELDS
                .iter()
                .find(|(f, w)| (*f..*f + *w as u64).contains(&o))
                .map_or(0, |&(f, _)| {
                    self.common_field(f).to_le_bytes()[(o - f) as usize]
                });
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        for (f, w) in COMMON_FIELDS {
            let fend = f + w as u64;
            if fend <= offset || f >= end {
                continue;
            }
            // Merge a partial write with the field's current value.
            let mut bytes = self.common_field(f).to_le_bytes();
            for o in f.max(offset)..fend.min(end) {
                bytes[(o - f) as usize] = data[(o - offset) as usize];
            }
            self.set_common_field(f, u64::from_le_bytes(bytes));
        }
    }

    /// Serves an access to the `VIRTIO_PCI_CAP_PCI_CFG` data field at byte `k` of it.
    fn pci_cfg_window(&mut self, k: usize, read: Option<&mut [u8]>, write: Option<&[u8]>) {
        let cap = self.pci_cfg_cap;
        let bar = self.config.read_u8(cap + 4);
        let offset = u64::from(self.config.read_u32(cap + 8));
        let len = self.config.read_u32(cap + 12) as usize;
        let valid = bar == VIRTIO_BAR && matches!(len, 1 | 2 | 4) && offset % len as u64 == 0;
        if let Some(out) = read {
            let mut buf = [0u8; 4];
            if valid {
                self.bar_read(VIRTIO_BAR, offset, &mut buf[..len]);
            }
            for (i, b) in out.iter_mut().enumerate() {
                *b = buf.get(k + i).copied().unwrap_or(0);
            }
        } else if let Some(data) = write {
            if valid && k == 0 && data.len() >= len {
                self.bar_write(VIRTIO_BAR, offset, &data[..len]);
            }
        }
    }
}

/// The body (after ID and next pointer) of a `virtio_pci_cap` for `cfg_type` over
/// `[offset, +length)` of BAR 0, followed by `extra`.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let cap_len = 16 + extra.len() as u8;
    let mut b = vec![cap_len, cfg_type, VIRTIO_BAR, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

/// Which region of BAR 0 `[offset, +len)` falls in, with the offset inside it. Accesses that
/// straddle a region boundary match nothing.
enum Region {
    Common(u64),
    Isr,
    Device(u64),
    Notify(u64),
    MsixTable(u64),
    MsixPba(u64),
    None,
}

impl VirtioPciDevice {
    fn region(&self, offset: u64, len: usize) -> Region {
        let Some(end) = offset.checked_add(len as u64) else {
            return Region::None;
        };
        let notify_len = self.core.num_queues() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        let within = |base: u64, size: u64| offset >= base && end <= base + size;
        if within(COMMON_CFG_OFFSET, COMMON_CFG_LEN) {
            Region::Common(offset - COMMON_CFG_OFFSET)
        } else if within(ISR_OFFSET, 1) {
            Region::Isr
        } else if within(DEVICE_CFG_OFFSET, DEVICE_CFG_LEN) {
            Region::Device(offset - DEVICE_CFG_OFFSET)
        } else if within(NOTIFY_OFFSET, notify_len) {
            Region::Notify(offset - NOTIFY_OFFSET)
        } else if within(MSIX_TABLE_OFFSET, self.msix_pba_offset - MSIX_TABLE_OFFSET) {
            Region::MsixTable(offset - MSIX_TABLE_OFFSET)
        } else if within(self.msix_pba_offset, self.bar_size - self.msix_pba_offset) {
            Region::MsixPba(offset - self.msix_pba_offset)
        } else {
            Region::None
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg: u16, data: &mut [u8]) {
        let win = self.pci_cfg_cap + 16;
        if (win..win + 4).contains(&reg) {
            return self.pci_cfg_window(usize::from(reg - win), Some(data), None);
        }
        self.config.read(reg, data);
    }

    fn config_write(&mut self, reg: u16, data: &[u8]) -> Option<BarRelocation> {
        let win = self.pci_cfg_cap + 16;
        if (win..win + 4).contains(&reg) {
            self.pci_cfg_window(usize::from(reg - win), None, Some(data));
            return None;
        }
        let moved = self.config.write(reg, data);
        let ctrl = self.config.read_u16(self.msix_cap + 2);
        lock(&self.interrupt.msix).set_message_control(ctrl);
        moved
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn set_bar_address(&mut self, bar: u8, addr: u64) {
        if let Err(e) = self.config.set_bar_address(bar, addr) {
            tracing::error!("virtio-pci: cannot place BAR {bar} at {addr:#x}: {e}");
        }
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != VIRTIO_BAR {
            return;
        }
        match self.region(offset, data.len()) {
            Region::Common(o) => self.common_read(o, data),
            Region::Isr => data[0] = self.interrupt.state.status.swap(0, Ordering::SeqCst) as u8,
            Region::Device(o) => self.core.device().read_config(o, data),
            Region::MsixTable(o) => lock(&self.interrupt.msix).table_read(o, data),
            Region::MsixPba(o) => lock(&self.interrupt.msix).pba_read(o, data),
            Region::Notify(_) | Region::None => {}
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != VIRTIO_BAR {
            return;
        }
        match self.region(offset, data.len()) {
            Region::Common(o) => self.common_write(o, data),
            Region::Device(o) => self.core.device_mut().write_config(o, data),
            Region::Notify(o) => {
                if o % u64::from(NOTIFY_OFF_MULTIPLIER) == 0 {
                    self.core.notify(o / u64::from(NOTIFY_OFF_MULTIPLIER));
                }
            }
            Region::MsixTable(o) => lock(&self.interrupt.msix).table_write(o, data),
            Region::MsixPba(o) => lock(&self.interrupt.msix).pba_write(o, data),
            Region::Isr | Region::None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestMemoryMmap, QueueEvent};
    use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
        VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
        VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
    };
    use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

    use devices::pci::config::{PCI_CAPABILITY_LIST, PCI_STATUS, PCI_STATUS_CAP_LIST};
    use devices::pci::msix::{MSIX_CTRL_ENABLE, MSIX_CTRL_FUNCTION_MASK};
    use devices::pci::{MsiMessage, PciBdf, PciConfigMmio, PciRoot, PciWindows};
    use devices::BusDevice;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use crate::ActivateError;

    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
    /// Offered: VERSION_1, EVENT_IDX, device bit 3 and RING_PACKED (which the transport hides).
    const TEST_FEATURES: u64 = VERSION_1 | EVENT_IDX | 1 << 3 | 1 << VIRTIO_F_RING_PACKED;
    const BAR_BASE: u64 = 0xc000_0000;
    const MEM_SIZE: usize = 0x10_0000;

    #[derive(Default)]
    struct Record {
        acked: Option<u64>,
        /// (ready, size, desc, avail, used, event_idx) of each activated queue.
        queues: Vec<(bool, u16, u64, u64, u64, bool)>,
        events: Vec<EventFd>,
        interrupt: Option<Arc<dyn Interrupt>>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    /// A device that records what the transport does to it.
    struct TestDevice {
        rec: Arc<Mutex<Record>>,
        fail_activate: bool,
    }

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            TEST_FEATURES
        }
        fn ack_features(&mut self, features: u64) {
            lock(&self.rec).acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = 0x10u8.wrapping_add(offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            lock(&self.rec).config_writes.push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: VmMemory,
            interrupt: Arc<dyn Interrupt>,
            queues: Vec<QueueEvent>,
        ) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::BadQueue("refused".into()));
            }
            let mut r = lock(&self.rec);
            for q in queues {
                let qq = &q.queue;
                r.queues.push((
                    qq.ready(),
                    qq.size(),
                    qq.desc_table(),
                    qq.avail_ring(),
                    qq.used_ring(),
                    qq.event_idx_enabled(),
                ));
                r.events.push(q.event);
            }
            r.interrupt = Some(interrupt);
            Ok(())
        }
        fn reset(&mut self) {
            let mut r = lock(&self.rec);
            r.resets += 1;
            r.queues.clear();
            r.events.clear();
            r.interrupt = None;
        }
    }

    /// An [`MsiRouting`] that records its calls.
    #[derive(Default)]
    struct Msi(Mutex<Vec<(u16, Option<Option<MsiMessage>>)>>);

    impl Msi {
        fn take(&self) -> Vec<(u16, Option<Option<MsiMessage>>)> {
            std::mem::take(&mut lock(&self.0))
        }
    }

    impl MsiRouting for Msi {
        /// Recorded as (vector, Some(msg)).
        fn update(&self, vector: u16, msg: Option<MsiMessage>) {
            lock(&self.0).push((vector, Some(msg)));
        }
        /// Recorded as (vector, None).
        fn trigger(&self, vector: u16) -> std::io::Result<()> {
            lock(&self.0).push((vector, None));
            Ok(())
        }
    }

    /// Where the driver found each virtio structure.
    #[derive(Debug, Default)]
    struct Caps {
        common: Option<(u8, u32, u32)>,
        notify: Option<(u8, u32, u32, u32)>,
        isr: Option<(u8, u32, u32)>,
        device: Option<(u8, u32, u32)>,
        pci_cfg: Option<u16>,
        msix: Option<u16>,
    }

    /// A driver's view: the device, its guest memory and the MSI recorder.
    struct Driver {
        d: VirtioPciDevice,
        rec: Arc<Mutex<Record>>,
        msi: Arc<Msi>,
        mem: GuestMemoryMmap,
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn driver(fail_activate: bool) -> Driver {
        let rec = Arc::new(Mutex::new(Record::default()));
        let msi = Arc::new(Msi::default());
        let mem = mem();
        let dev = TestDevice {
            rec: rec.clone(),
            fail_activate,
        };
        let mut d =
            VirtioPciDevice::new(VmMemory::new(mem.clone()), Box::new(dev), msi.clone()).unwrap();
        d.set_bar_address(0, BAR_BASE);
        Driver { d, rec, msi, mem }
    }

    impl Driver {
        fn cfg8(&mut self, reg: u16) -> u8 {
            let mut b = [0u8; 1];
            self.d.config_read(reg, &mut b);
            b[0]
        }
        fn cfg16(&mut self, reg: u16) -> u16 {
            let mut b = [0u8; 2];
            self.d.config_read(reg, &mut b);
            u16::from_le_bytes(b)
        }
        fn cfg32(&mut self, reg: u16) -> u32 {
            let mut b = [0u8; 4];
            self.d.config_read(reg, &mut b);
            u32::from_le_bytes(b)
        }

        /// Walks the capability list as Linux's virtio_pci_modern does.
        fn caps(&mut self) -> Caps {
            let mut c = Caps::default();
            assert_ne!(self.cfg16(PCI_STATUS) & PCI_STATUS_CAP_LIST, 0);
            let mut ptr = self.cfg8(PCI_CAPABILITY_LIST);
            let mut n = 0;
            while ptr != 0 {
                n += 1;
                assert!(n < 48, "capability list loops");
                let p = u16::from(ptr);
                match self.cfg8(p) {
                    PCI_CAP_ID_MSIX => c.msix = Some(p),
                    PCI_CAP_ID_VNDR => {
                        let (ty, bar) = (self.cfg8(p + 3), self.cfg8(p + 4));
                        let (off, len) = (self.cfg32(p + 8), self.cfg32(p + 12));
                        match ty {
                            VIRTIO_PCI_CAP_COMMON_CFG => c.common = Some((bar, off, len)),
                            VIRTIO_PCI_CAP_NOTIFY_CFG => {
                                assert_eq!(self.cfg8(p + 2), 20);
                                c.notify = Some((bar, off, len, self.cfg32(p + 16)))
                            }
                            VIRTIO_PCI_CAP_ISR_CFG => c.isr = Some((bar, off, len)),
                            VIRTIO_PCI_CAP_DEVICE_CFG => c.device = Some((bar, off, len)),
                            VIRTIO_PCI_CAP_PCI_CFG => c.pci_cfg = Some(p),
                            t => panic!("unknown virtio cap type {t}"),
                        }
                    }
                    id => panic!("unexpected capability {id:#x}"),
                }
                ptr = self.cfg8(p + 1);
            }
            c
        }

        fn rd(&mut self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.d.bar_read(0, off, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn wr(&mut self, off: u64, len: usize, v: u64) {
            self.d.bar_write(0, off, &v.to_le_bytes()[..len]);
        }
        fn status(&mut self) -> u8 {
            self.rd(DEVICE_STATUS, 1) as u8
        }
        fn set_status(&mut self, s: u32) {
            self.wr(DEVICE_STATUS, 1, u64::from(s));
        }

        /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns whether FEATURES_OK stuck.
        fn negotiate(&mut self, features: u64) -> bool {
            self.set_status(0);
            self.set_status(ACKNOWLEDGE);
            self.set_status(ACKNOWLEDGE | DRIVER);
            self.wr(DRIVER_FEATURE_SELECT, 4, 0);
            self.wr(DRIVER_FEATURE, 4, features & 0xffff_ffff);
            self.wr(DRIVER_FEATURE_SELECT, 4, 1);
            self.wr(DRIVER_FEATURE, 4, features >> 32);
            self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
            self.status() & FEATURES_OK as u8 != 0
        }

        /// Programs queue `i` from a mock queue and enables it.
        fn setup_queue(&mut self, i: u16, q: &MockSplitQueue<'_, GuestMemoryMmap>, size: u16) {
            self.program_queue(i, q, size);
            self.wr(QUEUE_ENABLE, 2, 1);
        }

        /// Programs queue `i` from a mock queue (leaves it selected, not enabled).
        fn program_queue(&mut self, i: u16, q: &MockSplitQueue<'_, GuestMemoryMmap>, size: u16) {
            self.wr(QUEUE_SELECT, 2, i.into());
            self.wr(QUEUE_SIZE, 2, size.into());
            // 64-bit fields as two dwords (Linux's vp_iowrite64_twopart), or one qword.
            self.wr(QUEUE_DESC_LO, 4, q.desc_table_addr().0 & 0xffff_ffff);
            self.wr(QUEUE_DESC_HI, 4, q.desc_table_addr().0 >> 32);
            self.wr(QUEUE_DRIVER_LO, 8, q.avail_addr().0);
            self.wr(QUEUE_DEVICE_LO, 4, q.used_addr().0 & 0xffff_ffff);
            self.wr(QUEUE_DEVICE_HI, 4, q.used_addr().0 >> 32);
        }

        fn enable_msix(&mut self, msix_cap: u16) {
            self.d
                .config_write(msix_cap + 2, &MSIX_CTRL_ENABLE.to_le_bytes());
        }

        /// Programs and unmasks MSI-X vector `v` with data `0x40 + v`.
        fn program_vector(&mut self, v: u64) {
            let e = MSIX_TABLE_OFFSET + v * 16;
            self.wr(e, 4, 0xfee0_0000);
            self.wr(e + 4, 4, 0);
            self.wr(e + 8, 4, 0x40 + v);
            self.wr(e + 12, 4, 0);
        }
    }

    #[test]
    fn identity_and_capabilities() {
        let mut drv = driver(false);
        assert_eq!(drv.cfg32(0), 0x1044_1af4);
        assert_eq!(drv.cfg32(0x08), 0xff00_0001);
        assert_eq!(drv.cfg32(0x2c), 0x0040_1af4);
        assert_eq!(drv.cfg8(0x3d), 1, "INTA#");
        let bar = drv.d.bars();
        assert_eq!(bar.len(), 1);
        assert_eq!(
            (bar[0].kind, bar[0].addr, bar[0].size),
            (BarKind::Mem64, BAR_BASE, 0x8000)
        );
        assert_eq!(drv.cfg32(0x10), BAR_BASE as u32 | 0x4);
        // BAR sizing through the transport.
        drv.d.config_write(0x10, &[0xff; 4]);
        assert_eq!(drv.cfg32(0x10), 0xffff_8004);
        drv.d.config_write(0x10, &(BAR_BASE as u32).to_le_bytes());
        assert_eq!(drv.d.bars()[0].addr, BAR_BASE);

        let caps = drv.caps();
        assert_eq!(caps.common, Some((0, 0, 0x38)));
        assert_eq!(caps.notify, Some((0, 0x3000, 8, 4)));
        assert_eq!(caps.isr, Some((0, 0x1000, 1)));
        assert_eq!(caps.device, Some((0, 0x2000, 0x1000)));
        assert!(caps.pci_cfg.is_some());
        let msix = caps.msix.unwrap();
        // 3 vectors (2 queues + config); table in BAR 0 at 0x4000, PBA at 0x5000.
        assert_eq!(drv.cfg16(msix + 2), 2);
        assert_eq!(drv.cfg32(msix + 4), 0x4000);
        assert_eq!(drv.cfg32(msix + 8), 0x5000);
        assert_eq!(drv.d.device_type(), 4);

        // Other device types get their own IDs and classes.
        for (ty, class) in [(1u32, 0x02_00_00u32), (2, 0x01_00_00), (3, 0x07_80_00)] {
            assert_eq!(class_code(ty), class);
        }
    }

    #[test]
    fn full_initialisation() {
        let mut drv = driver(false);
        let msix = drv.caps().msix.unwrap();
        // MSI-X first (Linux enables it before touching the device), all vectors unmasked.
        drv.enable_msix(msix);
        for v in 0..3 {
            drv.program_vector(v);
        }
        let routes = drv.msi.take();
        assert_eq!(routes.len(), 3);
        assert_eq!(
            routes[1],
            (
                1,
                Some(Some(MsiMessage {
                    addr: 0xfee0_0000,
                    data: 0x41
                }))
            )
        );

        drv.set_status(0);
        drv.set_status(ACKNOWLEDGE);
        drv.set_status(ACKNOWLEDGE | DRIVER);
        // Device features, both halves, without RING_PACKED.
        drv.wr(DEVICE_FEATURE_SELECT, 4, 0);
        let lo = drv.rd(DEVICE_FEATURE, 4);
        drv.wr(DEVICE_FEATURE_SELECT, 4, 1);
        let hi = drv.rd(DEVICE_FEATURE, 4);
        assert_eq!(lo | hi << 32, VERSION_1 | EVENT_IDX | 1 << 3);
        drv.wr(DEVICE_FEATURE_SELECT, 4, 2);
        assert_eq!(drv.rd(DEVICE_FEATURE, 4), 0);
        assert_eq!(drv.rd(NUM_QUEUES, 2), 2);

        assert!(drv.negotiate(VERSION_1 | EVENT_IDX));
        assert_eq!(lock(&drv.rec).acked, Some(VERSION_1 | EVENT_IDX));
        // Features can no longer change.
        drv.wr(DRIVER_FEATURE_SELECT, 4, 0);
        drv.wr(DRIVER_FEATURE, 4, 0);
        assert_eq!(drv.rd(DRIVER_FEATURE, 4), EVENT_IDX);

        let mem = drv.mem.clone();
        let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let q1 = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 8);
        // Queue limits as the driver reads them.
        drv.wr(QUEUE_SELECT, 2, 0);
        assert_eq!(drv.rd(QUEUE_SIZE, 2), 16);
        assert_eq!(drv.rd(QUEUE_NOTIFY_OFF, 2), 0);
        drv.wr(QUEUE_SELECT, 2, 1);
        assert_eq!(drv.rd(QUEUE_SIZE, 2), 8);
        assert_eq!(drv.rd(QUEUE_NOTIFY_OFF, 2), 1);
        assert_eq!(drv.rd(QUEUE_MSIX_VECTOR, 2), 0xffff);

        drv.setup_queue(0, &q0, 16);
        drv.wr(QUEUE_MSIX_VECTOR, 2, 1);
        assert_eq!(drv.rd(QUEUE_MSIX_VECTOR, 2), 1);
        assert_eq!(drv.rd(QUEUE_ENABLE, 2), 1);
        assert_eq!(drv.rd(QUEUE_DRIVER_LO, 4), q0.avail_addr().0);
        drv.setup_queue(1, &q1, 4);
        drv.wr(QUEUE_MSIX_VECTOR, 2, 2);
        drv.wr(CONFIG_MSIX_VECTOR, 2, 0);
        assert_eq!(drv.rd(CONFIG_MSIX_VECTOR, 2), 0);
        // A vector past the table does not map.
        drv.wr(CONFIG_MSIX_VECTOR, 2, 3);
        assert_eq!(drv.rd(CONFIG_MSIX_VECTOR, 2), 0xffff);
        drv.wr(CONFIG_MSIX_VECTOR, 2, 0);

        drv.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(drv.status(), 0xf);
        {
            let r = lock(&drv.rec);
            assert_eq!(
                r.queues,
                vec![
                    (
                        true,
                        16,
                        q0.desc_table_addr().0,
                        q0.avail_addr().0,
                        q0.used_addr().0,
                        true
                    ),
                    (
                        true,
                        4,
                        q1.desc_table_addr().0,
                        q1.avail_addr().0,
                        q1.used_addr().0,
                        true
                    ),
                ]
            );
        }
        // Queue setup is frozen after DRIVER_OK.
        drv.wr(QUEUE_SELECT, 2, 0);
        drv.wr(QUEUE_SIZE, 2, 2);
        assert_eq!(drv.rd(QUEUE_SIZE, 2), 16);

        // Notifications: the VMM's ioeventfd addresses, and writes reaching the transport.
        let notifies = drv.d.queue_notify_events().unwrap();
        assert_eq!(
            notifies
                .iter()
                .map(|n| (n.queue, n.addr))
                .collect::<Vec<_>>(),
            vec![(0, BAR_BASE + 0x3000), (1, BAR_BASE + 0x3004)]
        );
        drv.wr(NOTIFY_OFFSET + 4, 2, 1);
        assert_eq!(lock(&drv.rec).events[1].read().unwrap(), 1);
        notifies[0].event.write(1).unwrap();
        assert_eq!(lock(&drv.rec).events[0].read().unwrap(), 1);
        // Misaligned or out-of-range notifications are dropped.
        drv.wr(NOTIFY_OFFSET + 2, 2, 0);
        drv.wr(NOTIFY_OFFSET + 8, 2, 2);
        assert!(lock(&drv.rec).events[0].read().is_err());

        // Interrupts go to the mapped vectors.
        let irq = lock(&drv.rec).interrupt.clone().unwrap();
        irq.trigger(InterruptKind::Queue(0)).unwrap();
        irq.trigger(InterruptKind::Queue(1)).unwrap();
        assert!(irq.trigger(InterruptKind::Queue(2)).is_err());
        irq.trigger(InterruptKind::Config).unwrap();
        assert_eq!(drv.msi.take(), vec![(1, None), (2, None), (0, None)]);
        // With MSI-X, only the config bit shows in the ISR; reading clears it.
        assert_eq!(drv.rd(CONFIG_GENERATION, 1), 1);
        assert_eq!(drv.rd(ISR_OFFSET, 1), u64::from(ISR_CONFIG));
        assert_eq!(drv.rd(ISR_OFFSET, 1), 0);
        // A masked vector pends and fires on unmask.
        drv.wr(MSIX_TABLE_OFFSET + 16 + 12, 4, 1);
        assert_eq!(drv.msi.take(), vec![(1, Some(None))]);
        irq.trigger(InterruptKind::Queue(0)).unwrap();
        assert_eq!(drv.rd(drv.d.msix_pba_offset, 8), 0b10);
        drv.wr(MSIX_TABLE_OFFSET + 16 + 12, 4, 0);
        let msg = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x41,
        };
        assert_eq!(drv.msi.take(), vec![(1, Some(Some(msg))), (1, None)]);
        assert_eq!(drv.rd(drv.d.msix_pba_offset, 8), 0);
        // Function mask works the same; MSI-X off leaves only the ISR bit.
        drv.d.config_write(
            msix + 3,
            &[((MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK) >> 8) as u8],
        );
        drv.msi.take();
        irq.trigger(InterruptKind::Queue(1)).unwrap();
        assert_eq!(drv.rd(drv.d.msix_pba_offset, 8), 0b100);
        drv.d.config_write(msix + 2, &0u16.to_le_bytes());
        drv.msi.take();
        irq.trigger(InterruptKind::Queue(1)).unwrap();
        assert!(drv.msi.take().is_empty());
        assert_eq!(drv.rd(ISR_OFFSET, 1), u64::from(ISR_QUEUE));

        // Device configuration passes through at any width.
        assert_eq!(drv.rd(DEVICE_CFG_OFFSET + 2, 2), 0x1312);
        drv.wr(DEVICE_CFG_OFFSET + 5, 1, 9);
        assert_eq!(lock(&drv.rec).config_writes, vec![(5, vec![9])]);

        // Reset stops the device and clears the transport.
        drv.set_status(0);
        assert_eq!(drv.status(), 0);
        assert_eq!(
            lock(&drv.rec).resets,
            3,
            "two resets during bring-up, then this one"
        );
        assert!(lock(&drv.rec).queues.is_empty());
        drv.wr(QUEUE_SELECT, 2, 0);
        assert_eq!(drv.rd(QUEUE_ENABLE, 2), 0);
        assert_eq!(drv.rd(QUEUE_MSIX_VECTOR, 2), 0xffff);
        // And it can be brought up again.
        assert!(drv.negotiate(VERSION_1));
        drv.setup_queue(0, &q0, 16);
        drv.setup_queue(1, &q1, 8);
        drv.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(drv.status(), 0xf);
        assert!(!lock(&drv.rec).queues[0].5, "no EVENT_IDX this time");
    }

    #[test]
    fn feature_negotiation_refusals() {
        let mut drv = driver(false);
        // Missing VERSION_1, a feature not offered, one the transport hides, one above 63.
        assert!(!drv.negotiate(1 << 3));
        assert!(!drv.negotiate(VERSION_1 | 1 << 4));
        assert!(!drv.negotiate(VERSION_1 | 1 << VIRTIO_F_RING_PACKED));
        drv.set_status(0);
        drv.set_status(ACKNOWLEDGE | DRIVER);
        drv.wr(DRIVER_FEATURE_SELECT, 4, 1);
        drv.wr(DRIVER_FEATURE, 4, 1);
        drv.wr(DRIVER_FEATURE_SELECT, 4, 2);
        drv.wr(DRIVER_FEATURE, 4, 1);
        drv.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(drv.status() & FEATURES_OK as u8, 0);
        assert!(lock(&drv.rec).acked.is_none());
        assert!(drv.negotiate(VERSION_1 | 1 << 3));
    }

    #[test]
    fn hostile_status_and_queues() {
        let mem = mem();
        let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let q1 = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 8);
        type Setup = fn(&mut Driver, &MockSplitQueue<'_, GuestMemoryMmap>);
        let cases: [(&str, Setup); 6] = [
            ("size not a power of two", |d, q| d.setup_queue(0, q, 7)),
            ("size above max", |d, q| d.setup_queue(0, q, 32)),
            ("size zero", |d, q| d.setup_queue(0, q, 0)),
            ("not enabled", |d, q| {
                d.setup_queue(0, q, 16);
                d.wr(QUEUE_SELECT, 2, 1);
                // A second enable of 0 cannot disable; queue 1 is just never enabled here.
                d.wr(QUEUE_ENABLE, 2, 0);
            }),
            ("rings outside memory", |d, q| {
                d.program_queue(0, q, 16);
                d.wr(QUEUE_DEVICE_HI, 4, 1);
                d.wr(QUEUE_ENABLE, 2, 1);
            }),
            ("misaligned ring", |d, q| {
                d.program_queue(0, q, 16);
                d.wr(QUEUE_DESC_LO, 4, q.desc_table_addr().0 + 1);
                d.wr(QUEUE_ENABLE, 2, 1);
                // Writes after the enable are ignored: the queue stays misaligned.
                d.wr(QUEUE_DESC_LO, 4, q.desc_table_addr().0);
            }),
        ];
        for (what, setup) in cases {
            let mut drv = driver(false);
            assert!(drv.negotiate(VERSION_1));
            setup(&mut drv, &q0);
            if what != "not enabled" {
                drv.setup_queue(1, &q1, 8);
            }
            drv.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
            let s = drv.status();
            assert_ne!(s & NEEDS_RESET as u8, 0, "{what}: status {s:#x}");
            // DRIVER_OK stays set: the driver wrote it (see `VirtioCore::set_status`).
            assert_ne!(s & DRIVER_OK as u8, 0, "{what}");
            assert!(lock(&drv.rec).queues.is_empty(), "{what}");
            // Only a reset clears it.
            drv.set_status(ACKNOWLEDGE);
            assert_ne!(drv.status() & NEEDS_RESET as u8, 0);
            drv.set_status(0);
            assert_eq!(drv.status(), 0);
        }

        // DRIVER_OK before FEATURES_OK.
        let mut drv = driver(false);
        let msix = drv.caps().msix.unwrap();
        drv.enable_msix(msix);
        drv.program_vector(0);
        drv.wr(CONFIG_MSIX_VECTOR, 2, 0);
        drv.msi.take();
        drv.set_status(ACKNOWLEDGE);
        drv.set_status(ACKNOWLEDGE | DRIVER);
        drv.set_status(ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert_ne!(drv.status() & NEEDS_RESET as u8, 0);
        assert!(lock(&drv.rec).interrupt.is_none());
        // DRIVER_OK never became set, so there is no configuration change notification: the
        // driver finds DEVICE_NEEDS_RESET when it reads the status back.
        assert!(drv.msi.take().is_empty());

        // Skipping a step, clearing a bit, unknown bits.
        for seq in [
            &[DRIVER][..],
            &[ACKNOWLEDGE, ACKNOWLEDGE | FEATURES_OK],
            &[ACKNOWLEDGE, ACKNOWLEDGE | DRIVER, ACKNOWLEDGE],
            &[ACKNOWLEDGE | 0x10],
        ] {
            let mut drv = driver(false);
            for &s in seq {
                drv.set_status(s);
            }
            assert_ne!(drv.status() & NEEDS_RESET as u8, 0, "{seq:?}");
        }

        // FAILED is always accepted.
        let mut drv = driver(false);
        drv.set_status(ACKNOWLEDGE);
        drv.set_status(FAILED);
        assert_eq!(drv.status(), (ACKNOWLEDGE | FAILED) as u8);

        // A device that refuses to activate.
        let mut drv = driver(true);
        assert!(drv.negotiate(VERSION_1));
        drv.setup_queue(0, &q0, 16);
        drv.setup_queue(1, &q1, 8);
        drv.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_ne!(drv.status() & NEEDS_RESET as u8, 0);
    }

    /// A device that fails to activate at DRIVER_OK: the status reads back what the driver
    /// wrote plus DEVICE_NEEDS_RESET, and the driver gets a configuration change notification
    /// (virtio 1.2, 2.1.2), as on virtio-mmio.
    #[test]
    fn failed_activation_needs_reset_and_notifies() {
        use crate::transport::PauseDevice;
        let mem = mem();
        let q0 = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let q1 = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 8);
        let mut drv = driver(true);
        let msix = drv.caps().msix.unwrap();
        drv.enable_msix(msix);
        drv.program_vector(0);
        assert!(drv.negotiate(VERSION_1));
        drv.setup_queue(0, &q0, 16);
        drv.setup_queue(1, &q1, 8);
        drv.wr(CONFIG_MSIX_VECTOR, 2, 0);
        drv.msi.take();
        let gen = drv.rd(CONFIG_GENERATION, 1);
        let started = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        drv.set_status(started);
        assert_eq!(u32::from(drv.status()), started | NEEDS_RESET);
        assert!(lock(&drv.rec).queues.is_empty());
        // The configuration change: its vector fired, the ISR and generation show it.
        assert_eq!(drv.msi.take(), vec![(0, None)]);
        assert_eq!(drv.rd(CONFIG_GENERATION, 1), gen + 1);
        assert_eq!(drv.rd(ISR_OFFSET, 1), u64::from(ISR_CONFIG));
        // Nothing but a reset helps; a repeated write is ignored and raises nothing.
        drv.set_status(started);
        assert!(drv.msi.take().is_empty());
        drv.wr(QUEUE_SELECT, 2, 0);
        assert_eq!(drv.rd(QUEUE_ENABLE, 2), 1);
        // Not a running device for a snapshot.
        assert!(drv.d.save_state().used_rings().is_empty());
        drv.set_status(0);
        assert_eq!(drv.status(), 0);
    }

    /// A virtio-pci device's state as the tern before the shared transport core wrote it
    /// (snapshot format 2): MSI-X on with vectors 0 (config), 1 and 2 (queues), vector 1
    /// masked and pending, queue 0 stopped at 7, a configuration interrupt in the ISR, queue
    /// 1 selected.
    const SAVED_BY_FORMAT_2: &str = r#"{"device_type":4,"status":15,"needs_reset":false,"driver_features":4831838208,"driver_features_unknown":false,"queue_select":1,"device_features_select":0,"driver_features_select":1,"queues":[{"size":16,"ready":true,"desc":65536,"driver":65792,"device":65812,"next":7},{"size":8,"ready":true,"desc":131072,"driver":131200,"device":131212,"next":0}],"interrupt_status":2,"config_generation":1,"pci":{"config":[244,26,68,16,0,0,16,0,1,0,0,255,0,0,0,0,4,0,0,192,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,244,26,64,0,0,0,0,0,64,0,0,0,0,0,0,0,0,1,0,0,9,80,16,1,0,0,0,0,0,0,0,0,56,0,0,0,9,100,20,2,0,0,0,0,0,48,0,0,8,0,0,0,4,0,0,0,9,116,16,3,0,0,0,0,0,16,0,0,1,0,0,0,9,132,16,4,0,0,0,0,0,32,0,0,0,16,0,0,9,152,20,5,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,17,0,2,128,0,64,0,0,0,80,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"msix_table":[0,0,224,254,0,0,0,0,64,0,0,0,0,0,0,0,0,0,224,254,0,0,0,0,65,0,0,0,1,0,0,0,0,0,224,254,0,0,0,0,66,0,0,0,0,0,0,0],"msix_pending":[2],"config_vector":0,"queue_vectors":[1,2]}}"#;

    /// A snapshot written before the transports shared their core still restores, and saves
    /// back unchanged.
    #[test]
    fn restores_format_2_state() {
        use crate::transport::PauseDevice;
        use vm_memory::Bytes;
        let s: TransportState = serde_json::from_str(SAVED_BY_FORMAT_2).unwrap();
        let mut drv = driver(false);
        // Guest memory holds the snapshot's contents: where queue 0's used ring stopped.
        let (used0, used1) = (0x1_0114u64, 0x2_008cu64);
        drv.mem.write_obj(7u16, GuestAddress(used0 + 2)).unwrap();
        drv.d.restore_state(&s).unwrap();
        assert_eq!(drv.status(), 0xf);
        assert_eq!(drv.rd(QUEUE_SELECT, 2), 1);
        assert_eq!(drv.rd(QUEUE_MSIX_VECTOR, 2), 2);
        assert_eq!(drv.rd(CONFIG_MSIX_VECTOR, 2), 0);
        assert_eq!(drv.rd(CONFIG_GENERATION, 1), 1);
        assert_eq!(drv.rd(drv.d.msix_pba_offset, 8), 0b10);
        {
            let r = lock(&drv.rec);
            assert_eq!(r.acked, Some(VERSION_1 | EVENT_IDX));
            assert_eq!(
                r.queues
                    .iter()
                    .map(|q| (q.0, q.1, q.4, q.5))
                    .collect::<Vec<_>>(),
                vec![(true, 16, used0, true), (true, 8, used1, true)]
            );
        }
        assert_eq!(
            serde_json::to_string(&drv.d.save_state()).unwrap(),
            SAVED_BY_FORMAT_2
        );
        // The ISR still holds the configuration change (read-to-clear).
        assert_eq!(drv.rd(ISR_OFFSET, 1), u64::from(ISR_CONFIG));
        // The masked vector fires once unmasked.
        drv.msi.take();
        drv.wr(MSIX_TABLE_OFFSET + 16 + 12, 4, 0);
        assert_eq!(drv.msi.take().last(), Some(&(1, None)));
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let mut drv = driver(false);
        // Out-of-range queue select: reads zero / NO_VECTOR, writes ignored.
        drv.wr(QUEUE_SELECT, 2, 0xffff);
        assert_eq!(drv.rd(QUEUE_SIZE, 2), 0);
        assert_eq!(drv.rd(QUEUE_MSIX_VECTOR, 2), 0xffff);
        assert_eq!(drv.rd(QUEUE_NOTIFY_OFF, 2), 0);
        for f in [QUEUE_SIZE, QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_DESC_LO] {
            drv.wr(f, 2, 1);
        }
        // Partial and odd-width common accesses merge with the field.
        drv.wr(QUEUE_SELECT, 2, 0);
        drv.wr(QUEUE_SIZE + 1, 1, 0);
        assert_eq!(drv.rd(QUEUE_SIZE, 2), 16);
        drv.wr(QUEUE_SIZE, 1, 4);
        assert_eq!(drv.rd(QUEUE_SIZE, 2), 4);
        assert_eq!(drv.rd(NUM_QUEUES - 1, 4) >> 8, 2);
        drv.wr(NUM_QUEUES, 2, 9);
        assert_eq!(drv.rd(NUM_QUEUES, 2), 2);
        // Offsets everywhere in and past the BAR, every width, other BARs.
        let offsets = [
            0,
            COMMON_CFG_LEN - 1,
            COMMON_CFG_LEN,
            ISR_OFFSET - 1,
            ISR_OFFSET,
            DEVICE_CFG_OFFSET + DEVICE_CFG_LEN - 2,
            NOTIFY_OFFSET + 7,
            MSIX_TABLE_OFFSET + 47,
            0x4fff,
            0x5007,
            0x7fff,
            0x8000,
            u64::MAX - 3,
            u64::MAX,
        ];
        for &o in &offsets {
            for len in [1usize, 2, 3, 4, 8] {
                let mut b = vec![0xaau8; len];
                drv.d.bar_read(0, o, &mut b);
                drv.d.bar_read(3, o, &mut b);
                assert_eq!(b, vec![0; len]);
                drv.d.bar_write(0, o, &b);
                drv.d.bar_write(5, o, &[0xff; 8]);
            }
        }
        // An access straddling two regions hits neither.
        let mut b = [0xaau8; 8];
        drv.d.bar_read(0, COMMON_CFG_LEN - 4, &mut b);
        assert_eq!(b, [0; 8]);
        // Config space: the whole 4 KiB and past it.
        for reg in (0..0x1010u16).step_by(3) {
            let mut b = [0u8; 2];
            drv.d.config_read(reg, &mut b);
            drv.d.config_write(reg, &[0xff, 0xff]);
        }
    }

    #[test]
    fn pci_cfg_access_window() {
        let mut drv = driver(false);
        let cap = drv.caps().pci_cfg.unwrap();
        // Read num_queues (2 bytes at common offset 0x12) through the window.
        drv.d.config_write(cap + 4, &[0]);
        drv.d.config_write(cap + 8, &0x12u32.to_le_bytes());
        drv.d.config_write(cap + 12, &2u32.to_le_bytes());
        assert_eq!(drv.cfg32(cap + 16), 2);
        // Write device_status = ACKNOWLEDGE through it.
        drv.d.config_write(cap + 8, &0x14u32.to_le_bytes());
        drv.d.config_write(cap + 12, &1u32.to_le_bytes());
        drv.d.config_write(cap + 16, &[ACKNOWLEDGE as u8]);
        assert_eq!(drv.status(), ACKNOWLEDGE as u8);
        assert_eq!(drv.cfg8(cap + 16), ACKNOWLEDGE as u8);
        // Bad length, misaligned offset, or another BAR: nothing happens.
        drv.d.config_write(cap + 12, &3u32.to_le_bytes());
        assert_eq!(drv.cfg32(cap + 16), 0);
        drv.d.config_write(cap + 12, &2u32.to_le_bytes());
        drv.d.config_write(cap + 8, &0x13u32.to_le_bytes());
        assert_eq!(drv.cfg32(cap + 16), 0);
        drv.d.config_write(cap + 4, &[2]);
        drv.d.config_write(cap + 8, &0x12u32.to_le_bytes());
        assert_eq!(drv.cfg32(cap + 16), 0);
        drv.d.config_write(cap + 16, &[0; 4]);
        assert_eq!(drv.status(), ACKNOWLEDGE as u8);
    }

    #[derive(Default)]
    struct CountingLine(std::sync::atomic::AtomicU32);
    impl IntxLine for CountingLine {
        fn assert(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn intx_without_msix() {
        let mut drv = driver(false);
        let line = Arc::new(CountingLine::default());
        drv.d.set_intx(line.clone());
        let pending = drv.d.intx_pending();
        assert!(!pending());
        // MSI-X is off (the driver never enabled it): a queue interrupt sets the ISR and raises
        // the line; it stays pending until the driver reads the ISR.
        drv.d.interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        assert_eq!(line.0.load(Ordering::SeqCst), 1);
        assert!(pending());
        let mut isr = [0u8];
        drv.d.bar_read(0, ISR_OFFSET, &mut isr);
        assert_eq!(isr[0], ISR_QUEUE);
        assert!(!pending());
        drv.d.interrupt.trigger(InterruptKind::Config).unwrap();
        assert_eq!(line.0.load(Ordering::SeqCst), 2);
        drv.d.bar_read(0, ISR_OFFSET, &mut isr);
        assert_eq!(isr[0], ISR_CONFIG);
    }

    #[test]
    fn through_pci_root() {
        let rec = Arc::new(Mutex::new(Record::default()));
        let msi = Arc::new(Msi::default());
        let dev = TestDevice {
            rec: rec.clone(),
            fail_activate: false,
        };
        let vpci = Arc::new(Mutex::new(
            VirtioPciDevice::new(VmMemory::new(mem()), Box::new(dev), msi).unwrap(),
        ));
        let mut root = PciRoot::new(&PciWindows {
            mmio32: 0xc000_0000..0xe000_0000,
            mmio64: None,
            io: None,
        })
        .unwrap();
        let bdf = root.attach(vpci.clone()).unwrap();
        assert_eq!(bdf, PciBdf::new(0, 1, 0));
        let bars = root.bar_bus_devices(bdf);
        assert_eq!(bars.len(), 1);
        assert_eq!((bars[0].0.addr, bars[0].0.size), (0xc000_0000, 0x8000));
        let notifies = lock(&vpci).queue_notify_events().unwrap();
        assert_eq!(notifies[1].addr, 0xc000_3004);
        let root = Arc::new(Mutex::new(root));
        let mut ecam = PciConfigMmio::new(root.clone());
        let mut id = [0u8; 4];
        ecam.read(1 << 15, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
        // The BAR bus device reaches the common configuration.
        let mut nq = [0u8; 2];
        bars[0].1.lock().unwrap().read(NUM_QUEUES, &mut nq);
        assert_eq!(u16::from_le_bytes(nq), 2);
        // The guest moves the BAR: reported, and the notify addresses follow.
        ecam.write((1 << 15) | 0x10, &0xd000_0000u32.to_le_bytes());
        let moves = lock(&root).take_bar_relocations();
        assert_eq!(moves.len(), 1);
        assert_eq!(
            (moves[0].bdf, moves[0].old_addr, moves[0].new_addr),
            (bdf, 0xc000_0000, 0xd000_0000)
        );
        let notifies = lock(&vpci).queue_notify_events().unwrap();
        assert_eq!(notifies[0].addr, 0xd000_3000);
    }
}
