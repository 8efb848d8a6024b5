//! Host block devices as disks, on real loop devices (root and `losetup` needed: under
//! CI=true their absence fails the test, elsewhere it is skipped loudly): the size comes from
//! the device, its block sizes are known, a writable device is opened exclusively, discard
//! reaches the backing file, write-zeroes zeroes, and a read-only device is opened read-only.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use block::{BlockError, Disk, DiskOptions, ImageFormat, RawDisk};

/// A loop device over a file of its own, detached and removed when dropped.
struct Loop {
    dev: PathBuf,
    file: PathBuf,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// A loop device over a new file of `size` bytes whose first `data` bytes hold data
/// (`read_only`: a read-only loop device); None when this machine cannot make one.
fn loop_device(name: &str, size: u64, data: u64, read_only: bool) -> Option<Loop> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let file = std::env::temp_dir().join(format!("tern-blkdev-{}-{name}", std::process::id()));
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(size).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0xa5; data as usize], 0).unwrap();
    f.sync_all().unwrap();
    let mut cmd = Command::new("losetup");
    cmd.args(["--find", "--show"]);
    if read_only {
        cmd.arg("--read-only");
    }
    let out = root.then(|| cmd.arg(&file).output());
    match out {
        Some(Ok(o)) if o.status.success() => {
            let dev = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            Some(Loop { dev, file })
        }
        other => {
            let _ = std::fs::remove_file(&file);
            let why = match other {
                None => "not root".to_string(),
                Some(Ok(o)) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Some(Err(e)) => format!("losetup: {e}"),
            };
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{name}: cannot make a loop device under CI=true: {why}");
            }
            eprintln!("\n*** SKIPPED {name}: cannot make a loop device ({why}) ***\n");
            None
        }
    }
}

fn allocated(file: &Path) -> u64 {
    std::fs::metadata(file).unwrap().blocks() * 512
}

#[test]
fn a_loop_device_is_a_disk_of_its_size_opened_exclusively_with_discard_and_write_zeroes() {
    let Some(l) = loop_device("rw", 64 << 20, 16 << 20, false) else {
        return;
    };
    let d = RawDisk::open(&l.dev, false).unwrap();
    // The size is the device's (the inode of /dev/loopN says 0).
    assert_eq!(d.size(), 64 << 20);
    assert_eq!(std::fs::metadata(&l.dev).unwrap().len(), 0);
    let bs = d.device().expect("a block device");
    assert!(bs.logical >= 512 && bs.physical >= bs.logical, "{bs:?}");
    assert!(!d.read_only() && !d.forced_read_only());
    // I/O goes to the backing file.
    d.write_at(b"tern on a block device", 20 << 20).unwrap();
    d.flush().unwrap();
    let mut back = [0u8; 22];
    d.read_at(&mut back, 20 << 20).unwrap();
    assert_eq!(&back, b"tern on a block device");
    // A second writer is refused by the device itself (O_EXCL), by name.
    match RawDisk::open(&l.dev, false) {
        Err(e @ BlockError::DeviceBusy(_)) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&*l.dev.to_string_lossy()) && msg.contains("in use"),
                "{msg}"
            );
        }
        other => panic!("a second writable open: {other:?}"),
    }
    // Discard gives the backing file's blocks back.
    let before = allocated(&l.file);
    assert!(before >= 16 << 20, "{before}");
    d.discard(0, 8 << 20).unwrap();
    let after = allocated(&l.file);
    assert!(after + (7 << 20) <= before, "allocated {before} -> {after}");
    // Write-zeroes zeroes.
    d.write_zeroes(8 << 20, 1 << 20).unwrap();
    let mut z = vec![0xffu8; 1 << 20];
    d.read_at(&mut z, 8 << 20).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    let mut rest = [0u8; 16];
    d.read_at(&mut rest, 9 << 20).unwrap();
    assert_eq!(rest, [0xa5; 16]);
    // Beyond the device: refused before any ioctl.
    assert!(matches!(
        d.discard(64 << 20, 4096),
        Err(BlockError::OutOfRange { .. })
    ));
    drop(d);
    // Released: it opens again, and O_DIRECT works on it (whole blocks, as a guest asks).
    let d = RawDisk::open_with(&l.dev, false, true).unwrap();
    let mut again = vec![0u8; 4096];
    d.read_at(&mut again, 20 << 20).unwrap();
    assert_eq!(&again[..22], b"tern on a block device");
}

#[test]
fn a_read_only_device_is_opened_read_only_with_a_warning() {
    let Some(l) = loop_device("ro", 8 << 20, 1 << 20, true) else {
        return;
    };
    let opts = DiskOptions {
        path: l.dev.clone(),
        format: Some(ImageFormat::Raw),
        ..DiskOptions::default()
    };
    let (d, warning) = Disk::open(&opts).unwrap();
    assert!(d.read_only());
    let w = warning.expect("a warning");
    assert!(w.contains("read-only"), "{w}");
    assert!(matches!(
        d.write_zeroes(0, 4096),
        Err(BlockError::ReadOnly(_))
    ));
    // Readers share it.
    let (d2, _) = Disk::open(&opts).unwrap();
    assert_eq!(d2.size(), 8 << 20);
}

#[test]
fn a_block_device_grows_only_after_the_host_grew_it() {
    let Some(l) = loop_device("grow", 32 << 20, 1 << 20, false) else {
        return;
    };
    let opts = DiskOptions {
        path: l.dev.clone(),
        format: Some(ImageFormat::Raw),
        ..DiskOptions::default()
    };
    let (d, _) = Disk::open(&opts).unwrap();
    assert_eq!(d.size(), 32 << 20);
    let e = d.grow(48 << 20).unwrap_err().to_string();
    assert!(e.contains("grow it on the host first"), "{e}");
    assert_eq!(d.size(), 32 << 20);
    // The host grows it: the backing file, then the loop device's capacity.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&l.file)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let o = Command::new("losetup")
        .arg("-c")
        .arg(&l.dev)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    d.grow(48 << 20).unwrap();
    assert_eq!(d.size(), 48 << 20);
    let Disk::Raw(raw) = &d else {
        panic!("a raw disk")
    };
    raw.write_at(b"past the old end", 40 << 20).unwrap();
    raw.flush().unwrap();
    let mut back = [0u8; 16];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&l.file).unwrap(),
        &mut back,
        40 << 20,
    )
    .unwrap();
    assert_eq!(&back, b"past the old end");
}
