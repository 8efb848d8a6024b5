//! virtio-blk: descriptor chains (reads, writes, flush, get-id, discard, write-zeroes, and
//! whatever else the bytes say) over a 64 KiB raw image, through the device's worker with the
//! synchronous or the io_uring engine.
#![no_main]
use block::EngineKind;
use libfuzzer_sys::fuzz_target;
use tern_fuzz::{raw_disk, Driver, Input};
use virtio::devices::block::{Block, BlockOptions};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let opts = BlockOptions {
        serial: "fuzz-serial".into(),
        queues: if flags & 1 != 0 { 2 } else { 1 },
        engine: if flags & 2 != 0 {
            EngineKind::IoUring
        } else {
            EngineKind::Sync
        },
        iops: 0,
        bandwidth: 0,
    };
    let mut d = Driver::new(Box::new(Block::new(raw_disk(), opts)));
    let mask = d.start(&mut input);
    d.notify_and_settle(mask);
});
