//! qcow2 opening: the bytes as an image file probed as qcow2 (header, L1/L2 and
//! refcount tables, extensions), then a few sectors read from it, as virtio-blk would; and the
//! backing chain its header names, as the jail and Landlock read it.
#![no_main]
use block::{Disk, DiskOptions, ImageFormat, IoSlice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let path = DIR
        .get_or_init(|| tern_fuzz::scratch_dir("qcow2"))
        .join("image.qcow2");
    std::fs::write(&path, data).unwrap();
    let _ = block::named_backing_files(&path);
    // As a guest-written header is opened: qcow2 by an earlier probe, so whatever the header
    // names is refused rather than opened (the fuzzer must not make it open host files).
    let opened = Disk::open(&DiskOptions {
        path: path.clone(),
        probed: Some(ImageFormat::Qcow2),
        read_only: true,
        ..DiskOptions::default()
    });
    if let Ok((disk, _)) = opened {
        let size = disk.size();
        let mut buf = vec![0u8; 4096];
        for offset in [0, 512, 65536, size.saturating_sub(4096), (size / 2) & !511] {
            if offset.saturating_add(4096) > size {
                continue;
            }
            let iov = [IoSlice::new(buf.as_mut_ptr(), buf.len())];
            // SAFETY: `buf` is a live buffer of `buf.len()` bytes for the whole call.
            let _ = unsafe { disk.readv(&iov, offset) };
        }
    }
});
