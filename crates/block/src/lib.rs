//! Disk images for tern's block devices: opening an image with the right format and an
//! exclusive lock, and the synchronous raw-file backend (read, write, flush, discard and
//! write-zeroes by hole punching). qcow2 (through `imago`), io_uring and O_DIRECT come with the
//! virtio-blk device.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Image formats tern knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// A raw disk image, locked against other writers (and, when writable, other readers).
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl RawDisk {
    /// Opens `path`, taking an OFD-style `flock`: exclusive when writable, shared when
    /// read-only, so two VMs cannot both write one image.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let open_err = |err| BlockError::Open {
            path: path.to_path_buf(),
            err,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let op = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BlockError::Locked(path.to_path_buf())
            } else {
                open_err(err)
            });
        }
        let size = file.metadata().map_err(open_err)?.len();
        Ok(RawDisk {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
        })
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BlockError::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                size: self.size,
            }),
        }
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
        self.check(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset).map_err(|e| self.io(e))
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.writable()?;
        self.check(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset).map_err(|e| self.io(e))
    }

    /// Makes written data durable.
    pub fn flush(&self) -> Result<(), BlockError> {
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// Deallocates `[offset, offset + len)` (discard); reads return zeroes afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.punch_hole(offset, len)
    }

    /// Zeroes `[offset, offset + len)`, deallocating it where the file system can.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match self.punch_hole(offset, len) {
            Err(BlockError::Io { err, .. }) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // No hole punching here: write zeroes.
                let zeroes = vec![0u8; 64 << 10];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeroes.len() as u64) as usize;
                    self.write_at(&zeroes[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            r => r,
        }
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

    fn image(name: &str, size: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tern-block-{}-{name}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    #[test]
    fn formats() {
        assert_eq!(detect_format(b"QFI\xfb\0\0\0\x03"), ImageFormat::Qcow2);
        assert_eq!(detect_format(b"\0\0\0\0"), ImageFormat::Raw);
        assert_eq!(detect_format(b"QF"), ImageFormat::Raw);
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
