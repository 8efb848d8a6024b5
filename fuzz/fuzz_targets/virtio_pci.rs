//! virtio-pci: a sequence of PCI configuration-space accesses (BAR sizing and moves, the
//! virtio capabilities, the MSI-X capability) and BAR accesses (common and device
//! configuration, notifications, ISR, the MSI-X table and PBA) on the transport of an rng,
//! console or blk device.
#![no_main]
use std::sync::Arc;

use devices::pci::PciDevice;
use libfuzzer_sys::fuzz_target;
use tern_fuzz::{access, some_device, vm_mem, Input, NoMsi};
use virtio::transport::pci::VirtioPciDevice;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let device = some_device(input.u8());
    let mut t = VirtioPciDevice::new(vm_mem(), device, Arc::new(NoMsi)).unwrap();
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        let kind = input.u8();
        let (write, offset, size, value) = access(&mut input, 0x7fff);
        let bytes = value.to_le_bytes();
        match kind % 4 {
            // Configuration space.
            0 | 1 => {
                let reg = (offset & 0xfff) as u16;
                if write {
                    let _ = t.config_write(reg, &bytes[..size]);
                } else {
                    let mut b = [0u8; 8];
                    t.config_read(reg, &mut b[..size]);
                }
            }
            // The BAR the transport has (and any other index).
            2 => {
                let bar = (kind >> 2) % 7;
                if write {
                    t.bar_write(bar, offset, &bytes[..size]);
                } else {
                    let mut b = [0u8; 8];
                    t.bar_read(bar, offset, &mut b[..size]);
                }
            }
            _ => t.set_bar_address((kind >> 2) % 7, value),
        }
        let _ = t.bars();
    }
});
