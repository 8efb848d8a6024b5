//! virtio-mmio: a sequence of register and configuration-space reads and writes (any offset,
//! size and value) on the transport of an rng, console or blk device.
#![no_main]
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use tern_fuzz::{access, some_device, vm_mem, Input};
use virtio::transport::mmio::MmioTransport;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let device = some_device(input.u8());
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(vm_mem(), device, irq).unwrap();
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        let (write, offset, size, value) = access(&mut input, 0x1ff);
        if write {
            t.write(offset, &value.to_le_bytes()[..size]);
        } else {
            let mut b = [0u8; 8];
            t.read(offset, &mut b[..size]);
        }
    }
});
