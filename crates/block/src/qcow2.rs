//! qcow2 images through the `imago` crate (its synchronous build): reads and writes, backing
//! chains and external data files as far as [`Qcow2Trust`] allows them, discard and
//! write-zeroes. tern opens every file of the chain itself (imago's implicit opening is
//! gated shut), so an image header can never make tern open a file the user did not allow.
//! One header check is written here by hand: imago 0.2 panics on a malformed feature name
//! table, and a panic aborts tern, so such headers are refused before imago sees them.
//!
//! Two paths carry guest data:
//! - **mapped** ([`Qcow2Disk::map`]): a read of allocated or unallocated clusters, or a write
//!   (clusters it lacks are allocated first, imago's `ensure_data_mapping`, copying the rest of
//!   each from the backing image), is translated into host extents (imago's `get_mapping`),
//!   which the I/O engine submits through io_uring straight from guest memory, as it does for
//!   raw images;
//! - **through imago**, synchronously and with a bounce buffer, for everything else: reads of
//!   compressed clusters, requests that split into too many extents, and hosts without
//!   io_uring.
//!
//! Mapped I/O never touches metadata. What could move data under it — discard and
//! write-zeroes, which free clusters for reuse — first waits for every mapped request of every
//! queue to finish (new requests take the imago path meanwhile).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, Mapping, Storage, StorageOpenOptions,
};

use crate::iov::{self, IoSlice};
use crate::{lock, BlockError};

/// A qcow2 image and its chain, each file locked like raw images (the locks are held on
/// descriptors of tern's own).
pub struct Qcow2Disk {
    // Reads and writes share the lock; discard needs it exclusively (imago's safe discard
    // takes `&mut`).
    access: RwLock<FormatAccess<ImagoFile>>,
    /// Locks on every file of the chain (the image, its data file, its backing images).
    locks: Vec<(File, PathBuf, bool)>,
    /// Every file of the chain as tern opened it (the open file imago uses too), by the path
    /// imago knows it by: mapped I/O goes to these descriptors.
    files: Vec<(PathBuf, File)>,
    /// imago storage objects met in mappings (by address) and their descriptors.
    fds: RwLock<Vec<(usize, RawFd)>>,
    /// Mapped requests whose I/O has not finished, over all queues.
    mapped: AtomicUsize,
    /// Operations waiting for mapped I/O to end before they change mappings; while one
    /// waits, [`map`](Self::map) declines.
    quiescing: AtomicUsize,
    path: PathBuf,
    /// Grows while the disk is in use ([`grow`](Self::grow)).
    size: AtomicU64,
    read_only: bool,
    direct: bool,
}

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("path", &self.path)
            .field("size", &self.size())
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// What a qcow2 image's header may make tern open besides the image itself.
///
/// A qcow2 header names other files: a backing image and an external data file. Whoever can
/// write the header chooses them, and a guest can write the header of an image whose format
/// was probed (it could have been the guest's own raw disk). So nothing is opened that the user
/// did not allow: backing files only when the user stated the format, and an external data
/// file only when the user named that very file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Qcow2Trust {
    /// Backing images may be opened (read-only, with shared locks).
    pub backing: bool,
    /// The one external data file the image (or a backing image) may use.
    pub data_file: Option<PathBuf>,
}

/// Longest backing chain tern follows (a loop or a very deep chain is refused).
const MAX_CHAIN: usize = 16;

/// Opened layers' lock descriptors and the canonical paths of the chain so far.
#[derive(Default)]
struct Chain {
    /// Each file's lock descriptor, path, and whether its lock is shared.
    locks: Vec<(File, PathBuf, bool)>,
    /// Each file's I/O descriptor (sharing its open file with imago).
    files: Vec<(PathBuf, File)>,
    seen: Vec<PathBuf>,
    /// Take the locks now (not for a VM migrating in: at its switch-over).
    take: bool,
}

/// An image path from a header, relative to the directory of the image naming it.
fn resolve(image: &Path, named: &str) -> PathBuf {
    let named = Path::new(named);
    if named.is_absolute() {
        named.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(named)
    }
}

