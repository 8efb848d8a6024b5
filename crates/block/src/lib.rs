//! Disk images for tern's block devices: opening an image in the right format with a lock
//! against other VMs ([`Disk`]), the raw and qcow2 backends, and the I/O [`engine`] that runs
//! requests through io_uring (or synchronously where the host lacks it).

pub mod engine;
pub mod iov;
mod qcow2;
mod raw;

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub use engine::{Completion, Engine, EngineKind, IoOp};
pub use iov::IoSlice;
pub use qcow2::{named_backing_files, Extent, Qcow2Disk, Qcow2Trust};
pub use raw::{BlockSizes, RawDisk};

/// Image formats tern knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// A plain disk image.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

/// Block errors; each names the image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening failed.
    #[error("cannot open disk image {path}: {err}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// Another process holds the image.
    #[error("disk image {0} is in use by another process (it is locked)")]
    Locked(PathBuf),
    /// The block device is mounted or opened exclusively by another program.
    #[error("block device {0} is in use (mounted, or opened exclusively by another program)")]
    DeviceBusy(PathBuf),
    /// An I/O request failed.
    #[error("I/O error on {path}: {err}")]
    Io {
        /// The image.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// A request reaches past the end of the disk.
    #[error("request at byte {offset} (+{len}) is past the end of {path} ({size} bytes)")]
    OutOfRange {
        /// The image.
        path: PathBuf,
        /// Start of the request.
        offset: u64,
        /// Its length.
        len: u64,
        /// The disk size.
        size: u64,
    },
    /// A write to a read-only disk.
    #[error("{0} is read-only")]
    ReadOnly(PathBuf),
    /// A resize that cannot be done.
    #[error("cannot resize disk {path}: {why}")]
    Resize {
        /// The image.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Detects the format from the first bytes of an image.
pub fn detect_format(head: &[u8]) -> ImageFormat {
    if head.len() >= 4 && &head[0..4] == QCOW2_MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

/// Takes the image lock on `file`: `flock`, exclusive when writable and shared when read-only.
///
/// A lock held elsewhere is tried again for a moment before it is reported: a lock this
/// process has just given up (a disk closed, or removed and added again) lives on in any
/// child being spawned meanwhile by another thread, until that child's `exec` closes its copy
/// of the descriptor.
fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    let mut tries = 0;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(BlockError::Open {
                path: path.to_path_buf(),
                err,
            });
        }
        tries += 1;
        if tries == 10 {
            return Err(BlockError::Locked(path.to_path_buf()));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// One file's image lock, held through a descriptor that shares the disk's open file (so
/// releasing it releases the disk's lock): a migrating VM's source gives its locks up at the
/// switch-over and its destination takes them.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
    shared: bool,
}

impl ImageLock {
    /// `file`'s lock (`shared`: the shared lock of a file only read).
    fn of(file: &File, path: &Path, shared: bool) -> Result<ImageLock, BlockError> {
        Ok(ImageLock {
            file: file.try_clone().map_err(|err| BlockError::Open {
                path: path.to_path_buf(),
                err,
            })?,
            path: path.to_path_buf(),
            shared,
        })
    }

    /// Takes the lock (fails at once, naming the file, when another process holds it).
    pub fn acquire(&self) -> Result<(), BlockError> {
        lock(&self.file, &self.path, self.shared)
    }

    /// Gives the lock up.
    pub fn release(&self) {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }

    /// The locked file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Fails unless `[offset, offset + len)` lies within a disk of `size` bytes.
fn check_range(path: &Path, offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len,
            size,
        }),
    }
}

