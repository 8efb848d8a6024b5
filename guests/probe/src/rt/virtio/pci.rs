//! Modern virtio-pci (virtio 1.x §4.1): discovery on bus 0 and registers.
//!
//! Devices are vendor 0x1af4 functions with device ID 0x1040 + type (modern),
//! or 0x1000–0x103f (transitional, type = subsystem ID) when they also carry
//! the modern capabilities; those are driven through the modern interface.
//! The BARs the VMM or firmware assigned are used as they are; the structures
//! the capabilities point at are mapped uncached for ring 3. No interrupts:
//! every MSI-X vector is left at 0xffff (none).

use super::{Device, Devices, DiscoverError, Location, Regs, Transport};
use crate::rt::io::{
    mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, mmio_write8,
};
use crate::rt::paging;
use crate::rt::pci::{self, Bdf, COMMAND_BUS_MASTER, COMMAND_MEMORY, SUBSYSTEM_ID};
use crate::rt::phys::PhysAlloc;

pub const VENDOR: u16 = 0x1af4;
const MODERN_BASE: u16 = 0x1040;
const CAP_VENDOR: u8 = 0x09;

const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

/// `virtio_pci_common_cfg` offsets.
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
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const COMMON_LEN: u32 = 0x38;
const NO_VECTOR: u16 = 0xffff;

/// The mapped structures of one modern virtio-pci function.
#[derive(Clone, Copy)]
pub struct Pci {
    pub bdf: Bdf,
    /// Common configuration.
    pub common: u64,
    /// Notification area: queue `q` at `notify + queue_notify_off * notify_mult`.
    pub notify: u64,
    pub notify_len: u32,
    pub notify_mult: u32,
    /// ISR status byte (0 when the device has none).
    pub isr: u64,
    /// Device-specific configuration (0 when the device has none).
    pub device_cfg: u64,
    pub device_cfg_len: u32,
}

impl Pci {
    fn r8(&self, off: u64) -> u8 {
        // SAFETY: `common` is the device's mapped common configuration
        // (at least COMMON_LEN bytes, checked at discovery).
        unsafe { mmio_read8(self.common + off) }
    }
    fn r16(&self, off: u64) -> u16 {
        // SAFETY: as for `r8`.
        unsafe { mmio_read16(self.common + off) }
    }
    fn r32(&self, off: u64) -> u32 {
        // SAFETY: as for `r8`.
        unsafe { mmio_read32(self.common + off) }
    }
    fn w8(&self, off: u64, v: u8) {
        // SAFETY: as for `r8`.
        unsafe { mmio_write8(self.common + off, v) }
    }
    fn w16(&self, off: u64, v: u16) {
        // SAFETY: as for `r8`.
        unsafe { mmio_write16(self.common + off, v) }
    }
    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as for `r8`.
        unsafe { mmio_write32(self.common + off, v) }
    }
    /// 64-bit fields as two 32-bit writes, low half first.
    fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    /// config_generation: changes whenever the device configuration does.
    pub fn config_generation(&self) -> u8 {
        self.r8(CONFIG_GENERATION)
    }

    /// Address of `width` bytes at offset `off` of the device configuration,
    /// if the function has that structure and they lie inside it.
    pub fn config_addr(&self, off: u64, width: u64) -> Option<u64> {
        (self.device_cfg != 0 && off + width <= u64::from(self.device_cfg_len))
            .then_some(self.device_cfg + off)
    }

    pub fn num_queues(&self) -> u16 {
        self.r16(NUM_QUEUES)
    }

    /// The ISR status byte (bit 0 queue, bit 1 configuration change), which
    /// this read clears; 0 when the function has no ISR structure.
    pub fn isr_status(&self) -> u8 {
        if self.isr == 0 {
            return 0;
        }
        // SAFETY: `isr` is the function's mapped ISR structure (resolved at
        // discovery).
        unsafe { mmio_read8(self.isr) }
    }
}

impl Regs for Pci {
    fn status(&self) -> u8 {
        self.r8(DEVICE_STATUS)
    }

    fn set_status(&self, status: u8) {
        self.w8(DEVICE_STATUS, status);
        if status == 0 {
            // After a reset: no configuration-change interrupt either.
            self.w16(CONFIG_MSIX_VECTOR, NO_VECTOR);
        }
    }

    fn device_features(&self) -> u64 {
        self.w32(DEVICE_FEATURE_SELECT, 0);
        let lo = self.r32(DEVICE_FEATURE);
        self.w32(DEVICE_FEATURE_SELECT, 1);
        let hi = self.r32(DEVICE_FEATURE);
        u64::from(hi) << 32 | u64::from(lo)
    }

    fn set_driver_features(&self, features: u64) {
        self.w32(DRIVER_FEATURE_SELECT, 0);
        self.w32(DRIVER_FEATURE, features as u32);
        self.w32(DRIVER_FEATURE_SELECT, 1);
        self.w32(DRIVER_FEATURE, (features >> 32) as u32);
    }

