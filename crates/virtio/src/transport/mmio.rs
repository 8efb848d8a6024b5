//! virtio-mmio, version 2 ("modern" register layout, virtio 1.x spec section 4.2), as a
//! [`BusDevice`] over a [`MMIO_LEN`]-byte window.
//!
//! Written in-tree: no maintained crate provides a virtio-mmio transport for our device trait,
//! and the register layout is small. Registers are 32-bit; any other access width or an
//! unaligned access is ignored (reads as 0). Device configuration at [`CONFIG_OFFSET`] takes
//! any width.
//!
//! Queue notifications: the transport owns one eventfd per queue. The VMM registers each as a
//! KVM ioeventfd on `base + QUEUE_NOTIFY_OFFSET` with the queue index as datamatch (see
//! [`MmioTransport::queue_notify_eventfds`]) so a notification never exits to userspace; a
//! notification that does reach [`BusDevice::write`] signals the same eventfd.
//!
//! Everything the driver writes is hostile, and judged by the shared `VirtioCore`: an
//! invalid status transition, DRIVER_OK with queues that are not ready, have a bad size or lie
//! outside guest memory, or a device that fails to activate sets DEVICE_NEEDS_RESET (with a
//! configuration change notification if DRIVER_OK is set); only a reset (writing 0 to Status)
//! clears it. Every queue the device has must be configured and ready at DRIVER_OK.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use devices::BusDevice;
use virtio_bindings::bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::EventFd;

use super::core::{InterruptState, TransportInterrupt, VirtioCore};
use super::state::TransportState;
use crate::{Interrupt, InterruptKind, VirtioDevice, VmMemory};

/// Size of the register window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of QueueNotify, where the VMM registers the queue ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device-specific configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;
/// The VendorID tern reports: "TERN" in ASCII. Drivers do not interpret it.
pub const VENDOR_ID: u32 = 0x5445_524e;

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;

// Register offsets (virtio 1.x, 4.2.2).
const MAGIC_VALUE: u64 = 0x000;
const VERSION_REG: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID_REG: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_BASE_HIGH: u64 = 0x0bc;
const CONFIG_GENERATION: u64 = 0x0fc;

/// InterruptStatus and ConfigGeneration (in the core's [`InterruptState`]) and the irq line,
/// shared with the device's worker.
struct MmioInterrupt {
    state: InterruptState,
    irq: EventFd,
}

impl Interrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        match kind {
            InterruptKind::Queue(_) => {
                self.state
                    .status
                    .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
            }
            InterruptKind::Config => self.state.config_changed(VIRTIO_MMIO_INT_CONFIG),
        }
        self.irq.write(1)
    }
}

impl TransportInterrupt for MmioInterrupt {
    fn state(&self) -> &InterruptState {
        &self.state
    }
}

/// A virtio device behind a virtio-mmio register window: the register layout over the
/// `VirtioCore`, which takes every state-machine decision.
pub struct MmioTransport {
    core: VirtioCore<MmioInterrupt>,
}

impl super::PauseDevice for MmioTransport {
    fn pause_device(&mut self, deadline: std::time::Instant) -> bool {
        self.core.device_mut().pause(deadline)
    }

    fn resume_device(&mut self) {
        self.core.device_mut().resume();
    }

    fn save_state(&self) -> TransportState {
        self.core.save()
    }

    fn restore_state(&mut self, s: &TransportState) -> Result<(), String> {
        self.core.check_state(s)?;
        if s.pci.is_some() {
            return Err(
                "the snapshot has a virtio-pci device where a virtio-mmio one is configured".into(),
            );
        }
        self.core.restore_registers(s)?;
        self.core.restart()
    }

    fn device(&self) -> &dyn VirtioDevice {
        self.core.device()
    }

    fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.core.device_mut()
    }
}

super::transport_component!(MmioTransport);

impl MmioTransport {
    /// Wraps `device`, signalling the guest through `irq` (an irqfd).
    pub fn new(
        mem: VmMemory,
        device: Box<dyn VirtioDevice>,
        irq: EventFd,
    ) -> std::io::Result<Self> {
        let interrupt = Arc::new(MmioInterrupt {
            state: InterruptState::default(),
            irq,
        });
        Ok(MmioTransport {
            core: VirtioCore::new("virtio-mmio", mem, device, interrupt, 0)?,
        })
    }

