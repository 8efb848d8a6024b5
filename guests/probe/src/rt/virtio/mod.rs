//! Ring-3 virtio drivers: device discovery on virtio-mmio (v2) and modern
//! virtio-pci, and the transport-independent part (status handshake, feature
//! negotiation, split virtqueues). The probe polls; it asks for no interrupts.
//!
//! Driver sequence ([`Device::start`], virtio 1.x §3.1.1): reset, ACKNOWLEDGE,
//! DRIVER, negotiate VIRTIO_F_VERSION_1 (plus the device-type features a
//! driver asks for with [`Device::start_with`]), FEATURES_OK (checked to
//! stick), set up the queues in probe-owned RAM, DRIVER_OK.

use core::fmt;

use super::clock;
use super::io::{mmio_read16, mmio_read32, mmio_read8, mmio_write32, pause};
use super::pci::Bdf;
use super::phys::PhysAlloc;

pub mod blk;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod queue;

pub use queue::{Buf, Virtqueue};

/// Device types (virtio 1.x §5).
pub const ID_NET: u32 = 1;
pub const ID_BLK: u32 = 2;
pub const ID_CONSOLE: u32 = 3;
pub const ID_RNG: u32 = 4;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Interrupt status bit of a configuration change (virtio-mmio
/// InterruptStatus, virtio-pci ISR).
pub const INT_CONFIG: u8 = 2;

/// The feature every driver negotiates (device-type features come on top).
pub const F_VERSION_1: u64 = 1 << 32;

/// Most devices one discovery keeps (tern's mmio window has 32 slots, PCI bus
/// 0 has 32 devices).
pub const MAX_DEVICES: usize = 64;
/// Time a reset may take before the driver gives up.
const RESET_TIMEOUT_NS: u64 = 100_000_000;

/// Register access of one transport.
pub trait Regs {
    fn status(&self) -> u8;
    fn set_status(&self, status: u8);
    fn device_features(&self) -> u64;
    fn set_driver_features(&self, features: u64);
    /// Largest size of queue `queue`; 0 if the queue does not exist.
    fn queue_max(&self, queue: u16) -> u16;
    /// Program and enable queue `queue`; returns its notification address.
    fn setup_queue(
        &self,
        queue: u16,
        size: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<u64, &'static str>;
    /// Tell the device that queue `queue` (notification address `addr`) has
    /// new buffers.
    fn notify(&self, queue: u16, addr: u64);
}

#[derive(Clone, Copy)]
pub enum Transport {
    Mmio(mmio::Mmio),
    Pci(pci::Pci),
}

/// A discovered device.
#[derive(Clone, Copy)]
pub struct Device {
    /// Device type (1 net, 2 block, 3 console, 4 rng, …).
    pub kind: u32,
    pub transport: Transport,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Mmio(m) => write!(f, "mmio@{:#x}", m.base),
            Transport::Pci(p) => write!(f, "pci@{}", p.bdf),
        }
    }
}