/// How to open a disk image.
///
/// The format is either stated by the user, or probed from the image's first bytes. A probed
/// format is never trusted: whoever wrote the image chose it (a guest can write a qcow2 header
/// into its raw disk), so a probed qcow2 image gets no backing or data file opened. A VM probes
/// each disk once, when it is first built, and keeps that answer (`probed`) across reboots
/// and snapshots, so a guest cannot change its disk's format under it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskOptions {
    /// The image file.
    pub path: PathBuf,
    /// The format the user stated.
    pub format: Option<ImageFormat>,
    /// Without a stated format: the format probed when this VM first opened the image (probed
    /// again when `None`).
    pub probed: Option<ImageFormat>,
    /// The external data file a qcow2 image may use (only with a stated format).
    pub data_file: Option<PathBuf>,
    /// Refuse writes; the image is opened read-only and locked shared.
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`, `cache=none`).
    pub direct: bool,
}

/// Reads an image's first bytes and tells its format.
pub fn probe_format(path: &Path) -> Result<ImageFormat, BlockError> {
    let mut head = [0u8; 4];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|err| BlockError::Open {
            path: path.to_path_buf(),
            err,
        })?;
    Ok(detect_format(&head[..n]))
}

/// An open disk image of either format.
#[derive(Debug)]
pub enum Disk {
    /// A raw image.
    Raw(RawDisk),
    /// A qcow2 image (with its backing chain).
    Qcow2(Qcow2Disk),
}

impl Disk {
    /// Opens and locks an image. Returns a warning to show the user when the image does not
    /// look like the format it is opened as (the stated or earlier probed format is used).
    pub fn open(opts: &DiskOptions) -> Result<(Disk, Option<String>), BlockError> {
        Self::open_locking(opts, true)
    }

    /// Opens an image as [`open`](Self::open) does, without taking its locks: a VM migrating
    /// in, whose source still holds them, takes them with [`locks`](Self::locks) at the
    /// switch-over.
    pub fn open_unlocked(opts: &DiskOptions) -> Result<(Disk, Option<String>), BlockError> {
        Self::open_locking(opts, false)
    }

    fn open_locking(
        opts: &DiskOptions,
        take_locks: bool,
    ) -> Result<(Disk, Option<String>), BlockError> {
        let path = opts.path.as_path();
        let detected = probe_format(path)?;
        let mut warning = None;
        let format = match (opts.format, opts.probed) {
            (Some(f), _) if f != detected => {
                warning = Some(format!(
                    "disk {}: format={f} was given but the image looks like {detected}; using {f}",
                    path.display()
                ));
                f
            }
            (Some(f), _) => f,
            (None, Some(f)) if f != detected => {
                warning = Some(format!(
                    "disk {}: the image now looks like {detected}, but it was {f} when this VM \
                     started; it stays {f}",
                    path.display()
                ));
                f
            }
            (None, Some(f)) => f,
            (None, None) => detected,
        };
        if opts.data_file.is_some() && opts.format != Some(ImageFormat::Qcow2) {
            return Err(BlockError::Open {
                path: path.to_path_buf(),
                err: std::io::Error::other("data_file= needs format=qcow2"),
            });
        }
        let disk = match format {
            ImageFormat::Raw => {
                let d = RawDisk::open_locking(path, opts.read_only, opts.direct, take_locks)?;
                if d.forced_read_only() {
                    warning = Some(format!(
                        "disk {}: the block device is read-only; the guest gets it read-only",
                        path.display()
                    ));
                }
                Disk::Raw(d)
            }
            ImageFormat::Qcow2 => {
                let trust = Qcow2Trust {
                    backing: opts.format.is_some(),
                    data_file: opts.data_file.clone(),
                };
                Disk::Qcow2(Qcow2Disk::open_locking(
                    path,
                    opts.read_only,
                    opts.direct,
                    &trust,
                    take_locks,
                )?)
            }
        };
        Ok((disk, warning))
    }

    /// The locks of every file of the image (one for a raw image; the image, its data file
    /// and its backing chain for qcow2), each on a descriptor of its own sharing the open
    /// file: released and taken again when the VM moves to another tern.
    pub fn locks(&self) -> Result<Vec<ImageLock>, BlockError> {
        match self {
            Disk::Raw(d) => d.locks(),
            Disk::Qcow2(d) => d.locks(),
        }
    }

    /// The block sizes when the image is a raw host block device.
    pub fn device_block_sizes(&self) -> Option<BlockSizes> {
        match self {
            Disk::Raw(d) => d.device(),
            Disk::Qcow2(_) => None,
        }
    }

    /// The image format.
    pub fn format(&self) -> ImageFormat {
        match self {
            Disk::Raw(_) => ImageFormat::Raw,
            Disk::Qcow2(_) => ImageFormat::Qcow2,
        }
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Raw(d) => d.size(),
            Disk::Qcow2(d) => d.size(),
        }
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        match self {
            Disk::Raw(d) => d.path(),
            Disk::Qcow2(d) => d.path(),
        }
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        match self {
            Disk::Raw(d) => d.read_only(),
            Disk::Qcow2(d) => d.read_only(),
        }
    }

    /// Grows the disk to `new_size` bytes while it is in use: a file is extended (sparse), a
    /// qcow2 image gets a larger virtual size (the new range reads as zeroes, whatever its
    /// backing image holds there), and a block device, which tern cannot grow, must have been
    /// grown on the host first (`lvextend`, `losetup -c`, …). The same size is a no-op;
    /// shrinking is refused (the guest's data past the new end would be lost), as are read-only
    /// disks and sizes that are not whole sectors (logical blocks on a block device).
    pub fn grow(&self, new_size: u64) -> Result<(), BlockError> {
        let refuse = |why: String| BlockError::Resize {
            path: self.path().to_path_buf(),
            why,
        };
        let size = self.size();
        if new_size == size {
            return Ok(());
        }
        if self.read_only() {
            return Err(refuse("it is read-only".into()));
        }
        if new_size < size {
            return Err(refuse(format!(
                "{new_size} bytes is smaller than its {size} bytes, and shrinking a disk in use is not supported"
            )));
        }
        let unit = self
            .device_block_sizes()
            .map_or(512, |b| u64::from(b.logical));
        if !new_size.is_multiple_of(unit) {
            return Err(refuse(format!(
                "{new_size} bytes is not a multiple of its {unit}-byte blocks"
            )));
        }
        match self {
            Disk::Raw(d) => d.grow(new_size),
            Disk::Qcow2(d) => d.grow(new_size),
        }
    }

    /// Reads into `iov` from `offset` on.
    ///
    /// # Safety
    /// Every buffer must be valid for writes of its length for the duration of the call.
    pub unsafe fn readv(&self, iov: &[IoSlice], offset: u64) -> Result<(), BlockError> {
        // SAFETY: forwarded from the caller.
        unsafe {
            match self {
                Disk::Raw(d) => d.readv(iov, offset),
                Disk::Qcow2(d) => d.readv(iov, offset),
            }
        }
    }

    /// Writes `iov` at `offset`.
    ///
    /// # Safety
    /// Every buffer must be valid for reads of its length for the duration of the call.
    pub unsafe fn writev(&self, iov: &[IoSlice], offset: u64) -> Result<(), BlockError> {
        // SAFETY: forwarded from the caller.
        unsafe {
            match self {
                Disk::Raw(d) => d.writev(iov, offset),
                Disk::Qcow2(d) => d.writev(iov, offset),
            }
        }
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> Result<(), BlockError> {
        match self {
            Disk::Raw(d) => d.flush(),
            Disk::Qcow2(d) => d.flush(),
        }
    }

    /// Deallocates a range; it reads as zeroes afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match self {
            Disk::Raw(d) => d.discard(offset, len),
            Disk::Qcow2(d) => d.discard(offset, len),
        }
    }

    /// Zeroes a range (deallocating where possible).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match self {
            Disk::Raw(d) => d.write_zeroes(offset, len),
            Disk::Qcow2(d) => d.write_zeroes(offset, len),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn formats() {
        assert_eq!(detect_format(b"QFI\xfb\0\0\0\x03"), ImageFormat::Qcow2);
        assert_eq!(detect_format(b"\0\0\0\0"), ImageFormat::Raw);
        assert_eq!(detect_format(b"QF"), ImageFormat::Raw);
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tern-disk-{}-{name}", std::process::id()))
    }

    fn qemu_img(args: &[&str]) -> Option<std::process::Output> {
        match Command::new("qemu-img").args(args).output() {
            Ok(o) => Some(o),
            Err(e) if std::env::var_os("CI").is_some() => panic!("qemu-img: {e}"),
            Err(e) => {
                eprintln!("SKIP: qemu-img not available ({e})");
                None
            }
        }
    }

    fn opts(path: &Path, format: Option<ImageFormat>, read_only: bool) -> DiskOptions {
        DiskOptions {
            path: path.to_path_buf(),
            format,
            read_only,
            ..DiskOptions::default()
        }
    }

    #[test]
    fn a_qcow2_overlay_takes_the_writes_and_leaves_its_base_alone() {
        let base = tmp("base.raw");
        let overlay = tmp("overlay.qcow2");
        let pattern: Vec<u8> = (0..4u32 << 20).map(|i| (i / 4096) as u8).collect();
        std::fs::write(&base, &pattern).unwrap();
        let Some(o) = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            overlay.to_str().unwrap(),
        ]) else {
            return;
        };
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (d, warning) = Disk::open(&opts(&overlay, Some(ImageFormat::Qcow2), false)).unwrap();
        assert!(warning.is_none());
        assert_eq!(d.format(), ImageFormat::Qcow2);
        assert_eq!(d.size(), 4 << 20);
        // Reads come from the base.
        let mut buf = vec![0u8; 8192];
        let iov = [IoSlice::from_mut(&mut buf)];
        // SAFETY: `buf` is live and exclusively borrowed through `iov` for the call.
        unsafe { d.readv(&iov, 4096 * 5).unwrap() };
        assert_eq!(&buf[..4096], &[5u8; 4096][..]);
        assert_eq!(&buf[4096..], &[6u8; 4096][..]);
        // Writes land in the overlay.
        let data = vec![0xcdu8; 65536];
        let iov = [IoSlice::from_ref(&data)];
        // SAFETY: `data` is live for the call.
        unsafe { d.writev(&iov, 1 << 20).unwrap() };
        d.write_zeroes(2 << 20, 65536).unwrap();
        d.discard(3 << 20, 65536).unwrap();
        d.flush().unwrap();
        // A second writer is refused while it is open; the base is locked shared.
        assert!(matches!(
            Disk::open(&opts(&overlay, Some(ImageFormat::Qcow2), false)),
            Err(BlockError::Locked(_))
        ));
        assert!(matches!(
            Disk::open(&opts(&base, None, false)),
            Err(BlockError::Locked(_))
        ));
        drop(Disk::open(&opts(&base, None, true)).expect("a shared reader of the base"));
        drop(d);
        assert_eq!(std::fs::read(&base).unwrap(), pattern, "base changed");
        let o = qemu_img(&["check", "-q", overlay.to_str().unwrap()]).unwrap();
        assert!(
            o.status.success(),
            "qemu-img check: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let flat = tmp("flat.raw");
        let o = qemu_img(&[
            "convert",
            "-O",
            "raw",
            overlay.to_str().unwrap(),
            flat.to_str().unwrap(),
        ])
        .unwrap();
        assert!(o.status.success());
        let flat_data = std::fs::read(&flat).unwrap();
        assert_eq!(&flat_data[1 << 20..(1 << 20) + 65536], &data[..]);
        assert!(flat_data[2 << 20..(2 << 20) + 65536]
            .iter()
            .all(|&b| b == 0));
        assert!(flat_data[3 << 20..(3 << 20) + 65536]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(&flat_data[..1 << 20], &pattern[..1 << 20]);
        for p in [base, overlay, flat] {
            std::fs::remove_file(p).ok();
        }
    }

    fn read(d: &Disk, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let iov = [IoSlice::from_mut(&mut buf)];
        // SAFETY: `buf` is live and exclusively borrowed through `iov` for the call.
        unsafe { d.readv(&iov, offset).unwrap() };
        buf
    }

    fn write(d: &Disk, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        let iov = [IoSlice::from_ref(data)];
        // SAFETY: `data` is live for the call.
        unsafe { d.writev(&iov, offset) }
    }

    #[test]
    fn a_raw_file_grows_while_open_and_refuses_to_shrink() {
        let p = tmp("grow.raw");
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        let (d, _) = Disk::open(&opts(&p, None, false)).unwrap();
        assert!(write(&d, 1 << 20, &[1u8; 512]).is_err(), "past the end");
        d.grow(3 << 20).unwrap();
        assert_eq!(d.size(), 3 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 3 << 20);
        assert_eq!(read(&d, (2 << 20) + 4096, 512), vec![0u8; 512]);
        write(&d, (3 << 20) - 512, &[9u8; 512]).unwrap();
        d.grow(3 << 20).expect("the same size is a no-op");
        for (size, why) in [
            (2 << 20, "shrinking"),
            ((4 << 20) + 100, "multiple of its 512-byte blocks"),
        ] {
            let e = d.grow(size).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("grow.raw"), "{e}");
        }
        assert_eq!(d.size(), 3 << 20);
        drop(d);
        let (ro, _) = Disk::open(&opts(&p, None, true)).unwrap();
        let e = ro.grow(4 << 20).unwrap_err().to_string();
        assert!(e.contains("read-only"), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 3 << 20);
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn a_qcow2_image_grows_and_its_longer_backing_does_not_show_through() {
        let base = tmp("grow-base.raw");
        let overlay = tmp("grow-overlay.qcow2");
        std::fs::write(&base, vec![0x5au8; 4 << 20]).unwrap();
        let Some(o) = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            overlay.to_str().unwrap(),
            "2M",
        ]) else {
            return;
        };
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (d, _) = Disk::open(&opts(&overlay, Some(ImageFormat::Qcow2), false)).unwrap();
        assert_eq!(d.size(), 2 << 20);
        assert_eq!(read(&d, 0, 512), vec![0x5a; 512]);
        d.grow(6 << 20).unwrap();
        assert_eq!(d.size(), 6 << 20);
        // The base's bytes past the old end stay hidden; the old range still shows them.
        assert_eq!(read(&d, 3 << 20, 4096), vec![0u8; 4096]);
        assert_eq!(read(&d, (2 << 20) - 512, 512), vec![0x5a; 512]);
        write(&d, (6 << 20) - 4096, &[3u8; 4096]).unwrap();
        d.flush().unwrap();
        drop(d);
        let o = qemu_img(&["info", "--output=json", overlay.to_str().unwrap()]).unwrap();
        let info = String::from_utf8_lossy(&o.stdout);
        assert!(
            info.contains(&format!("\"virtual-size\": {}", 6 << 20)),
            "{info}"
        );
        let o = qemu_img(&["check", "-q", overlay.to_str().unwrap()]).unwrap();
        assert!(
            o.status.success(),
            "qemu-img check: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let (d, _) = Disk::open(&opts(&overlay, Some(ImageFormat::Qcow2), true)).unwrap();
        assert_eq!(d.size(), 6 << 20);
        assert_eq!(read(&d, (6 << 20) - 4096, 4096), vec![3u8; 4096]);
        for p in [base, overlay] {
            std::fs::remove_file(p).ok();
        }
    }

    #[test]
    fn stated_and_detected_formats() {
        let q = tmp("stated.qcow2");
        let Some(o) = qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "1M"]) else {
            return;
        };
        assert!(o.status.success());
        // Stated raw on a qcow2 image: used as raw, with a warning.
        let (d, w) = Disk::open(&opts(&q, Some(ImageFormat::Raw), true)).unwrap();
        assert_eq!(d.format(), ImageFormat::Raw);
        assert!(w.unwrap().contains("looks like qcow2"));
        drop(d);
        // A corrupt qcow2 header is a clear error.
        let mut bytes = std::fs::read(&q).unwrap();
        bytes[4..8].copy_from_slice(&[0, 0, 0, 9]); // version 9
        std::fs::write(&q, &bytes).unwrap();
        let e = Disk::open(&opts(&q, None, false)).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot open disk image {}", q.display())),
            "{e}"
        );
        std::fs::remove_file(q).ok();
    }

    fn qemu_img_ok(args: &[&str]) -> bool {
        match qemu_img(args) {
            Some(o) => {
                assert!(
                    o.status.success(),
                    "qemu-img {args:?}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                true
            }
            None => false,
        }
    }

    #[test]
    fn a_probed_image_never_opens_the_files_its_header_names() {
        let secret = tmp("probed-secret");
        std::fs::write(&secret, vec![0x77u8; 65536]).unwrap();
        let img = tmp("probed.img");
        if !qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            secret.to_str().unwrap(),
            "-F",
            "raw",
            img.to_str().unwrap(),
        ]) {
            return;
        }
        // Probed: the backing file is refused, by name.
        let e = Disk::open(&opts(&img, None, false))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("names a backing file") && e.contains(secret.to_str().unwrap()),
            "{e}"
        );
        assert!(e.contains("format=qcow2"), "{e}");
        // Probed earlier (a restart, a restore) is no different.
        let mut o = opts(&img, None, false);
        o.probed = Some(ImageFormat::Qcow2);
        assert!(Disk::open(&o).is_err());
        // Stated: the user vouches for the header, and the backing file is read.
        let (d, _) = Disk::open(&opts(&img, Some(ImageFormat::Qcow2), true)).unwrap();
        let mut buf = vec![0u8; 512];
        let iov = [IoSlice::from_mut(&mut buf)];
        // SAFETY: `buf` is live and exclusively borrowed through `iov` for the call.
        unsafe { d.readv(&iov, 0).unwrap() };
        assert_eq!(buf, vec![0x77u8; 512]);
        drop(d);
        // A format probed earlier wins over what the image looks like now.
        let mut o = opts(&img, None, true);
        o.probed = Some(ImageFormat::Raw);
        let (d, w) = Disk::open(&o).unwrap();
        assert_eq!(d.format(), ImageFormat::Raw);
        assert!(w.unwrap().contains("it stays raw"));
        for p in [secret, img] {
            std::fs::remove_file(p).ok();
        }
    }

    #[test]
    fn an_external_data_file_is_opened_only_when_named_by_the_user() {
        let data = tmp("ext.data");
        let other = tmp("ext.other");
        std::fs::write(&other, b"x").unwrap();
        let img = tmp("ext.qcow2");
        let spec = format!("data_file={},data_file_raw=on", data.display());
        if !qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &spec,
            img.to_str().unwrap(),
            "1M",
        ]) {
            return;
        }
        let stated = |data_file: Option<&Path>| DiskOptions {
            data_file: data_file.map(Path::to_path_buf),
            ..opts(&img, Some(ImageFormat::Qcow2), false)
        };
        for e in [
            Disk::open(&opts(&img, None, false))
                .unwrap_err()
                .to_string(),
            Disk::open(&stated(None)).unwrap_err().to_string(),
            Disk::open(&stated(Some(&other))).unwrap_err().to_string(),
        ] {
            assert!(
                e.contains("external data file") && e.contains(data.to_str().unwrap()),
                "{e}"
            );
        }
        let (d, _) = Disk::open(&stated(Some(&data))).unwrap();
        let buf = vec![0xabu8; 4096];
        let iov = [IoSlice::from_ref(&buf)];
        // SAFETY: `buf` is live for the call.
        unsafe { d.writev(&iov, 8192).unwrap() };
        d.flush().unwrap();
        drop(d);
        assert_eq!(&std::fs::read(&data).unwrap()[8192..8192 + 4096], &buf[..]);
        for p in [data, other, img] {
            std::fs::remove_file(p).ok();
        }
    }

    #[test]
    fn backing_chains_that_loop_or_hide_their_format_are_refused() {
        let a = tmp("loop-a.qcow2");
        let b = tmp("loop-b.qcow2");
        let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
        if !qemu_img_ok(&["create", "-q", "-f", "qcow2", sa, "1M"]) {
            return;
        }
        assert!(qemu_img_ok(&[
            "create", "-q", "-f", "qcow2", "-b", sa, "-F", "qcow2", sb
        ]));
        // a -> b -> a.
        assert!(qemu_img_ok(&[
            "rebase", "-q", "-u", "-f", "qcow2", "-b", sb, "-F", "qcow2", sa
        ]));
        let e = Disk::open(&opts(&b, Some(ImageFormat::Qcow2), true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("loops back"), "{e}");
        // A backing file without its format would be probed: refused. (qemu-img no longer
        // writes such headers: drop the backing-format extension by ending the extension list
        // at its magic.)
        assert!(qemu_img_ok(&[
            "rebase", "-q", "-u", "-f", "qcow2", "-b", "", sa
        ]));
        let mut bytes = std::fs::read(&b).unwrap();
        let at = bytes[..4096]
            .windows(4)
            .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
            .expect("a backing-format header extension");
        bytes[at..at + 4].fill(0);
        std::fs::write(&b, &bytes).unwrap();
        let e = Disk::open(&opts(&b, Some(ImageFormat::Qcow2), true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("without its format"), "{e}");
        for p in [a, b] {
            std::fs::remove_file(p).ok();
        }
    }

    #[test]
    fn a_header_imago_would_panic_on_is_refused() {
        // Found by the qcow2 fuzz target: a feature name table of 49 bytes.
        let bytes =
            include_bytes!("../../../fuzz/regressions/qcow2/feature-name-table-of-49-bytes");
        let img = tmp("ft49.qcow2");
        std::fs::write(&img, bytes).unwrap();
        for format in [None, Some(ImageFormat::Qcow2)] {
            let e = Disk::open(&opts(&img, format, true))
                .unwrap_err()
                .to_string();
            assert!(e.contains("feature name table is 49 bytes"), "{e}");
        }
        std::fs::remove_file(img).ok();
    }

    #[test]
    fn the_backing_files_a_header_names_are_listed_down_the_chain() {
        let dir = std::env::temp_dir().join(format!("tern-block-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let header = |name: &[u8]| {
            let mut h = vec![0u8; 512];
            h[..4].copy_from_slice(b"QFI\xfb");
            h[7] = 3;
            h[8..16].copy_from_slice(&200u64.to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            h[200..200 + name.len()].copy_from_slice(name);
            h
        };
        let (top, mid) = (dir.join("top.qcow2"), dir.join("mid.qcow2"));
        std::fs::write(&top, header(b"mid.qcow2")).unwrap();
        std::fs::write(&mid, header(b"/nonexistent/base.raw")).unwrap();
        assert_eq!(
            named_backing_files(&top).unwrap(),
            vec![mid.clone(), PathBuf::from("/nonexistent/base.raw")]
        );
        // A loop is refused, and a file that is not qcow2 names nothing.
        std::fs::write(&mid, header(b"top.qcow2")).unwrap();
        assert!(named_backing_files(&top).is_err());
        std::fs::write(&top, [0u8; 512]).unwrap();
        assert!(named_backing_files(&top).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
