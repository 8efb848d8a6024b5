//! virtio-rng: descriptor chains from a fuzzed guest memory image through the device's worker.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_fuzz::{Driver, Input};

fuzz_target!(|data: &[u8]| {
    let mut d = Driver::new(Box::new(virtio::devices::rng::Rng::new()));
    let mut input = Input(data);
    let mask = d.start(&mut input);
    d.notify_and_settle(mask);
});