    fn queue_max(&self, queue: u16) -> u16 {
        if queue >= self.num_queues() {
            return 0;
        }
        self.w16(QUEUE_SELECT, queue);
        self.r16(QUEUE_SIZE)
    }

    fn setup_queue(
        &self,
        queue: u16,
        size: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<u64, &'static str> {
        self.w16(QUEUE_SELECT, queue);
        if self.r16(QUEUE_ENABLE) != 0 {
            return Err("queue already enabled after reset");
        }
        self.w16(QUEUE_SIZE, size);
        self.w16(QUEUE_MSIX_VECTOR, NO_VECTOR);
        self.w64(QUEUE_DESC, desc);
        self.w64(QUEUE_DRIVER, driver);
        self.w64(QUEUE_DEVICE, device);
        let off = u64::from(self.r16(QUEUE_NOTIFY_OFF)) * u64::from(self.notify_mult);
        if off + 2 > u64::from(self.notify_len) {
            return Err("queue notify address outside the notify structure");
        }
        self.w16(QUEUE_ENABLE, 1);
        Ok(self.notify + off)
    }

    fn notify(&self, queue: u16, addr: u64) {
        // SAFETY: `addr` lies in the mapped notification structure (checked
        // when the queue was set up).
        unsafe { mmio_write16(addr, queue) }
    }
}

/// Where one virtio capability points: BAR, offset, length.
#[derive(Clone, Copy)]
struct CapRef {
    bar: u8,
    offset: u32,
    length: u32,
}

/// Resolve a capability to a ring-3 address, mapping it uncached.
fn resolve(bdf: Bdf, cap: CapRef, pa: &mut PhysAlloc) -> Result<u64, &'static str> {
    let base = bdf
        .mem_bar(cap.bar)
        .ok_or("virtio capability in an I/O or invalid BAR")?;
    if base == 0 {
        return Err("BAR of a virtio capability is unassigned");
    }
    let addr = base
        .checked_add(cap.offset.into())
        .ok_or("virtio capability beyond the address space")?;
    paging::map_uncached(pa, addr, cap.length.into())?;
    Ok(addr)
}

/// The modern interface of a virtio function, or `None` if it has no common
/// configuration capability (a legacy-only device).
fn probe(bdf: Bdf, pa: &mut PhysAlloc) -> Result<Option<Pci>, &'static str> {
    let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
    let mut notify_mult = 0;
    bdf.for_each_cap(CAP_VENDOR, |ptr| {
        let cfg_type = (bdf.read32(ptr) >> 24) as u8;
        let slot = match cfg_type {
            CAP_COMMON => &mut common,
            CAP_NOTIFY => &mut notify,
            CAP_ISR => &mut isr,
            CAP_DEVICE => &mut device,
            _ => return true,
        };
        // The first capability of each type is the preferred one.
        if slot.is_none() {
            *slot = Some(CapRef {
                bar: bdf.read8(ptr + 4),
                offset: bdf.read32(ptr + 8),
                length: bdf.read32(ptr + 12),
            });
            if cfg_type == CAP_NOTIFY {
                notify_mult = bdf.read32(ptr + 16);
            }
        }
        true
    });
    let Some(common) = common else {
        return Ok(None);
    };
    if common.length < COMMON_LEN {
        return Err("common configuration capability too short");
    }
    let notify = notify.ok_or("no notification capability")?;
    bdf.enable(COMMAND_MEMORY | COMMAND_BUS_MASTER);
    let mut dev = Pci {
        bdf,
        common: resolve(bdf, common, pa)?,
        notify: resolve(bdf, notify, pa)?,
        notify_len: notify.length,
        notify_mult,
        isr: 0,
        device_cfg: 0,
        device_cfg_len: 0,
    };
    if let Some(c) = isr {
        dev.isr = resolve(bdf, c, pa)?;
    }
    if let Some(c) = device {
        dev.device_cfg = resolve(bdf, c, pa)?;
        dev.device_cfg_len = c.length;
    }
    Ok(Some(dev))
}

/// Add every modern-capable virtio function on bus 0 to `out`.
pub fn discover(pa: &mut PhysAlloc, out: &mut Devices) -> Result<(), DiscoverError> {
    let mut result = Ok(());
    pci::scan_bus0(|bdf, id| {
        let (vendor, device) = (id as u16, (id >> 16) as u16);
        if result.is_err() || vendor != VENDOR {
            return;
        }
        let kind = match device {
            0x1040..=0x107f => device - MODERN_BASE,
            0x1000..=0x103f => bdf.read16(SUBSYSTEM_ID),
            _ => return,
        };
        match probe(bdf, pa) {
            Ok(Some(p)) => out.push(Device {
                kind: kind.into(),
                transport: Transport::Pci(p),
            }),
            Ok(None) => out.legacy += 1,
            Err(why) => {
                result = Err(DiscoverError {
                    at: Location::Pci(bdf),
                    why,
                })
            }
        }
    });
    result
}
