//! A live migration's incoming stream: the bytes as a source's side of the connection, read
//! as `tern run --incoming` reads them (preamble, Hello with its configuration and CPUID, runs
//! of pages checked against guest RAM, the final state, Go) into a small VM in plain memory;
//! and the same bytes through the message parser alone, so every kind is reached without the
//! Hello first.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm::migration::receive::fuzzing::receive_stream(data);
    vmm::migration::protocol::fuzzing::parse_stream(data);
});
