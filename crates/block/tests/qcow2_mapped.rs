//! qcow2 requests mapped to host extents and run through io_uring (the engine's mapped path),
//! checked against a raw model of the same disk: random reads and writes over a qcow2 overlay
//! of a raw backing file, with discards and write-zeroes between them, page cache and
//! `O_DIRECT`, 64 KiB and 512-byte clusters; two queues at once, one discarding while the other
//! has mapped requests in flight. `qemu-img compare` and `qemu-img check` judge the image at
//! the end. qemu-img is needed (under CI=true its absence fails the tests, elsewhere they are
//! skipped loudly).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use block::iov::AlignedBuf;
use block::{Disk, DiskOptions, Engine, EngineKind, Extent, ImageFormat, IoOp, IoSlice};

const SIZE: u64 = 4 << 20;
const PAGE: u64 = 4096;

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tern-qcow2map-{}-{name}", std::process::id()))
}

/// Runs qemu-img; None (skipped loudly) when it is missing outside CI.
fn qemu_img(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("qemu-img").args(args).output() {
        Ok(o) => Some(o),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("qemu-img: {e}"),
        Err(e) => {
            eprintln!("\n*** SKIPPED: qemu-img not available ({e}) ***\n");
            None
        }
    }
}

fn io_uring_disabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim() != "0")
        .unwrap_or(false)
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A raw backing file with a pattern, a qcow2 overlay over it with `cluster` bytes per
/// cluster, and the model (a copy of the backing file). Returns (overlay, backing, model).
fn images(name: &str, cluster: u64) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let (top, base, model) = (
        tmp(&format!("{name}.qcow2")),
        tmp(&format!("{name}-base.raw")),
        tmp(&format!("{name}-model.raw")),
    );
    let data: Vec<u8> = (0..SIZE).map(|i| (i / PAGE % 251) as u8 + 1).collect();
    std::fs::write(&base, &data).unwrap();
    std::fs::write(&model, &data).unwrap();
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster}"),
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        top.to_str().unwrap(),
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some((top, base, model))
}

fn open(path: &Path, direct: bool) -> Arc<Disk> {
    let opts = DiskOptions {
        path: path.to_path_buf(),
        format: Some(ImageFormat::Qcow2),
        direct,
        ..DiskOptions::default()
    };
    Arc::new(Disk::open(&opts).unwrap().0)
}

/// One request of a batch, with the buffer it reads into or writes from.
struct Req {
    op: IoOp,
    offset: u64,
    buf: AlignedBuf,
}

/// Runs random batches of non-overlapping reads and writes over `[lo, hi)` through `engine`,
/// checking every read against `model` and applying every write to it; between batches,
/// sometimes discards or zeroes a range while the batch's requests are still in flight.
fn exercise(engine: &mut Engine, model: &mut [u8], (lo, hi): (u64, u64), seed: u64, rounds: usize) {
    let mut rng = Rng(seed);
    for round in 0..rounds {
        let mut batch: Vec<Req> = Vec::new();
        for _ in 0..1 + rng.below(8) {
            let len = (1 + rng.below(32)) * PAGE;
            let offset = lo + rng.below((hi - lo - len) / PAGE + 1) * PAGE;
            if batch.iter().any(|r| {
                offset < r.offset + r.buf.as_slice().len() as u64 && r.offset < offset + len
            }) {
                continue;
            }
            let mut buf = AlignedBuf::new(len as usize).unwrap();
            let op = if rng.below(2) == 0 {
                buf.as_mut_slice().fill(0xee);
                IoOp::Read
            } else {
                let b = rng.next() as u8 | 1;
                buf.as_mut_slice()
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = b.wrapping_add((i / 512) as u8));
                IoOp::Write
            };
            batch.push(Req { op, offset, buf });
        }
        for (i, r) in batch.iter_mut().enumerate() {
            // Two pieces per request, so requests span buffers as guest ones do.
            let s = r.buf.as_mut_slice();
            let (a, b) = s.split_at_mut(s.len() / 2 / PAGE as usize * PAGE as usize);
            let iov = vec![IoSlice::from_mut(a), IoSlice::from_mut(b)];
            // SAFETY: `batch` outlives the drain below.
            unsafe { engine.submit(r.op, iov, r.offset, i as u64) };
        }
        engine.commit();
        if round % 7 == 3 {
            // A range none of the batch touches, discarded or zeroed with the batch in flight.
            let len = (1 + rng.below(40)) * PAGE;
            let offset = lo + rng.below((hi - lo - len) / PAGE + 1) * PAGE;
            let clear = !batch.iter().any(|r| {
                offset < r.offset + r.buf.as_slice().len() as u64 && r.offset < offset + len
            });
            if clear {
                engine.zero_range(round % 2 == 0, offset, len).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            }
        }
        let mut done = Vec::new();
        engine.drain(&mut done);
        assert_eq!(done.len(), batch.len());
        for c in done {
            c.result.unwrap();
            let r = &batch[c.user_data as usize];
            let range = r.offset as usize..r.offset as usize + r.buf.as_slice().len();
            match r.op {
                IoOp::Read => assert!(
                    r.buf.as_slice() == &model[range.clone()],
                    "read {range:?} differs from the model (round {round})"
                ),
                _ => model[range].copy_from_slice(r.buf.as_slice()),
            }
        }
    }
    let mut done = Vec::new();
    // SAFETY: no buffers.
    unsafe { engine.submit(IoOp::Flush, Vec::new(), 0, 0) };
    engine.drain(&mut done);
    done.pop().unwrap().result.unwrap();
}

