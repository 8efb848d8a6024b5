//! Raw images: a plain file or a host block device (an LVM volume, a loop, nbd or iSCSI
//! device, a zvol), read and written with positioned vectored I/O (`preadv`/`pwritev`), opened
//! with `O_DIRECT` for `cache=none` (unaligned guest buffers then go through an aligned bounce
//! buffer).
//!
//! - A file: its size from its inode; discard and write-zeroes punch holes.
//! - A block device: its size from the device (`BLKGETSIZE64`), its logical and physical block
//!   sizes (`BLKSSZGET`, `BLKPBSZGET`) for the guest; discard is `BLKDISCARD` and
//!   write-zeroes `BLKZEROOUT`; a device the kernel marks read-only (`BLKROGET`) is opened
//!   read-only whatever was asked; a writable one is opened exclusively (`O_EXCL`: the kernel
//!   refuses it while another program has it open exclusively or it is mounted) besides the
//!   `flock` every image takes.
//!
//! The block-device ioctls are few and stable; no maintained crate wraps them, so their
//! numbers are written here.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::iov::{self, IoSlice};
use crate::{lock, BlockError};

/// `BLKGETSIZE64`: the device's size in bytes (`_IOR(0x12, 114, size_t)`).
pub const BLKGETSIZE64: u64 = 0x8008_1272;
/// `BLKSSZGET`: the logical block size.
pub const BLKSSZGET: u64 = 0x1268;
/// `BLKPBSZGET`: the physical block size.
pub const BLKPBSZGET: u64 = 0x127b;
/// `BLKROGET`: whether the device is read-only.
pub const BLKROGET: u64 = 0x125e;
/// `BLKDISCARD`: discard a byte range (`[start, len]`).
pub const BLKDISCARD: u64 = 0x1277;
/// `BLKZEROOUT`: zero a byte range (`[start, len]`).
pub const BLKZEROOUT: u64 = 0x127f;

/// A host block device's block sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// The smallest unit the device addresses (512 or 4096).
    pub logical: u32,
    /// The unit it writes internally (at least `logical`).
    pub physical: u32,
}

/// A raw disk image, locked against other writers (and, when writable, other readers).
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    path: PathBuf,
    /// Grows while the disk is in use ([`grow`](Self::grow)).
    size: AtomicU64,
    read_only: bool,
    direct: bool,
    /// The block sizes when the image is a host block device.
    device: Option<BlockSizes>,
    /// The device is read-only although a writable disk was asked for.
    forced_read_only: bool,
}

