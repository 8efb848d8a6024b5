//! virtio-vsock: packets and descriptor chains from a fuzzed guest memory image through the
//! device's worker (its host side a real Unix socket nothing connects to; guest connections
//! go to host sockets that do not exist and are reset).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_fuzz::{Driver, Input};

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("tern-fuzz-vsock-{}", std::process::id()));
    let Ok(dev) = virtio::devices::vsock::Vsock::new(3, &path) else {
        return;
    };
    let mut d = Driver::new(Box::new(dev));
    let mut input = Input(data);
    let mask = d.start(&mut input);
    d.notify_and_settle(mask);
});