    /// The queue notification eventfds to register as KVM ioeventfds: (offset from the window
    /// base, datamatch = queue index, eventfd), each an MMIO ioeventfd of length 4 matching the
    /// 32-bit value written. They stay the same for the transport's life, across resets.
    pub fn queue_notify_eventfds(&self) -> Vec<(u64, u32, &EventFd)> {
        (0u32..)
            .zip(self.core.notify_events())
            .map(|(i, e)| (QUEUE_NOTIFY_OFFSET, i, e))
            .collect()
    }

    /// The virtio device type, e.g. for naming the device.
    pub fn device_type(&self) -> u32 {
        self.core.device().device_type()
    }

    /// The Status register as the driver reads it.
    pub fn status(&self) -> u32 {
        self.core.status()
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let core = &self.core;
        let irq = core.interrupt().state();
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION_REG => VERSION,
            DEVICE_ID => core.device().device_type(),
            VENDOR_ID_REG => VENDOR_ID,
            DEVICE_FEATURES => core.device_features_word(),
            QUEUE_NUM_MAX => core.queue_max().into(),
            QUEUE_READY => core.selected_queue().map_or(0, |q| q.ready.into()),
            INTERRUPT_STATUS => irq.status.load(Ordering::SeqCst),
            STATUS => core.status(),
            // No shared memory regions: their length reads as -1.
            SHM_LEN_LOW..=SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => irq.generation.load(Ordering::SeqCst),
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, val: u32) {
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(val);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(val) << 32);
        let core = &mut self.core;
        match offset {
            DEVICE_FEATURES_SEL => core.set_device_features_select(val),
            DRIVER_FEATURES => core.write_driver_features(val),
            DRIVER_FEATURES_SEL => core.set_driver_features_select(val),
            QUEUE_SEL => core.set_queue_select(val),
            QUEUE_NUM => {
                if let Some(q) = core.selected_queue_mut() {
                    q.size = val;
                }
            }
            QUEUE_READY => {
                if let Some(q) = core.selected_queue_mut() {
                    q.ready = val == 1;
                }
            }
            QUEUE_NOTIFY_OFFSET => core.notify(val.into()),
            INTERRUPT_ACK => {
                let irq = core.interrupt().state();
                irq.status.fetch_and(!val, Ordering::SeqCst);
            }
            // Status is 8 bits wide in a 32-bit register.
            STATUS => core.set_status(val & 0xff),
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => {
                let Some(q) = core.selected_queue_mut() else {
                    return;
                };
                let reg = match offset & !0xf {
                    QUEUE_DESC_LOW => &mut q.desc,
                    QUEUE_DRIVER_LOW => &mut q.driver,
                    _ => &mut q.device,
                };
                *reg = if offset & 0x4 == 0 {
                    lo(*reg)
                } else {
                    hi(*reg)
                };
            }
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            return self.core.device().read_config(offset - CONFIG_OFFSET, data);
        }
        match data.len() {
            4 if offset & 3 == 0 => data.copy_from_slice(&self.read_reg(offset).to_le_bytes()),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            return self
                .core
                .device_mut()
                .write_config(offset - CONFIG_OFFSET, data);
        }
        if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset & 3) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

/// Where a virtio-mmio device sits, and how the DSDT describes it: `\_SB_.Vnnn`
/// (`LNRO0005`) with its register window and its interrupt (edge-triggered, active high).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Its index among the VM's virtio-mmio devices (the `nnn` of its name, and its `_UID`).
    pub index: u32,
    /// Register window base.
    pub base: u64,
    /// Register window size.
    pub size: u64,
    /// Its interrupt.
    pub gsi: u32,
}

