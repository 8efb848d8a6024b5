//! The API client's reading of an answer (`api::client`): the chunked-body decoder, and the
//! whole answer (status line, headers, body framing), on raw bytes (a chunk size may split a
//! multi-byte character).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(body) = api::client::fuzzing::dechunk(data) {
        assert!(body.len() <= data.len());
    }
    if let Some((status, body)) = api::client::fuzzing::answer(data) {
        assert!((200..600).contains(&status));
        assert!(body.len() <= data.len());
    }
});