/// Whether `image` holds the same data as `model` and is consistent.
fn judge(image: &Path, model: &Path) {
    let out = qemu_img(&[
        "compare",
        "-q",
        model.to_str().unwrap(),
        image.to_str().unwrap(),
    ])
    .expect("qemu-img ran before");
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = qemu_img(&["check", "-q", image.to_str().unwrap()]).unwrap();
    assert!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn one_queue(name: &str, cluster: u64, direct: bool) {
    let Some((top, base, model_path)) = images(name, cluster) else {
        return;
    };
    let disk = open(&top, direct);
    let mut engine = Engine::new(disk.clone(), 64, EngineKind::IoUring);
    if io_uring_disabled() {
        eprintln!("\n*** io_uring is disabled here: only the synchronous path is checked ***\n");
    } else {
        assert_eq!(engine.kind(), EngineKind::IoUring);
    }
    let mut model = std::fs::read(&model_path).unwrap();
    exercise(
        &mut engine,
        &mut model,
        (0, SIZE),
        cluster ^ direct as u64 ^ 0x9e37,
        150,
    );
    drop(engine);
    drop(disk);
    std::fs::write(&model_path, &model).unwrap();
    judge(&top, &model_path);
    for p in [top, base, model_path] {
        std::fs::remove_file(p).ok();
    }
}

#[test]
fn mapped_io_through_the_page_cache() {
    one_queue("cached", 65536, false);
}

#[test]
fn mapped_io_with_o_direct() {
    one_queue("direct", 65536, true);
}

#[test]
fn mapped_io_with_clusters_smaller_than_a_page() {
    one_queue("small", 512, true);
}

#[test]
fn what_maps_and_what_goes_through_imago() {
    let Some((top, base, model)) = images("map", 65536) else {
        return;
    };
    let disk = open(&top, false);
    let Disk::Qcow2(q) = &*disk else {
        panic!("opened as qcow2");
    };
    let mut out = Vec::new();
    // Nothing allocated: reads map to the backing file.
    assert!(q.map(0, 2 * PAGE, false, 16, &mut out));
    q.unmap();
    assert!(
        matches!(out[..], [Extent::Data { offset: 0, len, .. }] if len == 2 * PAGE),
        "{out:?}"
    );
    let backing_fd = match out[0] {
        Extent::Data { fd, .. } => fd,
        Extent::Zero { .. } => unreachable!(),
    };
    // A write allocates the first cluster in the image itself (the rest of the cluster copied
    // from the backing file); reads of it then map there too.
    assert!(q.map(0, PAGE, true, 16, &mut out));
    q.unmap();
    let own_fd = match out[..] {
        [Extent::Data { fd, len: PAGE, .. }] if fd != backing_fd => fd,
        _ => panic!("{out:?}"),
    };
    assert!(q.map(PAGE, PAGE, false, 16, &mut out));
    q.unmap();
    assert!(
        matches!(out[..], [Extent::Data { fd, .. }] if fd == own_fd),
        "{out:?}"
    );
    let mut buf = AlignedBuf::new(PAGE as usize).unwrap();
    let iov = [IoSlice::from_mut(buf.as_mut_slice())];
    // SAFETY: `buf` outlives the call.
    unsafe { disk.readv(&iov, PAGE) }.unwrap();
    assert!(
        buf.as_slice().iter().all(|&b| b == 2),
        "the rest of the cluster holds the backing file's data"
    );
    // Across the end of the allocated cluster: two extents, one per file.
    assert!(q.map(65536 - PAGE, 2 * PAGE, false, 16, &mut out));
    q.unmap();
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(
        !q.map(65536 - PAGE, 2 * PAGE, false, 1, &mut out),
        "more extents than allowed"
    );
    // Discarded: reads as zeroes (not as the backing file).
    disk.discard(0, 65536).unwrap();
    assert!(q.map(0, PAGE, false, 16, &mut out));
    q.unmap();
    assert!(matches!(out[..], [Extent::Zero { len: PAGE }]), "{out:?}");
    // Past the end: not mapped.
    assert!(!q.map(SIZE - PAGE, 2 * PAGE, false, 16, &mut out));
    drop(disk);
    for p in [top, base, model] {
        std::fs::remove_file(p).ok();
    }
}

#[test]
fn one_queue_discards_while_another_has_mapped_requests_in_flight() {
    let Some((top, base, model_path)) = images("two", 65536) else {
        return;
    };
    let disk = open(&top, true);
    let mut model = std::fs::read(&model_path).unwrap();
    let (low, high) = model.split_at_mut((SIZE / 2) as usize);
    std::thread::scope(|s| {
        for (i, (part, range)) in [(low, (0, SIZE / 2)), (high, (SIZE / 2, SIZE))]
            .into_iter()
            .enumerate()
        {
            let disk = disk.clone();
            s.spawn(move || {
                let mut engine = Engine::new(disk, 64, EngineKind::IoUring);
                // The model half is indexed from the start of the disk.
                let mut whole = vec![0u8; SIZE as usize];
                let at = range.0 as usize;
                whole[at..at + part.len()].copy_from_slice(part);
                exercise(&mut engine, &mut whole, range, 77 + i as u64, 200);
                part.copy_from_slice(&whole[at..at + part.len()]);
            });
        }
    });
    drop(disk);
    std::fs::write(&model_path, &model).unwrap();
    judge(&top, &model_path);
    for p in [top, base, model_path] {
        std::fs::remove_file(p).ok();
    }
}
