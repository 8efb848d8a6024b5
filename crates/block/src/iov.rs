//! Scatter-gather buffers as the kernel takes them (`struct iovec`), and the helpers the
//! backends share: vectored positioned I/O that finishes short transfers, `O_DIRECT` alignment
//! checks and an aligned bounce buffer.

use std::alloc::{self, Layout};
use std::io;
use std::os::fd::RawFd;

/// Alignment `O_DIRECT` needs for offsets, lengths and buffer addresses. 4 KiB covers every
/// logical block size a host disk has; requests that do not meet it are bounced.
pub const DIRECT_ALIGN: usize = 4096;

/// One buffer: a `struct iovec`. It carries a raw pointer, typically into guest memory, so
/// whoever builds one vouches for the memory (see the `unsafe` functions that take them).
#[repr(transparent)]
#[derive(Clone, Copy, Debug)]
pub struct IoSlice(libc::iovec);

// SAFETY: an IoSlice is a pointer and a length; the functions that dereference it are unsafe and
// state what the memory must be. Moving the description between threads is harmless.
unsafe impl Send for IoSlice {}
// SAFETY: as above; shared references only read the pointer value.
unsafe impl Sync for IoSlice {}

impl IoSlice {
    /// A buffer at host address `ptr` of `len` bytes.
    pub fn new(ptr: *mut u8, len: usize) -> Self {
        IoSlice(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        })
    }

    /// Describes `buf`.
    pub fn from_mut(buf: &mut [u8]) -> Self {
        Self::new(buf.as_mut_ptr(), buf.len())
    }

    /// Describes `buf` (for writes from it only).
    pub fn from_ref(buf: &[u8]) -> Self {
        Self::new(buf.as_ptr().cast_mut(), buf.len())
    }

    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.0.iov_base.cast()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.iov_len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iov_len == 0
    }

    /// The `iovec` array for a system call.
    pub fn as_iovecs(iov: &[IoSlice]) -> *const libc::iovec {
        iov.as_ptr().cast()
    }
}

/// Total length of `iov`.
pub fn total(iov: &[IoSlice]) -> u64 {
    iov.iter().map(|s| s.len() as u64).sum()
}

/// Whether `iov` at `offset` meets [`DIRECT_ALIGN`].
pub fn aligned(iov: &[IoSlice], offset: u64) -> bool {
    let a = DIRECT_ALIGN;
    offset.is_multiple_of(a as u64)
        && iov
            .iter()
            .all(|s| (s.ptr() as usize).is_multiple_of(a) && s.len().is_multiple_of(a))
}

/// Copies `data` into the buffers of `iov`, in order, until either runs out.
///
/// # Safety
/// Every buffer must be valid for writes of its length.
pub unsafe fn scatter(iov: &[IoSlice], mut data: &[u8]) {
    for s in iov {
        let n = s.len().min(data.len());
        // SAFETY: the caller guarantees `s` is writable for `s.len()` >= n bytes; `data` is a
        // distinct host buffer of at least n bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), s.ptr(), n) };
        data = &data[n..];
    }
}

/// Copies the buffers of `iov`, in order, into `out` until either runs out.
///
/// # Safety
/// Every buffer must be valid for reads of its length.
pub unsafe fn gather(iov: &[IoSlice], mut out: &mut [u8]) {
    for s in iov {
        let n = s.len().min(out.len());
        // SAFETY: the caller guarantees `s` is readable for `s.len()` >= n bytes; `out` is a
        // distinct host buffer of at least n bytes.
        unsafe { std::ptr::copy_nonoverlapping(s.ptr(), out.as_mut_ptr(), n) };
        out = &mut out[n..];
    }
}

/// Fills the buffers of `iov` with zeroes.
///
/// # Safety
/// Every buffer must be valid for writes of its length.
pub unsafe fn zero(iov: &[IoSlice]) {
    for s in iov {
        // SAFETY: the caller guarantees `s` is writable for its length.
        unsafe { std::ptr::write_bytes(s.ptr(), 0, s.len()) };
    }
}

/// Takes the first `n` bytes of `iov` off its front, as buffers of their own (a buffer
/// straddling the cut is split).
pub fn split_front(iov: &mut Vec<IoSlice>, n: u64) -> Vec<IoSlice> {
    let mut front = Vec::new();
    let mut left = n as usize;
    for s in iov.iter() {
        if left == 0 {
            break;
        }
        let take = s.len().min(left);
        front.push(IoSlice::new(s.ptr(), take));
        left -= take;
    }
    advance(iov, n as usize - left);
    front
}

/// Drops the first `n` bytes from the front of `iov` (after a short transfer).
fn advance(iov: &mut Vec<IoSlice>, mut n: usize) {
    let mut skip = 0;
    for s in iov.iter_mut() {
        if n < s.len() {
            // SAFETY: moving inside the same buffer (n < len).
            *s = IoSlice::new(unsafe { s.ptr().add(n) }, s.len() - n);
            break;
        }
        n -= s.len();
        skip += 1;
    }
    iov.drain(..skip);
}

/// Calls `op(iovecs, count, offset)` until all of `iov` is transferred.
fn vectored_all(
    iov: &[IoSlice],
    mut offset: u64,
    op: impl Fn(*const libc::iovec, libc::c_int, libc::off_t) -> isize,
) -> io::Result<()> {
    let mut rest: Vec<IoSlice> = iov.iter().copied().filter(|s| !s.is_empty()).collect();
    while !rest.is_empty() {
        let cnt = rest.len().min(libc::UIO_MAXIOV as usize);
        let r = op(
            IoSlice::as_iovecs(&rest),
            cnt as libc::c_int,
            offset as libc::off_t,
        );
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image ended early",
            ));
        }
        advance(&mut rest, r as usize);
        offset += r as u64;
    }
    Ok(())
}

/// `preadv` until every buffer is full.
///
/// # Safety
/// Every buffer must be valid for writes of its length.
pub unsafe fn preadv_all(fd: RawFd, iov: &[IoSlice], offset: u64) -> io::Result<()> {
    vectored_all(iov, offset, |v, n, off| {
        // SAFETY: `v` points at `n` iovecs the caller vouched for as writable.
        unsafe { libc::preadv(fd, v, n, off) }
    })
}

/// `pwritev` until every buffer is written.
///
/// # Safety
/// Every buffer must be valid for reads of its length.
pub unsafe fn pwritev_all(fd: RawFd, iov: &[IoSlice], offset: u64) -> io::Result<()> {
    vectored_all(iov, offset, |v, n, off| {
        // SAFETY: `v` points at `n` iovecs the caller vouched for as readable.
        unsafe { libc::pwritev(fd, v, n, off) }
    })
}

/// A heap buffer aligned for `O_DIRECT`.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
}

impl AlignedBuf {
    /// `len` zeroed bytes (the allocation is rounded up to whole alignment units).
    pub fn new(len: usize) -> io::Result<Self> {
        let size = len.max(1).next_multiple_of(DIRECT_ALIGN);
        let layout = Layout::from_size_align(size, DIRECT_ALIGN)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "buffer too large"))?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "cannot allocate a bounce buffer",
            ));
        }
        Ok(AlignedBuf { ptr, len, layout })
    }

    /// The buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of at least `len` initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The buffer, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { alloc::dealloc(self.ptr, self.layout) };
    }
}

// SAFETY: the buffer is owned heap memory; nothing else points into it.
unsafe impl Send for AlignedBuf {}
