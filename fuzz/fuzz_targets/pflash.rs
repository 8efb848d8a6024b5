//! The UEFI variable flash: guest command and data writes at any offset and width, reads in
//! every mode, and restores from arbitrary saved state. Invariants: direct reads are allowed
//! exactly when the device is in read-array mode; outside erase and program no byte changes;
//! a state saved and restored elsewhere gives the same bytes and mode.
#![no_main]
use std::sync::{Arc, Mutex};

use devices::flash::{FlashMemory, FlashMode, Pflash};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use lifecycle::Component;
use tern_fuzz::Input;

const LEN: usize = 3 * 4096;

fn flash(direct: &Arc<Mutex<bool>>) -> Pflash {
    let d = direct.clone();
    let template: Vec<u8> = (0..LEN).map(|i| (i * 7) as u8).collect();
    Pflash::new(
        FlashMemory::copy_of(&template).unwrap(),
        Box::new(move |v| *d.lock().unwrap() = v),
    )
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let direct = Arc::new(Mutex::new(true));
    let mut dev = flash(&direct);
    if input.u8() % 8 == 0 {
        // A hostile snapshot: JSON from the input.
        let text = String::from_utf8_lossy(input.bytes(64)).into_owned();
        if let Ok(state) = serde_json::from_str(&text) {
            let s = lifecycle::Section {
                id: "uefi-vars".into(),
                version: 1,
                state,
            };
            let _ = dev.restore(&s);
        }
    }
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        let at = u64::from(input.u16()) % (LEN as u64 + 16);
        let width = 1 + usize::from(input.u8() % 8);
        let before = dev.memory().bytes().to_vec();
        let mode = dev.mode();
        if input.u8() % 2 == 0 {
            let v = input.bytes(width).to_vec();
            dev.write(at, &v);
            if !matches!(mode, FlashMode::Program | FlashMode::Erase) {
                assert_eq!(before, dev.memory().bytes());
            }
        } else {
            let mut b = vec![0u8; width];
            dev.read(at, &mut b);
        }
        assert_eq!(*direct.lock().unwrap(), dev.mode() == FlashMode::ReadArray);
    }
    let saved = dev.save("uefi-vars").unwrap().unwrap();
    let again = Arc::new(Mutex::new(true));
    let mut other = flash(&again);
    other.restore(&saved).unwrap();
    assert_eq!(other.memory().bytes(), dev.memory().bytes());
    assert_eq!(other.mode(), dev.mode());
    assert_eq!(*again.lock().unwrap(), dev.mode() == FlashMode::ReadArray);
});
