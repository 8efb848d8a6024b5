//! PCI root: configuration accesses through the 0xcf8/0xcfc ports and ECAM, on bus 0 with the
//! host bridge and two virtio-pci functions (BAR moves included), then accesses to the BARs
//! where the guest put them (the MSI-X table among them). Half the inputs get the PC identity
//! a UEFI VM's root has (i440FX, PIIX3 ISA bridge at 00:01.0, PIIX4 PM at 00:01.3).
#![no_main]
use std::sync::{Arc, Mutex};

use devices::pci::{PciConfigIo, PciConfigMmio, PciDevice, PciRoot, PciWindows};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use tern_fuzz::{access, some_device, vm_mem, Input, NoMsi};
use virtio::transport::pci::VirtioPciDevice;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut root = PciRoot::new(&PciWindows {
        mmio32: 0xc000_0000..0xe000_0000,
        mmio64: None,
        io: None,
    })
    .unwrap();
    let first = input.u8();
    if first & 0x80 != 0 {
        root.set_pc_identity(0xb000);
    }
    for which in [first, first.wrapping_add(1)] {
        let t = VirtioPciDevice::new(vm_mem(), some_device(which), Arc::new(NoMsi)).unwrap();
        let dev: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(t));
        root.attach(dev).unwrap();
    }
    let root = Arc::new(Mutex::new(root));
    let mut io = PciConfigIo::new(root.clone());
    let mut ecam = PciConfigMmio::new(root.clone());
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        let kind = input.u8();
        let (write, offset, size, value) = access(&mut input, 0x1f_ffff);
        let bytes = value.to_le_bytes();
        let mut b = [0u8; 8];
        match kind % 3 {
            0 => {
                let off = offset & 7;
                if write {
                    io.write(off, &bytes[..size]);
                } else {
                    io.read(off, &mut b[..size]);
                }
            }
            1 => {
                if write {
                    ecam.write(offset, &bytes[..size]);
                } else {
                    ecam.read(offset, &mut b[..size]);
                }
            }
            _ => {
                let r = root.lock().unwrap();
                let bdf = devices::pci::PciBdf::new(0, (kind >> 2) % 4, 0);
                let bars = r.bar_bus_devices(bdf);
                drop(r);
                if let Some((info, dev)) = bars.first() {
                    let off = offset % info.size.max(1);
                    let mut d = dev.lock().unwrap();
                    if write {
                        d.write(off, &bytes[..size]);
                    } else {
                        d.read(off, &mut b[..size]);
                    }
                }
                let _ = root.lock().unwrap().take_bar_relocations();
            }
        }
    }
});