/// The backing files a qcow2 image's headers name, image by image down the chain (resolved as
/// tern resolves them; at most [`MAX_CHAIN`] deep), read from the headers alone. For whoever
/// must know in advance which files a disk may open (a jail, a Landlock ruleset); the disk
/// itself opens its chain through imago. A file that is not qcow2 names none.
pub fn named_backing_files(image: &Path) -> io::Result<Vec<PathBuf>> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let mut chain = Vec::new();
    let mut current = image.to_path_buf();
    loop {
        // Non-blocking: a FIFO named as a backing file must not hang the caller.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&current);
        let mut f = match opened {
            Ok(f) if !f.metadata()?.is_file() => return Ok(chain),
            Ok(f) => f,
            // A missing backing file is the disk's error to report when it opens.
            Err(e) if current != image && e.kind() == io::ErrorKind::NotFound => return Ok(chain),
            Err(e) => return Err(e),
        };
        let mut h = [0u8; 20];
        if f.read_exact(&mut h).is_err() || h[..4] != *b"QFI\xfb" {
            return Ok(chain);
        }
        let offset = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let size = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        if offset == 0 || size == 0 {
            return Ok(chain);
        }
        if size > 1023 {
            return Err(refused(format!(
                "{}: the backing file name is longer than 1023 bytes",
                current.display()
            )));
        }
        let mut name = vec![0u8; size];
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut name)?;
        let named = String::from_utf8(name).map_err(|_| {
            refused(format!(
                "{}: the backing file name is not UTF-8",
                current.display()
            ))
        })?;
        let next = resolve(&current, &named);
        if chain.len() >= MAX_CHAIN || chain.contains(&next) || next == image {
            return Err(refused(format!(
                "{}: the backing chain loops or is longer than {MAX_CHAIN} images",
                image.display()
            )));
        }
        chain.push(next.clone());
        current = next;
    }
}

fn refused(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

/// Opens a storage file of a qcow2 layer with a lock: exclusive when written, shared otherwise.
fn open_file(
    path: &Path,
    writable: bool,
    direct: bool,
    chain: &mut Chain,
) -> Result<ImagoFile, BlockError> {
    let open_err = |err: io::Error| BlockError::Open {
        path: path.to_path_buf(),
        err,
    };
    let lock_file = File::open(path).map_err(open_err)?;
    if chain.take {
        lock(&lock_file, path, !writable)?;
    }
    chain.locks.push((lock_file, path.to_path_buf(), !writable));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .map_err(open_err)?;
    let imago_file = ImagoFile::from_open_file(
        file.try_clone().map_err(open_err)?,
        StorageOpenOptions::new()
            .filename(path)
            .write(writable)
            .direct(direct),
    )
    .map_err(open_err)?;
    chain.files.push((path.to_path_buf(), file));
    Ok(imago_file)
}

/// Refuses qcow2 headers that imago 0.2 cannot parse without panicking (a panic aborts tern):
/// a feature name table (header extension `0x6803f857`) whose length is not a whole number of
/// its 48-byte entries makes imago index past a short last entry. Walks the v3 header
/// extensions as imago does; anything else wrong is left for imago to report.
fn check_header_extensions(file: &File) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const FEATURE_NAME_TABLE: u32 = 0x6803_f857;
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    // Reads as much of `len` bytes from 0 as the file has; the rest reads as zeroes.
    let read = |len: usize| -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match file.read_at(&mut buf[done..], done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(buf)
    };
    let head = read(104)?;
    let cluster_bits = be32(&head, 20);
    if be32(&head, 4) != 3 || !(9..=21).contains(&cluster_bits) {
        return Ok(());
    }
    let cluster = read(1 << cluster_bits)?;
    let mut at = be32(&head, 100) as usize;
    while at >= 104 && at + 8 <= cluster.len() {
        let (magic, len) = (be32(&cluster, at), be32(&cluster, at + 4) as usize);
        if magic == 0 {
            break;
        }
        if magic == FEATURE_NAME_TABLE && len % 48 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "not a usable qcow2 image: its feature name table is {len} bytes, not a \
                     whole number of 48-byte entries"
                ),
            ));
        }
        at += 8 + len.next_multiple_of(8);
    }
    Ok(())
}

