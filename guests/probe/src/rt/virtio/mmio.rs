//! virtio-mmio, version 2 (virtio 1.x §4.2): discovery and registers.
//!
//! Devices come from `virtio_mmio.device=<size>@<addr>:<irq>` words of the
//! command line (QEMU microvm adds them) or, when there are none, from a scan
//! of tern's window: 32 slots of 4 KiB from 0xFEB0_0000. Version-1 (legacy)
//! devices are ignored.

use super::{Device, Devices, DiscoverError, Location, Regs, Transport};
use crate::rt::io::{mmio_read32, mmio_write32};
use crate::rt::paging;
use crate::rt::phys::PhysAlloc;

/// tern's virtio-mmio window (`arch::layout::VIRTIO_MMIO_START` and friends).
pub const TERN_WINDOW: u64 = 0xFEB0_0000;
pub const TERN_SLOT_SIZE: u64 = 0x1000;
pub const TERN_SLOTS: u64 = 32;

const MAGIC: u32 = 0x7472_6976; // "virt"
/// Smallest register window: registers up to 0x100, then the device config.
const MIN_SIZE: u64 = 0x100;

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const CONFIG: u64 = 0x100;

/// The register window of one virtio-mmio v2 device.
#[derive(Clone, Copy)]
pub struct Mmio {
    pub base: u64,
    /// Size of the register window (the device configuration ends there).
    pub size: u64,
}

impl Mmio {
    fn read(&self, reg: u64) -> u32 {
        // SAFETY: `base` is a virtio-mmio register window, mapped uncached
        // (checked by its magic value at discovery).
        unsafe { mmio_read32(self.base + reg) }
    }

    fn write(&self, reg: u64, value: u32) {
        // SAFETY: as for `read`.
        unsafe { mmio_write32(self.base + reg, value) }
    }

    fn write64(&self, reg_low: u64, value: u64) {
        self.write(reg_low, value as u32);
        self.write(reg_low + 4, (value >> 32) as u32);
    }

    /// InterruptStatus (bit 0 used buffer, bit 1 configuration change); not
    /// acknowledged here.
    pub fn interrupt_status(&self) -> u8 {
        self.read(INTERRUPT_STATUS) as u8
    }

    /// ConfigGeneration: changes whenever the device configuration does.
    pub fn config_generation(&self) -> u32 {
        self.read(CONFIG_GENERATION)
    }

    /// Address of `width` bytes at offset `off` of the device configuration,
    /// if they lie inside the register window.
    pub fn config_addr(&self, off: u64, width: u64) -> Option<u64> {
        (off + width <= self.size - CONFIG).then_some(self.base + CONFIG + off)
    }
}

impl Regs for Mmio {
    fn status(&self) -> u8 {
        self.read(STATUS) as u8
    }

    fn set_status(&self, status: u8) {
        self.write(STATUS, status.into());
    }

    fn device_features(&self) -> u64 {
        self.write(DEVICE_FEATURES_SEL, 0);
        let lo = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        let hi = self.read(DEVICE_FEATURES);
        u64::from(hi) << 32 | u64::from(lo)
    }

    fn set_driver_features(&self, features: u64) {
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, features as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (features >> 32) as u32);
    }

    fn queue_max(&self, queue: u16) -> u16 {
        self.write(QUEUE_SEL, queue.into());
        self.read(QUEUE_NUM_MAX).min(0x8000) as u16
    }

    fn setup_queue(
        &self,
        queue: u16,
        size: u16,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<u64, &'static str> {
        self.write(QUEUE_SEL, queue.into());
        if self.read(QUEUE_READY) != 0 {
            return Err("queue already ready after reset");
        }
        self.write(QUEUE_NUM, size.into());
        self.write64(QUEUE_DESC_LOW, desc);
        self.write64(QUEUE_DRIVER_LOW, driver);
        self.write64(QUEUE_DEVICE_LOW, device);
        self.write(QUEUE_READY, 1);
        Ok(self.base + QUEUE_NOTIFY)
    }

    fn notify(&self, queue: u16, addr: u64) {
        // SAFETY: `addr` is this device's QueueNotify register.
        unsafe { mmio_write32(addr, queue.into()) }
    }
}

/// Add the device at `base` to `out` if a virtio-mmio v2 device with a
/// non-zero ID is there (a version-1 device only counts as legacy).
fn probe(base: u64, size: u64, out: &mut Devices) {
    let m = Mmio { base, size };
    if m.read(MAGIC_VALUE) != MAGIC {
        return;
    }
    let version = m.read(VERSION);
    let kind = m.read(DEVICE_ID);
    match (version, kind) {
        (_, 0) => {}
        (2, _) => out.push(Device {
            kind,
            transport: Transport::Mmio(m),
        }),
        _ => out.legacy += 1,
    }
}

/// `<size>@<base>:<irq>[:<id>]`: size and base (memparse numbers: decimal or
/// 0x hex, optional K/M/G suffix).
fn parse_spec(spec: &str) -> Option<(u64, u64)> {
    let (size, rest) = spec.split_once('@')?;
    let base = rest.split(':').next()?;
    Some((memparse(size)?, memparse(base)?))
}

fn memparse(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    crate::rt::cmdline::parse_u64(num)?.checked_mul(1 << shift)
}

/// Add every virtio-mmio v2 device to `out`.
pub fn discover(cmdline: &str, pa: &mut PhysAlloc, out: &mut Devices) -> Result<(), DiscoverError> {
    let mut named = false;
    for word in cmdline.split(' ') {
        let Some(spec) = word.strip_prefix("virtio_mmio.device=") else {
            continue;
        };
        named = true;
        let err = |why| DiscoverError {
            at: Location::Cmdline,
            why,
        };
        let (size, base) = parse_spec(spec).ok_or(err("malformed virtio_mmio.device="))?;
        if size < MIN_SIZE || base & 3 != 0 {
            return Err(err("virtio_mmio.device= window too small or misaligned"));
        }
        paging::map_uncached(pa, base, size).map_err(|why| DiscoverError {
            at: Location::Mmio(base),
            why,
        })?;
        probe(base, size, out);
    }
    if !named {
        // The window lies in the last GiB below 4 GiB, mapped uncached at boot.
        for i in 0..TERN_SLOTS {
            probe(TERN_WINDOW + i * TERN_SLOT_SIZE, TERN_SLOT_SIZE, out);
        }
    }
    Ok(())
}
