//! The CLI client's reading of an API answer: the chunked-body decoder.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let out = vmm::api::fuzzing::dechunk(&text);
    assert!(out.len() <= text.len());
});
