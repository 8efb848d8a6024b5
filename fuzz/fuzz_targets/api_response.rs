//! The CLI client's reading of an API answer: the chunked-body decoder, on raw
//! bytes (a chunk size may split a multi-byte character).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let out = vmm::api::fuzzing::dechunk(data);
    assert!(out.len() <= data.len());
});
