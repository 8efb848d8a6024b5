//! qcow2 opening: the bytes as an image file probed as qcow2 (header, L1/L2 and
//! refcount tables, extensions), then a few sectors read from it, as virtio-blk would, both
//! through imago and mapped to host extents by the I/O engine (the two must agree); and the
//! backing chain its header names, as the jail and Landlock read it.
#![no_main]
use std::sync::Arc;

use block::{Completion, Disk, DiskOptions, Engine, EngineKind, Extent, ImageFormat, IoOp, IoSlice};
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
        let disk = Arc::new(disk);
        let mut engine = Engine::new(disk.clone(), 8, EngineKind::IoUring);
        let size = disk.size();
        let (mut buf, mut mapped) = (vec![0u8; 4096], vec![0u8; 4096]);
        let mut extents = Vec::new();
        for offset in [0, 512, 65536, size.saturating_sub(4096), (size / 2) & !511] {
            if offset.saturating_add(4096) > size {
                continue;
            }
            if let Disk::Qcow2(q) = &*disk {
                if q.map(offset, 4096, false, 16, &mut extents) {
                    q.unmap();
                    assert_eq!(extents.iter().map(Extent::len).sum::<u64>(), 4096);
                }
                assert!(!q.map(offset, 4096, true, 16, &mut extents), "read-only, yet mapped for writing");
            }
            let iov = [IoSlice::new(buf.as_mut_ptr(), buf.len())];
            // SAFETY: `buf` is a live buffer of `buf.len()` bytes for the whole call.
            let direct = unsafe { disk.readv(&iov, offset) };
            mapped.fill(0xa5);
            // SAFETY: `mapped` outlives the drain below.
            unsafe { engine.submit(IoOp::Read, vec![IoSlice::from_mut(&mut mapped)], offset, 0) };
            let mut done: Vec<Completion> = Vec::new();
            engine.drain(&mut done);
            if let (Ok(()), Some(Completion { result: Ok(()), .. })) = (direct, done.pop()) {
                assert!(buf == mapped, "imago and the mapped path read {offset} differently");
            }
        }
    }
});
