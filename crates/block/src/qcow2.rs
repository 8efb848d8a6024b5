//! qcow2 images through the `imago` crate (its synchronous build): reads and writes, backing
//! chains as the image header names them, discard and write-zeroes. Guest data go through a
//! host bounce buffer, as imago takes Rust slices.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate, StorageOpenOptions};

use crate::iov::{self, IoSlice};
use crate::{lock, BlockError};

/// A qcow2 image, locked like raw images (the lock is held on a descriptor of our own).
pub struct Qcow2Disk {
    // Reads and writes share the lock; discard needs it exclusively (imago's safe discard
    // takes `&mut`).
    access: RwLock<FormatAccess<ImagoFile>>,
    _lock: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Qcow2Disk {
    /// Opens `path` and its backing chain (read-only), locking the image itself.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, BlockError> {
        let open_err = |err: io::Error| BlockError::Open {
            path: path.to_path_buf(),
            err,
        };
        let lock_file = File::open(path).map_err(open_err)?;
        lock(&lock_file, path, read_only)?;
        let image = Qcow2::<ImagoFile>::builder_path(path)
            .write(!read_only)
            .storage_open_options(StorageOpenOptions::new().direct(direct))
            .open(PermissiveImplicitOpenGate::default())
            .map_err(|e| {
                open_err(io::Error::new(
                    e.kind(),
                    format!("not a usable qcow2 image: {e}"),
                ))
            })?;
        let access = FormatAccess::new(image);
        let size = access.size();
        Ok(Qcow2Disk {
            access: RwLock::new(access),
            _lock: lock_file,
            path: path.to_path_buf(),
            size,
            read_only,
        })
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn io(&self, err: io::Error) -> BlockError {
        BlockError::Io {
            path: self.path.clone(),
            err,
        }
    }

    fn writable(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly(self.path.clone()));
        }
        crate::check_range(&self.path, offset, len, self.size)
    }

    fn read_access(&self) -> std::sync::RwLockReadGuard<'_, FormatAccess<ImagoFile>> {
        self.access.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads into `iov` from `offset` on.
    ///
    /// # Safety
    /// Every buffer must be valid for writes of its length for the duration of the call.
    pub unsafe fn readv(&self, iov: &[IoSlice], offset: u64) -> Result<(), BlockError> {
        let len = iov::total(iov);
        crate::check_range(&self.path, offset, len, self.size)?;
        let mut bounce = vec![0u8; len as usize];
        self.read_access()
            .read(&mut bounce, offset)
            .map_err(|e| self.io(e))?;
        // SAFETY: the caller guarantees `iov` is writable.
        unsafe { iov::scatter(iov, &bounce) };
        Ok(())
    }

    /// Writes `iov` at `offset` (allocating clusters in this image, never in a backing file).
    ///
    /// # Safety
    /// Every buffer must be valid for reads of its length for the duration of the call.
    pub unsafe fn writev(&self, iov: &[IoSlice], offset: u64) -> Result<(), BlockError> {
        let len = iov::total(iov);
        self.writable(offset, len)?;
        let mut bounce = vec![0u8; len as usize];
        // SAFETY: the caller guarantees `iov` is readable.
        unsafe { iov::gather(iov, &mut bounce) };
        self.read_access()
            .write(&bounce, offset)
            .map_err(|e| self.io(e))
    }

    /// Writes imago's cached metadata out and syncs the file.
    pub fn flush(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        let a = self.read_access();
        a.flush().map_err(|e| self.io(e))?;
        a.sync().map_err(|e| self.io(e))
    }

    /// Discards a range: its clusters are freed (or made to read as zeroes).
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable(offset, len)?;
        let mut a = self.access.write().unwrap_or_else(|p| p.into_inner());
        a.discard_to_zero(offset, len).map_err(|e| self.io(e))
    }

    /// Zeroes a range (as zero clusters where it can).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable(offset, len)?;
        self.read_access()
            .write_zeroes(offset, len)
            .map_err(|e| self.io(e))
    }
}
