//! What the system bus answers tern's registration with systemd-machined: bytes read as
//! D-Bus messages (`vmm::machined::read_message`) and parsed as a method return or error
//! (`parse_reply`). Anything gets an answer or an error, never a panic or a huge allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // A stream may hold several messages, as the bus' answers to Hello and RegisterMachine.
    for _ in 0..4 {
        let Ok(msg) = vmm::machined::read_message(&mut rest) else {
            return;
        };
        if let Ok(Some((_, Ok(path)))) = vmm::machined::parse_reply(&msg) {
            assert!(path.len() < msg.len(), "a path longer than its message");
        }
    }
});
