//! virtio-console: descriptor chains on the receive and transmit queues, with host input
//! queued for the guest, through the device's worker.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_fuzz::{Driver, Input};

fuzz_target!(|data: &[u8]| {
    let console = virtio::devices::console::Console::new(Some(Box::new(std::io::sink()))).unwrap();
    let host = console.input_handle();
    let mut d = Driver::new(Box::new(console));
    let mut input = Input(data);
    let typed = input.u8();
    let mask = d.start(&mut input);
    if typed != 0 {
        host.push(&data[..usize::from(typed).min(data.len())]);
    }
    d.notify_and_settle(mask);
});