/// `ioctl(fd, request, arg)` returning an integer through `arg`.
fn ioctl_get<T: Default>(file: &File, request: u64) -> std::io::Result<T> {
    let mut v = T::default();
    // SAFETY: each request used with this writes exactly one `T` through its argument, which
    // points at `v`; the descriptor is ours.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request as _, &mut v as *mut T) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

impl RawDisk {
    /// Opens `path` (buffered), see [`open_with`](Self::open_with).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        Self::open_with(path, read_only, false)
    }

    /// Opens `path`, with `O_DIRECT` when `direct`, taking a `flock`: exclusive when writable,
    /// shared when read-only, so two VMs cannot both write one image.
    pub fn open_with(path: &Path, read_only: bool, direct: bool) -> Result<Self, BlockError> {
        Self::open_locking(path, read_only, direct, true)
    }

    /// [`open_with`](Self::open_with), taking the lock only when `take_lock`.
    pub fn open_locking(
        path: &Path,
        read_only: bool,
        direct: bool,
        take_lock: bool,
    ) -> Result<Self, BlockError> {
        use std::os::unix::fs::FileTypeExt;
        let open_err = |err| BlockError::Open {
            path: path.to_path_buf(),
            err,
        };
        let is_device = std::fs::metadata(path)
            .map_err(open_err)?
            .file_type()
            .is_block_device();
        // A device the kernel keeps read-only is opened read-only.
        let forced_read_only = is_device
            && !read_only
            && File::open(path)
                .and_then(|f| ioctl_get::<libc::c_int>(&f, BLKROGET))
                .map_err(open_err)?
                != 0;
        let read_only = read_only || forced_read_only;
        let mut flags = if direct { libc::O_DIRECT } else { 0 };
        if is_device && !read_only && take_lock {
            flags |= libc::O_EXCL;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|err| match err.raw_os_error() {
                Some(libc::EBUSY) if is_device => BlockError::DeviceBusy(path.to_path_buf()),
                _ => open_err(err),
            })?;
        if take_lock {
            lock(&file, path, read_only)?;
        }
        let (size, device) = if is_device {
            let size = ioctl_get::<u64>(&file, BLKGETSIZE64).map_err(open_err)?;
            let logical = ioctl_get::<libc::c_int>(&file, BLKSSZGET).map_err(open_err)?;
            let physical = ioctl_get::<libc::c_uint>(&file, BLKPBSZGET).map_err(open_err)?;
            let logical = u32::try_from(logical).unwrap_or(512).max(512);
            let sizes = BlockSizes {
                logical,
                physical: physical.max(logical),
            };
            (size, Some(sizes))
        } else {
            (file.metadata().map_err(open_err)?.len(), None)
        };
        Ok(RawDisk {
            file,
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            read_only,
            direct,
            device,
            forced_read_only,
        })
    }

    /// The block sizes when the image is a host block device.
    pub fn device(&self) -> Option<BlockSizes> {
        self.device
    }

    /// Whether the image is a block device the kernel keeps read-only, opened read-only
    /// although a writable disk was asked for.
    pub fn forced_read_only(&self) -> bool {
        self.forced_read_only
    }

    /// Its image lock (see [`crate::ImageLock`]).
    pub fn locks(&self) -> Result<Vec<crate::ImageLock>, BlockError> {
        Ok(vec![crate::ImageLock::of(
            &self.file,
            &self.path,
            self.read_only,
        )?])
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    /// Grows the disk to `new_size` (larger than now, whole blocks: see
    /// [`Disk::grow`](crate::Disk::grow)): a file is extended first, so that no request the new
    /// size admits finds it short; a block device must already be that large.
    pub fn grow(&self, new_size: u64) -> Result<(), BlockError> {
        let refuse = |why: String| BlockError::Resize {
            path: self.path.clone(),
            why,
        };
        if self.device.is_some() {
            let now = ioctl_get::<u64>(&self.file, BLKGETSIZE64).map_err(|e| self.io(e))?;
            if now < new_size {
                return Err(refuse(format!(
                    "the block device holds only {now} bytes; grow it on the host first"
                )));
            }
        } else {
            self.file.set_len(new_size).map_err(|e| self.io(e))?;
        }
        self.size.store(new_size, Ordering::SeqCst);
        Ok(())
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the file is open with `O_DIRECT`.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The open file, for I/O engines that submit requests themselves.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        crate::check_range(&self.path, offset, len, self.size())
    }

    fn io(&self, err: std::io::Error) -> BlockError {
        BlockError::Io {
            path: self.path.clone(),
            err,
        }
    }

    fn writable(&self) -> Result<(), BlockError> {
        if self.read_only {
            Err(BlockError::ReadOnly(self.path.clone()))
        } else {
            Ok(())
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let iov = [IoSlice::from_mut(buf)];
        // SAFETY: `iov` describes `buf`, exclusively borrowed for the call.
        unsafe { self.readv(&iov, offset) }
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let iov = [IoSlice::from_ref(buf)];
        // SAFETY: `iov` describes `buf`, borrowed for the call and only read.
        unsafe { self.writev(&iov, offset) }
    }

    /// Reads into the buffers `iov` from `offset` on.
    ///
    /// # Safety
    /// Every buffer must be valid for writes of its length for the duration of the call.
    pub unsafe fn readv(&self, iov: &[IoSlice], offset: u64) -> Result<(), BlockError> {
        let len = iov::total(iov);
        self.check(offset, len)?;
        if self.direct && !iov::aligned(iov, offset) {
            let mut bounce = iov::AlignedBuf::new(len as usize).map_err(|e| self.io(e))?;
            self.file
                .read_exact_at(bounce.as_mut_slice(), offset)
                .map_err(|e| self.io(e))?;
            // SAFETY: the caller guarantees `iov` is writable; `bounce` holds `len` bytes.
            unsafe { iov::scatter(iov, bounce.as_slice()) };
            return Ok(());
        }
        // SAFETY: forwarded from the caller.
        unsafe { iov::preadv_all(self.fd(), iov, offset) }.map_err(|e| self.io(e))
    }

    /// Writes the buffers `iov` at `offset`.
    ///
    /// # Safety
    /// Every buffer must be valid for reads of its length for the duration of the call.
    pub unsafe fn writev(&self, iov: &[IoSlice], offset: u64) -> Result<(), BlockError> {
        self.writable()?;
        let len = iov::total(iov);
        self.check(offset, len)?;
        if self.direct && !iov::aligned(iov, offset) {
            let mut bounce = iov::AlignedBuf::new(len as usize).map_err(|e| self.io(e))?;
            // SAFETY: the caller guarantees `iov` is readable; `bounce` holds `len` bytes.
            unsafe { iov::gather(iov, bounce.as_mut_slice()) };
            return self
                .file
                .write_all_at(bounce.as_slice(), offset)
                .map_err(|e| self.io(e));
        }
        // SAFETY: forwarded from the caller.
        unsafe { iov::pwritev_all(self.fd(), iov, offset) }.map_err(|e| self.io(e))
    }

    /// Makes written data durable.
    pub fn flush(&self) -> Result<(), BlockError> {
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// Deallocates `[offset, offset + len)` (discard): a file reads zeroes there afterwards;
    /// a device reads whatever it keeps for discarded blocks.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.device.is_some() {
            return self.range_ioctl(BLKDISCARD, offset, len);
        }
        self.punch_hole(offset, len)
    }

    /// Zeroes `[offset, offset + len)`, deallocating it where the file system (or the device)
    /// can.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.device.is_some() {
            return self.range_ioctl(BLKZEROOUT, offset, len);
        }
        match self.punch_hole(offset, len) {
            Err(BlockError::Io { err, .. }) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // No hole punching here: write zeroes.
                let mut zeroes = iov::AlignedBuf::new(64 << 10).map_err(|e| self.io(e))?;
                zeroes.as_mut_slice().fill(0);
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(64 << 10) as usize;
                    self.write_at(&zeroes.as_slice()[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            r => r,
        }
    }

    /// `BLKDISCARD` or `BLKZEROOUT` over a byte range of the device.
    fn range_ioctl(&self, request: u64, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable()?;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let range: [u64; 2] = [offset, len];
        // SAFETY: both requests read a `[u64; 2]` (start, length) through the argument, which
        // points at `range`; the descriptor is ours and the range lies within the device.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), request as _, range.as_ptr()) };
        if r < 0 {
            return Err(self.io(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable()?;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (off, l) = (offset as libc::off_t, len as libc::off_t);
        // SAFETY: fallocate on a descriptor we own, with a range checked against the size.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r != 0 {
            return Err(self.io(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Bytes the image occupies on disk (allocated blocks), for checking discards.
    pub fn allocated_bytes(&self) -> Result<u64, BlockError> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata().map_err(|e| self.io(e))?.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn image(name: &str, size: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tern-block-{}-{name}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    #[test]
    fn read_write_flush_and_bounds() {
        let p = image("rw", 1 << 20);
        let d = RawDisk::open(&p, false).unwrap();
        assert_eq!(d.size(), 1 << 20);
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        d.write_at(&data, 8192).unwrap();
        d.flush().unwrap();
        let mut back = vec![0u8; 4096];
        d.read_at(&mut back, 8192).unwrap();
        assert_eq!(back, data);
        assert!(matches!(
            d.read_at(&mut back, (1 << 20) - 100),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.write_at(&data, u64::MAX - 10),
            Err(BlockError::OutOfRange { .. })
        ));
        drop(d);
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn read_only_refuses_writes_and_leaves_the_file_alone() {
        let p = image("ro", 64 << 10);
        std::fs::write(&p, vec![7u8; 64 << 10]).unwrap();
        let d = RawDisk::open(&p, true).unwrap();
        assert!(matches!(
            d.write_at(&[1, 2, 3], 0),
            Err(BlockError::ReadOnly(_))
        ));
        assert!(matches!(d.discard(0, 4096), Err(BlockError::ReadOnly(_))));
        assert!(matches!(
            d.write_zeroes(0, 4096),
            Err(BlockError::ReadOnly(_))
        ));
        drop(d);
        assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 64 << 10]);
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn a_writable_image_is_locked_against_a_second_opener() {
        let p = image("lock", 64 << 10);
        let first = RawDisk::open(&p, false).unwrap();
        let e = RawDisk::open(&p, false).unwrap_err();
        assert!(matches!(e, BlockError::Locked(_)), "{e}");
        assert!(e.to_string().contains("in use by another process"));
        assert!(matches!(
            RawDisk::open(&p, true),
            Err(BlockError::Locked(_))
        ));
        drop(first);
        // Read-only openers share.
        let a = RawDisk::open(&p, true).unwrap();
        let b = RawDisk::open(&p, true).unwrap();
        assert!(matches!(
            RawDisk::open(&p, false),
            Err(BlockError::Locked(_))
        ));
        drop((a, b));
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn discard_and_write_zeroes_punch_holes() {
        let p = image("trim", 4 << 20);
        std::fs::write(&p, vec![0xabu8; 4 << 20]).unwrap();
        let d = RawDisk::open(&p, false).unwrap();
        d.flush().unwrap();
        let before = d.allocated_bytes().unwrap();
        d.discard(0, 2 << 20).unwrap();
        d.write_zeroes(2 << 20, 1 << 20).unwrap();
        let mut back = vec![1u8; 3 << 20];
        d.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        let mut tail = vec![0u8; 1 << 20];
        d.read_at(&mut tail, 3 << 20).unwrap();
        assert!(tail.iter().all(|&b| b == 0xab));
        let after = d.allocated_bytes().unwrap();
        assert!(after < before, "allocated {before} -> {after}");
        assert_eq!(d.size(), 4 << 20, "size kept");
        drop(d);
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn missing_image_is_a_clear_error() {
        let e = RawDisk::open(Path::new("/nonexistent/disk.img"), false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot open disk image /nonexistent/disk.img: No such file or directory (os error 2)"
        );
    }
}
