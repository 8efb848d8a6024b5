//! virtio-mem: plug, unplug, unplug-all and state requests from a fuzzed guest memory image
//! through the device's worker, with a fuzzed requested size. Every range the device frees
//! must be whole blocks inside its region, and it never holds more plugged than requested
//! (unplugging aside) nor more than the region.
#![no_main]
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tern_fuzz::{Driver, Input, MEM_SIZE};
use virtio::devices::balloon::Discard;
use virtio::devices::mem::{MemOptions, VirtioMem};

/// The device's region: the upper half of the fuzz memory, in 4 KiB blocks.
const OPTS: MemOptions = MemOptions {
    addr: MEM_SIZE as u64 / 2,
    size: MEM_SIZE as u64 / 2,
    block_size: 4096,
};

struct Checked;

impl Discard for Checked {
    fn discard(&self, addr: u64, len: u64) -> std::io::Result<()> {
        let b = OPTS.block_size;
        assert!(len > 0 && addr % b == 0 && len % b == 0, "{addr:#x}+{len:#x}");
        assert!(
            addr >= OPTS.addr && addr + len <= OPTS.addr + OPTS.size,
            "{addr:#x}+{len:#x} outside the region"
        );
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let requested = u64::from(input.u16()) * OPTS.block_size;
    let dev = VirtioMem::new(OPTS, Arc::new(Checked)).unwrap();
    let h = dev.handle();
    let accepted = h.set_requested(requested).is_ok();
    assert_eq!(accepted, requested <= OPTS.size);
    let mut d = Driver::new(Box::new(dev));
    let mask = d.start(&mut input);
    d.notify_and_settle(mask);
    let st = h.status();
    assert!(st.plugged <= st.region && st.plugged % OPTS.block_size == 0, "{st:?}");
    assert!(st.plugged <= st.requested, "{st:?}");
});