/// Opens one qcow2 layer at `path` and, as `trust` allows, what its header names: the external
/// data file, and the backing image (recursively, read-only).
fn open_layer(
    path: &Path,
    writable: bool,
    direct: bool,
    trust: &Qcow2Trust,
    chain: &mut Chain,
) -> Result<Qcow2<ImagoFile>, BlockError> {
    let open_err = |err: io::Error| BlockError::Open {
        path: path.to_path_buf(),
        err,
    };
    let canonical = std::fs::canonicalize(path).map_err(open_err)?;
    if chain.seen.contains(&canonical) {
        return Err(open_err(io::Error::other(
            "the backing chain loops back to this image",
        )));
    }
    if chain.seen.len() >= MAX_CHAIN {
        return Err(open_err(io::Error::other(format!(
            "the backing chain is longer than {MAX_CHAIN} images"
        ))));
    }
    chain.seen.push(canonical);
    let file = open_file(path, writable, direct, chain)?;
    check_header_extensions(&chain.locks.last().expect("open_file keeps a lock").0)
        .map_err(open_err)?;
    let mut image = Qcow2::<ImagoFile>::open_image(file, writable).map_err(|e| {
        open_err(io::Error::new(
            e.kind(),
            format!("not a usable qcow2 image: {e}"),
        ))
    })?;

    if image.requires_external_data_file() {
        let Some(named) = image.implicit_external_data_file() else {
            return Err(open_err(io::Error::other(
                "the image needs an external data file but names none",
            )));
        };
        let data = resolve(path, named);
        let allowed = trust.data_file.as_ref().is_some_and(|d| {
            match (std::fs::canonicalize(d), std::fs::canonicalize(&data)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            }
        });
        if !allowed {
            return Err(open_err(refused(format!(
                "the image names an external data file ({}); tern opens it only when the disk \
                 is given format=qcow2,data_file={}",
                data.display(),
                data.display()
            ))));
        }
        let file = open_file(&data, writable, direct, chain)?;
        image.set_data_file(Some(file));
    } else {
        image.set_data_file(None);
    }

    match image.implicit_backing_file() {
        None => image.set_backing(None),
        Some(named) => {
            let backing = resolve(path, named);
            if !trust.backing {
                return Err(open_err(refused(format!(
                    "the image names a backing file ({}), and its format was probed, not \
                     stated; tern opens a backing file only when the disk is given format=qcow2",
                    backing.display()
                ))));
            }
            let layer = match image.implicit_backing_format().map(String::as_str) {
                Some("qcow2") => {
                    FormatAccess::new(open_layer(&backing, false, direct, trust, chain)?)
                }
                Some("raw" | "file") => {
                    let file = open_file(&backing, false, direct, chain)?;
                    FormatAccess::new(
                        Raw::builder(file)
                            .open(DenyImplicitOpenGate::default())
                            .map_err(|e| BlockError::Open {
                                path: backing.clone(),
                                err: e,
                            })?,
                    )
                }
                Some(other) => {
                    return Err(open_err(io::Error::other(format!(
                        "its backing file {} has format {other:?}; tern reads raw and qcow2",
                        backing.display()
                    ))))
                }
                None => {
                    return Err(open_err(io::Error::other(format!(
                        "the image names a backing file ({}) without its format; state it with \
                         `qemu-img rebase -u -F raw|qcow2 -b {} {}`",
                        backing.display(),
                        backing.display(),
                        path.display()
                    ))))
                }
            };
            image.set_backing(Some(layer));
        }
    }
    // Everything the header names is set (or refused) above; this gate makes sure nothing
    // else is opened behind tern's back.
    image
        .open_implicit_dependencies_gated(DenyImplicitOpenGate::default())
        .map_err(open_err)?;
    Ok(image)
}

impl Qcow2Disk {
    /// Opens and locks `path`, and what its header names as far as `trust` allows it: backing
    /// images read-only with shared locks, the external data file with the image's access.
    pub fn open(
        path: &Path,
        read_only: bool,
        direct: bool,
        trust: &Qcow2Trust,
    ) -> Result<Self, BlockError> {
        Self::open_locking(path, read_only, direct, trust, true)
    }

    /// [`open`](Self::open), taking the locks only when `take_locks`.
    pub fn open_locking(
        path: &Path,
        read_only: bool,
        direct: bool,
        trust: &Qcow2Trust,
        take_locks: bool,
    ) -> Result<Self, BlockError> {
        let mut chain = Chain {
            take: take_locks,
            ..Chain::default()
        };
        let image = open_layer(path, !read_only, direct, trust, &mut chain)?;
        let access = FormatAccess::new(image);
        let size = access.size();
        Ok(Qcow2Disk {
            access: RwLock::new(access),
            locks: chain.locks,
            files: chain.files,
            fds: RwLock::new(Vec::new()),
            mapped: AtomicUsize::new(0),
            quiescing: AtomicUsize::new(0),
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            read_only,
            direct,
        })
    }