impl Device {
    /// "mmio" or "pci".
    pub fn transport_name(&self) -> &'static str {
        match self.transport {
            Transport::Mmio(_) => "mmio",
            Transport::Pci(_) => "pci",
        }
    }

    /// Where the registers are: the virtio-mmio window, or the PCI common
    /// configuration structure.
    pub fn regs_addr(&self) -> u64 {
        match &self.transport {
            Transport::Mmio(m) => m.base,
            Transport::Pci(p) => p.common,
        }
    }

    fn regs(&self) -> &dyn Regs {
        match &self.transport {
            Transport::Mmio(m) => m,
            Transport::Pci(p) => p,
        }
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.regs().status()
    }

    /// The interrupt status bits (`INT_CONFIG`, bit 0 for a used buffer):
    /// virtio-mmio InterruptStatus, or the virtio-pci ISR byte, which the
    /// read clears.
    pub fn interrupt_status(&self) -> u8 {
        match &self.transport {
            Transport::Mmio(m) => m.interrupt_status(),
            Transport::Pci(p) => p.isr_status(),
        }
    }

    /// Reset the device and wait until it reports status 0.
    pub fn reset(&self) -> Result<(), &'static str> {
        let r = self.regs();
        r.set_status(0);
        let start = clock::now_ns();
        while r.status() != 0 {
            if clock::now_ns().wrapping_sub(start) > RESET_TIMEOUT_NS {
                return Err("device does not reset");
            }
            pause();
        }
        Ok(())
    }

    /// Bring the device up with `queues.len()` queues (indices 0, 1, …), each
    /// of the largest power of two not above `max_size` and the device's
    /// limit. On error the device is left FAILED.
    pub fn start(
        &self,
        pa: &mut PhysAlloc,
        queues: &mut [Virtqueue],
        max_size: u16,
    ) -> Result<(), &'static str> {
        self.start_with(pa, queues, max_size, 0).map(|_| ())
    }

    /// [`Device::start`], also negotiating those of `wanted` (device-type
    /// feature bits) that the device offers. Returns the negotiated features.
    pub fn start_with(
        &self,
        pa: &mut PhysAlloc,
        queues: &mut [Virtqueue],
        max_size: u16,
        wanted: u64,
    ) -> Result<u64, &'static str> {
        let r = self.regs();
        self.reset()?;
        let result = self.handshake(r, pa, queues, max_size, wanted);
        if result.is_err() {
            r.set_status(r.status() | STATUS_FAILED);
        }
        result
    }

    /// The feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.regs().device_features()
    }

    fn handshake(
        &self,
        r: &dyn Regs,
        pa: &mut PhysAlloc,
        queues: &mut [Virtqueue],
        max_size: u16,
        wanted: u64,
    ) -> Result<u64, &'static str> {
        let mut status = STATUS_ACKNOWLEDGE;
        r.set_status(status);
        status |= STATUS_DRIVER;
        r.set_status(status);
        if r.device_features() & F_VERSION_1 == 0 {
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        let features = F_VERSION_1 | (r.device_features() & wanted);
        r.set_driver_features(features);
        status |= STATUS_FEATURES_OK;
        r.set_status(status);
        if r.status() & STATUS_FEATURES_OK == 0 {
            return Err("device refused FEATURES_OK");
        }
        for (i, q) in queues.iter_mut().enumerate() {
            let index = i as u16;
            let max = r.queue_max(index);
            if max == 0 {
                return Err("device lacks a queue the driver needs");
            }
            let limit = max.min(max_size).max(1);
            // Largest power of two <= limit (split rings need one).
            let size = 1 << (15 - limit.leading_zeros());
            *q = Virtqueue::new(index, size, pa)?;
            q.notify_addr = r.setup_queue(index, size, q.desc, q.avail, q.used)?;
        }
        status |= STATUS_DRIVER_OK;
        r.set_status(status);
        if r.status() & (STATUS_NEEDS_RESET | STATUS_FAILED) != 0 {
            return Err("device needs a reset after DRIVER_OK");
        }
        Ok(features)
    }

    /// The configuration generation counter (virtio-mmio ConfigGeneration,
    /// virtio-pci config_generation).
    fn config_generation(&self) -> u32 {
        match &self.transport {
            Transport::Mmio(m) => m.config_generation(),
            Transport::Pci(p) => p.config_generation().into(),
        }
    }

    fn config_addr(&self, off: u64, width: u64) -> Result<u64, &'static str> {
        match &self.transport {
            Transport::Mmio(m) => m.config_addr(off, width),
            Transport::Pci(p) => p.config_addr(off, width),
        }
        .ok_or("device configuration field out of range")
    }

    /// 8-bit field at offset `off` of the device-specific configuration.
    pub fn config8(&self, off: u64) -> Result<u8, &'static str> {
        let a = self.config_addr(off, 1)?;
        // SAFETY: `a` lies in the device's mapped configuration space.
        Ok(unsafe { mmio_read8(a) })
    }

    /// 16-bit field (aligned) of the device-specific configuration.
    pub fn config16(&self, off: u64) -> Result<u16, &'static str> {
        let a = self.config_addr(off, 2)?;
        // SAFETY: as for `config8`.
        Ok(unsafe { mmio_read16(a) })
    }

    /// 32-bit field (aligned) of the device-specific configuration.
    pub fn config32(&self, off: u64) -> Result<u32, &'static str> {
        let a = self.config_addr(off, 4)?;
        // SAFETY: as for `config8`.
        Ok(unsafe { mmio_read32(a) })
    }

    /// Writes a 32-bit field (aligned) of the device-specific configuration.
    pub fn set_config32(&self, off: u64, value: u32) -> Result<(), &'static str> {
        let a = self.config_addr(off, 4)?;
        // SAFETY: `a` lies in the device's mapped configuration space.
        unsafe { mmio_write32(a, value) };
        Ok(())
    }

    /// 64-bit field of the device-specific configuration: two 32-bit reads,
    /// repeated until the generation counter is the same before and after.
    pub fn config64(&self, off: u64) -> Result<u64, &'static str> {
        for _ in 0..100 {
            let g = self.config_generation();
            let lo = self.config32(off)?;
            let hi = self.config32(off + 4)?;
            if self.config_generation() == g {
                return Ok(u64::from(hi) << 32 | u64::from(lo));
            }
        }
        Err("device configuration keeps changing")
    }

    /// Notify the device after [`Virtqueue::push`], unless it asked not to be
    /// (VRING_USED_F_NO_NOTIFY), as Linux's drivers do.
    pub fn notify(&self, q: &Virtqueue) {
        if q.kick_needed() {
            self.regs().notify(q.index, q.notify_addr);
        }
    }
}

/// Where discovery failed.
#[derive(Clone, Copy)]
pub enum Location {
    Cmdline,
    Mmio(u64),
    Pci(Bdf),
}

pub struct DiscoverError {
    pub at: Location,
    pub why: &'static str,
}

impl fmt::Display for DiscoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Location::Cmdline => write!(f, "command line: {}", self.why),
            Location::Mmio(a) => write!(f, "mmio@{a:#x}: {}", self.why),
            Location::Pci(b) => write!(f, "pci@{b}: {}", self.why),
        }
    }
}

/// The devices found, virtio-mmio first, then PCI in bus order.
pub struct Devices {
    list: [Option<Device>; MAX_DEVICES],
    n: usize,
    /// Legacy-only devices seen and ignored (virtio-mmio version 1, PCI
    /// functions without the modern capabilities).
    pub legacy: usize,
}

impl Devices {
    fn push(&mut self, d: Device) {
        if self.n < MAX_DEVICES {
            self.list[self.n] = Some(d);
            self.n += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &Device> {
        self.list[..self.n].iter().flatten()
    }
}

/// Find every virtio device on both transports, mapping their registers for
/// ring 3 (page tables come from `pa`). PCI functions get memory decoding and
/// bus mastering enabled.
pub fn discover(cmdline: &str, pa: &mut PhysAlloc) -> Result<Devices, DiscoverError> {
    let mut out = Devices {
        list: [None; MAX_DEVICES],
        n: 0,
        legacy: 0,
    };
    mmio::discover(cmdline, pa, &mut out)?;
    pci::discover(pa, &mut out)?;
    Ok(out)
}
