//! virtio-balloon: inflate, deflate, statistics and free page reports from a fuzzed guest
//! memory image through the device's worker. Every range the device frees must be whole pages
//! inside guest memory.
#![no_main]
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tern_fuzz::{Driver, Input, MEM_SIZE};
use virtio::devices::balloon::{Balloon, BalloonOptions, Discard, PAGE};

struct Checked;

impl Discard for Checked {
    fn discard(&self, addr: u64, len: u64) -> std::io::Result<()> {
        assert!(len > 0 && addr % PAGE == 0 && len % PAGE == 0, "{addr:#x}+{len:#x}");
        assert!(addr + len <= MEM_SIZE as u64, "{addr:#x}+{len:#x} outside guest memory");
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let opts = BalloonOptions {
        deflate_on_oom: true,
        free_page_reporting: true,
        stats_interval: Duration::from_secs(3600),
    };
    let b = Balloon::new(opts, MEM_SIZE as u64, Arc::new(Checked)).unwrap();
    let h = b.handle();
    let mut d = Driver::new(Box::new(b));
    let mut input = Input(data);
    let mask = d.start(&mut input);
    d.notify_and_settle(mask);
    h.refresh_stats();
    d.settle();
    let _ = h.status();
});
