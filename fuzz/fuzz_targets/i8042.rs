//! The i8042 keyboard controller with its keyboard and port B: guest reads and writes of any
//! width at any offset of its ports, in any order. Invariants: nothing panics; the controller
//! never holds more than 16 bytes for the guest; the output-buffer-full status bit is set
//! exactly when a data read returns a queued byte, so a guest that drains the controller stops.
#![no_main]
use devices::legacy::{PortB, I8042, I8042_LEN};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use tern_fuzz::Input;

/// Status register: output buffer full.
const OBF: u8 = 1;
/// Status register offset (port 0x64) and data offset (port 0x60).
const STATUS: u64 = 4;
const DATA: u64 = 0;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut timer2 = false;
    // A reset pulse is the VMM's business: here it changes nothing.
    let mut dev = I8042::new(Box::new(|| {})).with_port_b(PortB::new(Box::new(move || {
        timer2 = !timer2;
        timer2
    })));
    while !input.0.is_empty() {
        let op = input.u8();
        let offset = u64::from(input.u8()) % (I8042_LEN + 2);
        let width = [0usize, 1, 2, 4][usize::from(op >> 6)];
        if op & 1 == 0 {
            let bytes = input.bytes(width).to_vec();
            dev.write(offset, &bytes);
        } else {
            let mut buf = vec![0u8; width];
            dev.read(offset, &mut buf);
        }
    }
    // Drain: at most 16 queued bytes, and the status bit tells the truth about each.
    let mut b = [0u8];
    let mut drained = 0;
    loop {
        dev.read(STATUS, &mut b);
        if b[0] & OBF == 0 {
            break;
        }
        dev.read(DATA, &mut b);
        drained += 1;
        assert!(drained <= 16, "the controller holds more than 16 bytes");
    }
    dev.read(STATUS, &mut b);
    assert_eq!(b[0] & OBF, 0, "output buffer full after the drain");
});