impl acpi_tables::Aml for MmioSlot {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        use acpi_tables::aml;
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &self.index);
        let mem = aml::Memory32Fixed::new(true, self.base as u32, self.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, self.gsi);
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&mem, &irq]));
        let name = format!("_SB_.V{:03X}", self.index);
        aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use virtio_queue::QueueT;

    use super::*;
    use crate::QueueEvent;

    use crate::testing::*;
    use crate::ActivateError;

    #[derive(Default)]
    struct Record {
        acked: Option<u64>,
        /// (size, desc, avail, used) of each activated queue.
        queues: Vec<(u16, u64, u64, u64)>,
        resets: usize,
        interrupt: Option<Arc<dyn Interrupt>>,
        events: Vec<EventFd>,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    /// A device that records what the transport does to it.
    struct Fake {
        rec: Arc<Mutex<Record>>,
        fail_activate: bool,
    }

    const FAKE_FEATURES: u64 = VERSION_1 | 1 << 5;

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 32]
        }
        fn features(&self) -> u64 {
            FAKE_FEATURES
        }
        fn ack_features(&mut self, features: u64) {
            self.rec.lock().unwrap().acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = 0x10 + offset as u8 + i as u8;
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let mut r = self.rec.lock().unwrap();
            r.config_writes.push((offset, data.to_vec()));
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
            let mut r = self.rec.lock().unwrap();
            for q in queues {
                let qq = &q.queue;
                r.queues
                    .push((qq.size(), qq.desc_table(), qq.avail_ring(), qq.used_ring()));
                r.events.push(q.event);
            }
            r.interrupt = Some(interrupt);
            Ok(())
        }
        fn reset(&mut self) {
            let mut r = self.rec.lock().unwrap();
            r.resets += 1;
            r.queues.clear();
            r.events.clear();
            r.interrupt = None;
        }
    }

    fn fake(fail_activate: bool) -> (Driver, Arc<Mutex<Record>>) {
        let rec = Arc::new(Mutex::new(Record::default()));
        let dev = Fake {
            rec: rec.clone(),
            fail_activate,
        };
        (Driver::new(Box::new(dev)), rec)
    }

    fn queues() -> (VirtQueue, VirtQueue) {
        (VirtQueue::new(0x1000), VirtQueue::new(0x2000))
    }

    #[test]
    fn identification_registers() {
        let (mut d, _) = fake(false);
        assert_eq!(d.read(0x0), 0x7472_6976);
        assert_eq!(d.read(0x4), 2);
        assert_eq!(d.read(0x8), 42);
        assert_eq!(d.read(0xc), VENDOR_ID);
        d.write(0x14, 0);
        assert_eq!(d.read(0x10), FAKE_FEATURES as u32);
        d.write(0x14, 1);
        assert_eq!(d.read(0x10), (FAKE_FEATURES >> 32) as u32);
        d.write(0x14, 7);
        assert_eq!(d.read(0x10), 0);
        for (sel, max) in [(0, 16), (1, 32), (2, 0), (u32::MAX, 0)] {
            d.write(0x30, sel);
            assert_eq!(d.read(0x34), max);
        }
        assert_eq!(d.read(0xb0), u32::MAX);
        assert_eq!(d.read(0xb4), u32::MAX);
        assert_eq!(d.t.device_type(), 42);
    }

    #[test]
    fn odd_accesses_ignored_config_passed_through() {
        let (mut d, rec) = fake(false);
        let mut b = [0xffu8; 2];
        d.t.read(0x0, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        d.t.read(0x2, &mut b);
        assert_eq!(b, [0; 4]);
        let mut b = [0xffu8; 8];
        d.t.read(0x0, &mut b);
        assert_eq!(b, [0; 8]);
        // A 1-byte write of ACKNOWLEDGE to Status is not a register access.
        d.t.write(REG_STATUS, &[1]);
        d.t.write(REG_STATUS + 1, &[1, 0, 0, 0]);
        assert_eq!(d.read(REG_STATUS), 0);

        let mut b = [0u8; 3];
        d.t.read(0x101, &mut b);
        assert_eq!(b, [0x11, 0x12, 0x13]);
        d.t.write(0x102, &[9]);
        assert_eq!(rec.lock().unwrap().config_writes, vec![(2, vec![9])]);
    }

    #[test]
    fn feature_negotiation() {
        let (mut d, rec) = fake(false);
        // Missing VERSION_1.
        assert!(!d.negotiate(1 << 5));
        // A feature the device does not offer.
        assert!(!d.negotiate(VERSION_1 | 1 << 6));
        // A feature bit above 63.
        d.write(REG_STATUS, 0);
        d.add_status(1);
        d.add_status(2);
        d.write(0x24, 2);
        d.write(0x20, 1);
        d.write(0x24, 1);
        d.write(0x20, 1);
        d.add_status(FEATURES_OK);
        assert_eq!(d.read(REG_STATUS) & FEATURES_OK, 0);
        assert_eq!(rec.lock().unwrap().acked, None);
        // A proper subset.
        assert!(d.negotiate(VERSION_1 | 1 << 5));
        assert_eq!(rec.lock().unwrap().acked, Some(VERSION_1 | 1 << 5));
        // Features are frozen after FEATURES_OK.
        d.write(0x24, 0);
        d.write(0x20, 0);
        assert!(d.t.core.driver_features() & (1 << 5) != 0);
    }

    /// A snapshot's accepted features are checked against what the device offers: a value the
    /// transport would have refused from the driver is refused from a snapshot too.
    #[test]
    fn restored_features_must_be_offered() {
        use crate::transport::PauseDevice;
        let (mut d, _) = fake(false);
        assert!(d.negotiate(VERSION_1 | 1 << 5));
        let good = d.t.save_state();
        let (mut fresh, rec) = fake(false);
        fresh.t.restore_state(&good).unwrap();
        assert_eq!(rec.lock().unwrap().acked, Some(VERSION_1 | 1 << 5));
        type Edit = fn(&mut TransportState);
        let cases: [(&str, Edit); 4] = [
            ("bit 6, not offered", |s| s.driver_features |= 1 << 6),
            ("bit 63, not offered", |s| s.driver_features |= 1 << 63),
            ("a bit above 63", |s| s.driver_features_unknown = true),
            ("no VERSION_1", |s| s.driver_features &= !VERSION_1),
        ];
        for (what, edit) in cases {
            let mut bad = good.clone();
            edit(&mut bad);
            let (mut fresh, rec) = fake(false);
            let e = fresh.t.restore_state(&bad).unwrap_err();
            assert!(
                e.starts_with("virtio device type 42: the snapshot's accepted features"),
                "{what}: {e}"
            );
            assert_eq!(rec.lock().unwrap().acked, None, "{what}");
        }
        // Not yet accepted (no FEATURES_OK): the driver's choice is checked when it sets it.
        let mut pending = good.clone();
        pending.status &= !FEATURES_OK;
        pending.driver_features |= 1 << 6;
        let (mut fresh, rec) = fake(false);
        fresh.t.restore_state(&pending).unwrap();
        assert_eq!(rec.lock().unwrap().acked, None);
        fresh.add_status(FEATURES_OK);
        assert_eq!(fresh.read(REG_STATUS) & FEATURES_OK, 0);
    }

    #[test]
    fn driver_ok_without_features_ok_needs_reset() {
        let (mut d, rec) = fake(false);
        assert!(!d.negotiate(1 << 5));
        d.add_status(DRIVER_OK);
        assert_ne!(d.read(REG_STATUS) & NEEDS_RESET, 0);
        assert!(rec.lock().unwrap().interrupt.is_none());
        // Nothing but a reset helps.
        d.add_status(FEATURES_OK);
        assert_eq!(d.read(REG_STATUS) & FEATURES_OK, 0);
        d.write(REG_STATUS, 0);
        assert_eq!(d.read(REG_STATUS), 0);
    }

    #[test]
    fn invalid_status_transitions_need_reset() {
        for status in [2, 8, 1 | 4, 1 | 0x20, 1 | 2 | 4] {
            let (mut d, _) = fake(false);
            d.write(REG_STATUS, status);
            assert_ne!(d.read(REG_STATUS) & NEEDS_RESET, 0, "status {status:#x}");
        }
        // Clearing a bit without a reset.
        let (mut d, _) = fake(false);
        assert!(d.negotiate(VERSION_1));
        d.write(REG_STATUS, 1);
        assert_ne!(d.read(REG_STATUS) & NEEDS_RESET, 0);
        // FAILED is always accepted.
        let (mut d, _) = fake(false);
        d.add_status(1);
        d.add_status(0x80);
        assert_eq!(d.read(REG_STATUS), 0x81);
    }

    #[test]
    fn activation_hands_over_queues_and_interrupts() {
        let (mut d, rec) = fake(false);
        let (q0, q1) = queues();
        let status = d.start(&[&q0, &q1]);
        assert_eq!(status, 1 | 2 | 8 | 4);
        let (interrupt, event) = {
            let mut r = rec.lock().unwrap();
            assert_eq!(
                r.queues,
                vec![
                    (16, q0.desc, q0.avail, q0.used),
                    (16, q1.desc, q1.avail, q1.used)
                ]
            );
            (r.interrupt.clone().unwrap(), r.events.remove(1))
        };

        // Notifications reach the queue's eventfd, which the VMM can also register.
        let fds = d.t.queue_notify_eventfds();
        assert_eq!(fds.len(), 2);
        assert_eq!((fds[1].0, fds[1].1), (0x50, 1));
        d.notify(1);
        assert_eq!(event.read().unwrap(), 1);
        d.notify(7);

        // Queue registers are frozen after DRIVER_OK.
        d.write(0x30, 0);
        d.write(0x44, 0);
        assert_eq!(d.read(0x44), 1);

        interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        assert_eq!(d.read(REG_ISR), 1);
        assert_eq!(d.irq.read().unwrap(), 1);
        let gen = d.read(0xfc);
        interrupt.trigger(InterruptKind::Config).unwrap();
        assert_eq!(d.read(REG_ISR), 3);
        assert_eq!(d.read(0xfc), gen + 1);
        d.write(REG_ACK, 1);
        assert_eq!(d.read(REG_ISR), 2);
        d.write(REG_ACK, 2);
        assert_eq!(d.read(REG_ISR), 0);

        // Reset: the device is reset, the transport forgets everything.
        interrupt.trigger(InterruptKind::Queue(1)).unwrap();
        d.notify(0);
        d.write(REG_STATUS, 0);
        {
            let r = rec.lock().unwrap();
            assert!(r.resets >= 1);
            assert!(r.interrupt.is_none());
        }
        assert_eq!(d.read(REG_STATUS), 0);
        assert_eq!(d.read(REG_ISR), 0);
        d.write(0x30, 0);
        assert_eq!(d.read(0x44), 0);
        assert!(d.t.queue_notify_eventfds()[0].2.read().is_err());
        assert_eq!(d.t.core.driver_features(), 0);
        // And it can be brought up again.
        assert_eq!(d.start(&[&q0, &q1]) & NEEDS_RESET, 0);
    }

    #[test]
    fn bad_queue_configuration_needs_reset() {
        type Tweak = fn(&mut Driver);
        let tweaks: [(&str, Tweak); 6] = [
            ("size not a power of two", |d| d.write(0x38, 12)),
            ("size above max", |d| d.write(0x38, 32)),
            ("size zero", |d| d.write(0x38, 0)),
            ("not ready", |d| d.write(0x44, 0)),
            ("desc outside memory", |d| d.write(0x84, 1)),
            ("used misaligned", |d| d.write(0xa0, 0x1102)),
        ];
        for (what, tweak) in tweaks {
            let (mut d, rec) = fake(false);
            let (q0, q1) = queues();
            assert!(d.negotiate(VERSION_1));
            d.setup_queue(0, &q0);
            d.setup_queue(1, &q1);
            d.write(0x30, 0);
            tweak(&mut d);
            d.add_status(DRIVER_OK);
            assert_ne!(d.read(REG_STATUS) & NEEDS_RESET, 0, "{what}");
            assert!(rec.lock().unwrap().interrupt.is_none(), "{what}");
        }
        // A queue left unconfigured.
        let (mut d, _) = fake(false);
        let (q0, _) = queues();
        assert!(d.negotiate(VERSION_1));
        d.setup_queue(0, &q0);
        d.add_status(DRIVER_OK);
        assert_ne!(d.read(REG_STATUS) & NEEDS_RESET, 0);
        // Rings at the very end of the address space.
        let (mut d, _) = fake(false);
        let (q0, q1) = queues();
        assert!(d.negotiate(VERSION_1));
        d.setup_queue(0, &q0);
        d.setup_queue(1, &q1);
        d.write(0x90, 0xffff_fff0);
        d.write(0x94, 0xffff_ffff);
        d.add_status(DRIVER_OK);
        assert_ne!(d.read(REG_STATUS) & NEEDS_RESET, 0);
    }

    #[test]
    fn activation_failure_needs_reset() {
        let (mut d, _) = fake(true);
        let (q0, q1) = queues();
        assert_ne!(d.start(&[&q0, &q1]) & NEEDS_RESET, 0);
        d.write(REG_STATUS, 0);
        assert_eq!(d.read(REG_STATUS), 0);
    }

    /// A device that fails to activate at DRIVER_OK: the status reads back what the driver
    /// wrote plus DEVICE_NEEDS_RESET, and the driver gets a configuration change notification
    /// (virtio 1.2, 2.1.2), as on virtio-pci. A failure before DRIVER_OK notifies nobody.
    #[test]
    fn failed_activation_needs_reset_and_notifies() {
        let (mut d, rec) = fake(true);
        let (q0, q1) = queues();
        assert!(d.negotiate(VERSION_1));
        d.setup_queue(0, &q0);
        d.setup_queue(1, &q1);
        let gen = d.read(0xfc);
        assert!(d.irq.read().is_err());
        d.add_status(DRIVER_OK);
        assert_eq!(d.read(REG_STATUS), 1 | 2 | 8 | DRIVER_OK | NEEDS_RESET);
        assert!(rec.lock().unwrap().interrupt.is_none());
        // The configuration change: InterruptStatus, the generation and the irq show it.
        assert_eq!(d.read(REG_ISR), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(d.read(0xfc), gen + 1);
        assert_eq!(d.irq.read().unwrap(), 1);
        // Nothing but a reset helps; a repeated write is ignored and raises nothing.
        d.add_status(DRIVER_OK);
        assert!(d.irq.read().is_err());
        d.write(0x30, 0);
        d.write(0x44, 0);
        assert_eq!(d.read(0x44), 1);
        d.write(REG_STATUS, 0);
        assert_eq!(d.read(REG_STATUS), 0);
        assert_eq!(d.read(REG_ISR), 0);

        // Before DRIVER_OK: DEVICE_NEEDS_RESET only.
        let (mut d, _) = fake(false);
        d.write(REG_STATUS, 2);
        assert_ne!(d.read(REG_STATUS) & NEEDS_RESET, 0);
        assert_eq!(d.read(REG_ISR), 0);
        assert!(d.irq.read().is_err());
    }

    /// A virtio-mmio device's state as the tern before the shared transport core wrote it
    /// (snapshot format 2): queue 0 stopped at 3, queue 1 at 5, a queue and a configuration
    /// interrupt pending, queue 1 selected.
    const SAVED_BY_FORMAT_2: &str = r#"{"device_type":42,"status":15,"needs_reset":false,"driver_features":4294967296,"driver_features_unknown":false,"queue_select":1,"device_features_select":0,"driver_features_select":1,"queues":[{"size":16,"ready":true,"desc":4096,"driver":4352,"device":4392,"next":3},{"size":16,"ready":true,"desc":8192,"driver":8448,"device":8488,"next":5}],"interrupt_status":3,"config_generation":1,"pci":null}"#;

    /// A snapshot written before the transports shared their core still restores, and saves
    /// back unchanged.
    #[test]
    fn restores_format_2_state() {
        use crate::transport::PauseDevice;
        use vm_memory::{Bytes, GuestAddress};
        let s: TransportState = serde_json::from_str(SAVED_BY_FORMAT_2).unwrap();
        let (mut d, rec) = fake(false);
        let (q0, q1) = queues();
        // Guest memory holds the snapshot's contents: where each used ring stopped.
        d.mem.write_obj(3u16, GuestAddress(q0.used + 2)).unwrap();
        d.mem.write_obj(5u16, GuestAddress(q1.used + 2)).unwrap();
        d.t.restore_state(&s).unwrap();
        assert_eq!(d.read(REG_STATUS), 0xf);
        assert_eq!(d.read(REG_ISR), 3);
        assert_eq!(d.read(0xfc), 1);
        assert_eq!(d.read(0x44), 1, "queue 1 selected and ready");
        {
            let r = rec.lock().unwrap();
            assert_eq!(r.acked, Some(VERSION_1));
            assert_eq!(
                r.queues,
                vec![
                    (16, q0.desc, q0.avail, q0.used),
                    (16, q1.desc, q1.avail, q1.used)
                ]
            );
            // Each queue is looked at once, as if notified.
            assert!(r.events.iter().all(|e| e.read().unwrap() == 1));
        }
        assert_eq!(
            serde_json::to_string(&d.t.save_state()).unwrap(),
            SAVED_BY_FORMAT_2
        );
    }

    #[test]
    fn garbage_never_panics() {
        let (mut d, _) = fake(false);
        let mut x: u32 = 0x1234_5678;
        for _ in 0..20_000 {
            // xorshift
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let off = u64::from(x % 0x140);
            let len = [1, 2, 4, 8][(x >> 20) as usize % 4];
            if x & 1 == 0 {
                let val = x.rotate_left(7).to_le_bytes();
                let data = [val[0], val[1], val[2], val[3], 0, 0, 0, 0];
                d.t.write(off, &data[..len]);
            } else {
                let mut data = [0u8; 8];
                d.t.read(off, &mut data[..len]);
            }
        }
        d.write(REG_STATUS, 0);
        assert_eq!(d.read(REG_STATUS), 0);
    }
}