    /// The locks of every file of its chain (see [`crate::ImageLock`]).
    pub fn locks(&self) -> Result<Vec<crate::ImageLock>, BlockError> {
        self.locks
            .iter()
            .map(|(f, p, shared)| crate::ImageLock::of(f, p, *shared))
            .collect()
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    /// Grows the virtual size to `new_size` (larger than now: see
    /// [`Disk::grow`](crate::Disk::grow)); the new range reads as zeroes even where a backing
    /// image is longer. No request runs meanwhile (the access is taken exclusively).
    pub fn grow(&self, new_size: u64) -> Result<(), BlockError> {
        let a = self.access.write().unwrap_or_else(|p| p.into_inner());
        a.resize_grow(new_size, imago::format::PreallocateMode::Zero)
            .map_err(|e| self.io(e))?;
        a.flush().map_err(|e| self.io(e))?;
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

    /// Whether the files are open with `O_DIRECT`.
    pub fn direct(&self) -> bool {
        self.direct
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
        crate::check_range(&self.path, offset, len, self.size())
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
        crate::check_range(&self.path, offset, len, self.size())?;
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

    /// Discards a range: its clusters are freed (or made to read as zeroes). Waits for mapped
    /// I/O first (see [`quiesced`](Self::quiesced)).
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable(offset, len)?;
        self.quiesced(|a| a.discard_to_zero(offset, len))
            .map_err(|e| self.io(e))
    }

    /// Zeroes a range (as zero clusters where it can, which frees them). Waits for mapped I/O
    /// first (see [`quiesced`](Self::quiesced)).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable(offset, len)?;
        self.quiesced(|a| a.write_zeroes(offset, len))
            .map_err(|e| self.io(e))
    }

    /// Runs `op` with the image to itself once no mapped request is in flight: freed clusters
    /// may be reused at once, and a mapped write still running into one would land in
    /// whatever takes it next. The caller must not hold mapped requests of its own in flight
    /// (the engine drains its own first), or this never returns.
    fn quiesced<R>(&self, op: impl FnOnce(&mut FormatAccess<ImagoFile>) -> R) -> R {
        self.quiescing.fetch_add(1, Ordering::SeqCst);
        let r = loop {
            while self.mapped.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
            let mut a = self.access.write().unwrap_or_else(|p| p.into_inner());
            // `map` counts its requests under the shared lock: none can start now.
            if self.mapped.load(Ordering::SeqCst) == 0 {
                break op(&mut a);
            }
        };
        self.quiescing.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Maps `len` bytes at `offset` for a read (`write` false) or write to host extents, at
    /// most `max` of them (adjacent ones merged), into `out`. True when the whole range
    /// mapped: every byte is stored in a cluster (of this image, its data file or, for reads,
    /// a backing image) or, for reads, reads as zeroes; a write gets clusters this image owns,
    /// allocated here (synchronously, metadata in imago's cache until the next flush) where
    /// it has none. The request then counts as mapped until [`unmap`](Self::unmap) is
    /// called for it. False, with nothing counted, sends the request through imago.
    pub fn map(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> bool {
        out.clear();
        if (write && self.read_only)
            || crate::check_range(&self.path, offset, len, self.size()).is_err()
        {
            return false;
        }
        let a = self.read_access();
        if self.quiescing.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let Ok((mapping, mut n)) = a.get_mapping(at, end - at) else {
                return false;
            };
            let extent = match mapping {
                _ if n == 0 => return false,
                Mapping::Raw {
                    storage,
                    offset,
                    writable,
                    ..
                } if writable || !write => match self.fd_of(storage) {
                    Some(fd) => Extent::Data { fd, offset, len: n },
                    None => return false,
                },
                Mapping::Zero { .. } if !write => Extent::Zero { len: n },
                // A write where this image owns no cluster: allocate (imago copies what the
                // rest of each cluster holds from the backing image), then write like any other.
                _ if write => match a.ensure_data_mapping(at, end - at, true) {
                    Ok((storage, offset, len)) if len > 0 => match self.fd_of(storage) {
                        Some(fd) => {
                            n = len;
                            Extent::Data { fd, offset, len }
                        }
                        None => return false,
                    },
                    _ => return false,
                },
                _ => return false,
            };
            let full = out.len() == max;
            match (out.last_mut(), extent) {
                (Some(Extent::Zero { len }), Extent::Zero { len: more }) => *len += more,
                (
                    Some(Extent::Data { fd, offset, len }),
                    Extent::Data {
                        fd: next_fd,
                        offset: next,
                        len: more,
                    },
                ) if *fd == next_fd && *offset + *len == next => *len += more,
                _ if full => return false,
                _ => out.push(extent),
            }
            at += n;
        }
        self.mapped.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Ends a request [`map`](Self::map) counted (its I/O is over, successful or not).
    pub fn unmap(&self) {
        self.mapped.fetch_sub(1, Ordering::SeqCst);
    }

    /// The descriptor of a file of the chain, by the imago storage object standing for it.
    fn fd_of(&self, storage: &ImagoFile) -> Option<RawFd> {
        let key = std::ptr::from_ref(storage) as usize;
        let known = self.fds.read().unwrap_or_else(|p| p.into_inner());
        if let Some(&(_, fd)) = known.iter().find(|(k, _)| *k == key) {
            return Some(fd);
        }
        drop(known);
        let name = storage.get_filename()?;
        let fd = self.files.iter().find(|(p, _)| *p == name)?.1.as_raw_fd();
        self.fds
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((key, fd));
        Some(fd)
    }
}

impl Extent {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Data { len, .. } | Extent::Zero { len } => len,
        }
    }

    /// Whether it covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A stretch of a mapped request ([`Qcow2Disk::map`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes at `offset` of the file open as `fd`.
    Data {
        /// The file (a descriptor the disk keeps open).
        fd: RawFd,
        /// Where in it.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// `len` bytes that read as zeroes.
    Zero {
        /// How many bytes.
        len: u64,
    },
}
