//! bzImage parsing: the setup header, the payload's place and format, and host
//! decompression of the payload (gzip, xz, lzma, lz4, zstd, ...) into the vmlinux ELF, with a
//! 4 MiB output limit.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = arch::bzimage::setup_header_info(data) {
        let r = info.payload_range();
        assert!(
            r.start <= r.end && r.end <= data.len(),
            "payload range {r:?} outside the image"
        );
    }
    let _ = arch::bzimage::extract_vmlinux_with_limit(data, 4 << 20);
});
