//! Guest memory in a snapshot's memory file: written whole (pages of zeroes left as holes) or
//! as a diff (only the pages a bitmap marks), read back eagerly with its checksum, or mapped
//! copy-on-write for a lazy restore; and the FNV-1a checksum all of it uses.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use arch::GuestMemoryMmap;

/// FNV-1a over 64-bit little-endian words (then the remaining bytes): a checksum that keeps
/// up with reading memory, for detecting damage (not tampering by someone who recomputes it).
pub(crate) fn fnv(h: u64, data: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut words = data.chunks_exact(8);
    let mut h = words.by_ref().fold(h, |h, w| {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        (h ^ u64::from_le_bytes(b)).wrapping_mul(PRIME)
    });
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    h
}

pub(crate) const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// [`fnv`] over `n` zero bytes (n a multiple of 8, or the tail of a call): every step XORs
/// zero and multiplies by the prime, so it is `h * prime^steps`.
fn fnv_zeroes(h: u64, n: u64) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let (mut steps, mut base, mut acc) = (n / 8 + n % 8, PRIME, 1u64);
    while steps > 0 {
        if steps & 1 == 1 {
            acc = acc.wrapping_mul(base);
        }
        base = base.wrapping_mul(base);
        steps >>= 1;
    }
    h.wrapping_mul(acc)
}

pub(crate) const PAGE: u64 = virtio::dirty::PAGE_SIZE;

/// Byte ranges (start, length) of `data` made of whole pages that are not all zeroes (the
/// last page may be partial).
#[cfg(test)]
fn nonzero_runs(data: &[u8]) -> Vec<(usize, usize)> {
    scan_pages(FNV_INIT, data).1
}

/// Whether `b` is all zeroes (8 bytes at a time, which the compiler vectorizes).
fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(8);
    let tail = words.remainder().iter().fold(0u8, |a, &x| a | x);
    words.fold(0u64, |a, w| {
        a | u64::from_ne_bytes(w.try_into().unwrap_or([0xff; 8]))
    }) == 0
        && tail == 0
}

/// One pass over `data`: its [`fnv`] continued from `h`, and the byte ranges (start, length)
/// of its pages that are not all zeroes (the last page may be partial). A zero page costs one
/// multiplication in the checksum instead of 512.
fn scan_pages(mut h: u64, data: &[u8]) -> (u64, Vec<(usize, usize)>) {
    let zero_page = fnv_zeroes(1, PAGE);
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in data.chunks(PAGE as usize).enumerate() {
        if is_zero(page) {
            h = if page.len() as u64 == PAGE {
                h.wrapping_mul(zero_page)
            } else {
                fnv_zeroes(h, page.len() as u64)
            };
            continue;
        }
        h = fnv(h, page);
        let start = i * PAGE as usize;
        match runs.last_mut() {
            Some((s0, l)) if *s0 + *l == start => *l += page.len(),
            _ => runs.push((start, page.len())),
        }
    }
    (h, runs)
}

/// Runs of set bits in `bits` (over `pages` pages), as (first page, count).
fn page_runs(bits: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut start = None;
    for p in 0..pages {
        let set = bits
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0);
        match (set, start) {
            (true, None) => start = Some(p),
            (false, Some(s0)) => {
                runs.push((s0, p - s0));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s0) = start {
        runs.push((s0, pages - s0));
    }
    runs
}

/// Splits page runs at region boundaries: (host pointer, file offset, bytes) for each piece.
fn run_pieces(mem: &GuestMemoryMmap, runs: &[(u64, u64)]) -> Vec<(*mut u8, u64, u64)> {
    let regions: Vec<(u64, u64, *mut u8)> = {
        let mut off = 0;
        mem.iter()
            .map(|r| {
                let e = (off, r.len(), r.as_ptr());
                off += r.len();
                e
            })
            .collect()
    };
    let mut out = Vec::new();
    for &(p, n) in runs {
        let (mut lo, hi) = (p * PAGE, (p + n) * PAGE);
        for &(off, len, ptr) in &regions {
            if lo >= hi {
                break;
            }
            let end = (off + len).min(hi);
            if lo >= off && lo < end {
                // SAFETY: lo - off < len: the pointer stays inside the region's mapping.
                out.push((unsafe { ptr.add((lo - off) as usize) }, lo, end - lo));
                lo = end;
            }
        }
    }
    out
}

/// Maps `len` bytes of `f` from `off` copy-on-write (`MAP_PRIVATE|MAP_FIXED`) at `ptr`: pages
/// load from the file on first touch, and writes never reach it.
///
/// # Safety
/// `[ptr, ptr + len)` lies inside one live mapping of guest memory that nothing reads or
/// writes meanwhile; its pages are replaced.
unsafe fn map_over(ptr: *mut u8, len: u64, f: &File, off: u64, path: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // SAFETY: the caller guarantees the range is guest memory tern owns and nothing uses.
    let p = unsafe {
        libc::mmap(
            ptr.cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            f.as_raw_fd(),
            off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED || p.cast::<u8>() != ptr {
        return Err(format!(
            "cannot map {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Has `f` (a memory file) written and read past the host's page cache (`O_DIRECT`) where its
/// file system allows that; elsewhere (a file system without it) it stays as it is.
///
/// Guest memory goes between the guest's own pages and the disk: writing 256 MiB does not
/// first take 256 MiB of fresh page cache (on a host that hands free memory back to its own
/// host, such pages cost a fault each there: 0.3 to 1.1 s for the copy into the cache, against
/// 0.11 s for the direct write and the `fsync` together), does not evict what other VMs have
/// cached, and leaves no writeback for the `fsync` to wait on; an eager restore reads into
/// guest memory without a second copy in the cache. The pieces are whole pages at page
/// offsets, which `O_DIRECT` needs; [`through_cache_if_refused`] falls back for a device
/// that wants more. A lazy restore maps the file, through the page cache.
pub(crate) fn bypass_page_cache(f: &File) {
    set_direct(f, true);
}

/// Sets or clears `O_DIRECT` on `f` (left as it is if the file system refuses).
fn set_direct(f: &File, on: bool) {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: fcntl(F_GETFL/F_SETFL) on a descriptor `f` owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            let want = if on {
                flags | libc::O_DIRECT
            } else {
                flags & !libc::O_DIRECT
            };
            libc::fcntl(fd, libc::F_SETFL, want);
        }
    }
}

/// Runs `io` (a read or write of `f`). Past the page cache a device may refuse a piece that is
/// not aligned to its blocks (`EINVAL`): then `io` runs again, and the rest goes, through the
/// page cache.
fn through_cache_if_refused(
    f: &File,
    mut io: impl FnMut() -> std::io::Result<()>,
) -> std::io::Result<()> {
    match io() {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            set_direct(f, false);
            io()
        }
        r => r,
    }
}

/// (guest address, length) of each region of `mem`, in order: a snapshot's memory layout.
pub fn layout(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// Writes all of `mem` into `f` (`path`, for messages), region after region; pages of zeroes
/// are left as holes (most of a guest's memory usually is, and a hole reads back as zeroes,
/// eagerly or mapped). Only `extents` (guest address, length, in order, in whole pages) are
/// read: the rest is taken as zeroes. Returns the checksum of all of it.
pub(crate) fn write_full(
    f: &File,
    path: &Path,
    mem: &GuestMemoryMmap,
    extents: &[(u64, u64)],
) -> Result<u64, String> {
    let werr = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let total: u64 = layout(mem).iter().map(|(_, l)| l).sum();
    f.set_len(total).map_err(werr)?;
    let mut h = FNV_INIT;
    let mut off = 0u64;
    for r in mem.iter() {
        // SAFETY: the region is a live mapping of `len()` bytes owned by `mem`; the VM is
        // paused, so nothing writes it while it is read.
        let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) };
        let (base, len) = (r.start_addr().0, r.len());
        // Where the region's bytes have been checksummed up to.
        let mut at = 0u64;
        for &(addr, l) in extents {
            let start = addr.max(base).saturating_sub(base).min(len).max(at);
            let end = (addr + l).saturating_sub(base).min(len);
            if end <= start {
                continue;
            }
            h = fnv_zeroes(h, start - at);
            let piece = &bytes[start as usize..end as usize];
            let (next, runs) = scan_pages(h, piece);
            h = next;
            for (s, n) in runs {
                let at = off + start + s as u64;
                through_cache_if_refused(f, || f.write_all_at(&piece[s..s + n], at))
                    .map_err(werr)?;
            }
            at = end;
        }
        h = fnv_zeroes(h, len - at);
        off += len;
    }
    Ok(h)
}

/// Writes the pages `dirty` marks (one bit per page of the regions end to end) into `f` at
/// their places; the rest of the file is a hole. Returns the checksum of those pages in order.
pub(crate) fn write_diff(
    f: &File,
    path: &Path,
    mem: &GuestMemoryMmap,
    dirty: &[u64],
) -> Result<u64, String> {
    let werr = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let total: u64 = layout(mem).iter().map(|(_, l)| l).sum();
    f.set_len(total).map_err(werr)?;
    let mut h = FNV_INIT;
    for (ptr, off, len) in run_pieces(mem, &page_runs(dirty, total.div_ceil(PAGE))) {
        // SAFETY: `run_pieces` keeps each piece inside one live region of `mem`; the VM is
        // paused.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len as usize) };
        h = fnv(h, bytes);
        through_cache_if_refused(f, || f.write_all_at(bytes, off)).map_err(werr)?;
    }
    Ok(h)
}

/// Opens the memory file `path` once `mem` has the snapshot's `layout` and the file the
/// length of that memory (holes included).
pub(crate) fn open(
    path: &Path,
    layout_saved: &[(u64, u64)],
    mem: &GuestMemoryMmap,
) -> Result<File, String> {
    let here = layout(mem);
    if here != layout_saved {
        return Err(format!(
            "the snapshot's memory layout {layout_saved:?} does not match the VM's {here:?}"
        ));
    }
    let f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let total: u64 = layout_saved.iter().map(|(_, l)| l).sum();
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len != total {
        return Err(format!(
            "{} has {len} bytes, the VM's memory {total}: it is truncated or not this snapshot's",
            path.display()
        ));
    }
    Ok(f)
}

/// Maps the memory file copy-on-write over `mem`'s regions (`MAP_PRIVATE|MAP_FIXED` at the
/// same host addresses, which KVM's memslots keep pointing at): pages load on first touch, so
/// restoring costs the same for any guest size. The checksum is not checked (that would read
/// every page).
pub(crate) fn map(f: &File, path: &Path, mem: &GuestMemoryMmap) -> Result<(), String> {
    let mut offset = 0u64;
    for r in mem.iter() {
        // SAFETY: the range is exactly a live mapping owned by `mem` (it stays owned and is
        // unmapped by it later), and no vCPU runs yet.
        unsafe { map_over(r.as_ptr(), r.len(), f, offset, path) }?;
        offset += r.len();
    }
    Ok(())
}

/// Reads the memory file into `mem` (eagerly; past the page cache, as it was written);
/// returns the checksum of what it read.
pub(crate) fn load(f: &File, path: &Path, mem: &GuestMemoryMmap) -> Result<u64, String> {
    use std::os::fd::AsRawFd;
    bypass_page_cache(f);
    // Only the file's data is read: its holes are pages of zeroes, which the freshly built
    // VM's memory already is (they still count in the checksum).
    let seek = |off: u64, whence: libc::c_int| -> Option<u64> {
        // SAFETY: lseek on a descriptor we own; it only moves the file offset.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
        u64::try_from(r).ok()
    };
    let mut h = FNV_INIT;
    let mut base = 0u64;
    for r in mem.iter() {
        // SAFETY: the region is a live mapping of `len()` bytes owned by `mem`; no vCPU runs
        // yet, and nothing else holds a reference into it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) };
        let end = r.len();
        let mut pos = 0u64;
        while pos < end {
            // Where data starts (a filesystem without holes says: here).
            let data = seek(base + pos, libc::SEEK_DATA)
                .map_or(end, |d| d.saturating_sub(base).min(end))
                .max(pos);
            h = fnv_zeroes(h, data - pos);
            pos = data;
            if pos >= end {
                break;
            }
            let hole = seek(base + pos, libc::SEEK_HOLE)
                .map_or(end, |d| d.saturating_sub(base).min(end))
                .max(pos + 1);
            let chunk = &mut bytes[pos as usize..hole as usize];
            through_cache_if_refused(f, || f.read_exact_at(chunk, base + pos))
                .map_err(|e| format!("{} is truncated or unreadable: {e}", path.display()))?;
            h = fnv(h, chunk);
            pos = hole;
        }
        base += end;
    }
    Ok(h)
}

/// Reads a diff snapshot's bitmap (`dirty.bin`, one bit per page over `pages` pages) and
/// checks it against its checksum.
pub(crate) fn read_bitmap(path: &Path, pages: u64, want_fnv: u64) -> Result<Vec<u64>, String> {
    use std::io::Read;
    let want = pages.div_ceil(64) * 8;
    // Its length is known: no more than that is read.
    let mut words = Vec::new();
    File::open(path)
        .and_then(|f| f.take(want + 1).read_to_end(&mut words))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if words.len() as u64 != want || fnv(FNV_INIT, &words) != want_fnv {
        return Err(format!("{} is corrupted or truncated", path.display()));
    }
    Ok(words
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// Puts the pages `bits` marks from the memory file over `mem`: mapped when `lazy` (and they
/// are not too scattered), else read. Returns whether they were mapped, and the checksum of
/// what was read (meaningless when mapped).
pub(crate) fn apply_diff(
    f: &File,
    path: &Path,
    mem: &GuestMemoryMmap,
    bits: &[u64],
    lazy: bool,
) -> Result<(bool, u64), String> {
    let total: u64 = layout(mem).iter().map(|(_, l)| l).sum();
    let pieces = run_pieces(mem, &page_runs(bits, total.div_ceil(PAGE)));
    // Each mapped piece is a mapping of its own; past a few thousand, reading is cheaper
    // than the mappings (and the process's mapping limit is far away).
    let map = lazy && pieces.len() <= 4096;
    if !map {
        bypass_page_cache(f);
    }
    let mut h = FNV_INIT;
    for (ptr, off, n) in pieces {
        if map {
            // SAFETY: the piece lies inside one live region of `mem` (`run_pieces`); no vCPU
            // runs yet.
            unsafe { map_over(ptr, n, f, off, path) }?;
        } else {
            // SAFETY: the piece lies inside one live region of `mem` (`run_pieces`); no vCPU
            // runs yet and nothing else references these bytes while they are read.
            let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, n as usize) };
            through_cache_if_refused(f, || f.read_exact_at(bytes, off))
                .map_err(|e| format!("{} is unreadable: {e}", path.display()))?;
            h = fnv(h, bytes);
        }
    }
    Ok((map, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_zeroes_without_reading_them() {
        for n in [0u64, 8, 4096, 3 * 4096 + 8, 1 << 20] {
            let zeroes = vec![0u8; n as usize];
            assert_eq!(fnv_zeroes(12345, n), fnv(12345, &zeroes), "{n} bytes");
        }
        assert_eq!(fnv_zeroes(7, 13), fnv(7, &[0u8; 13]));
    }

    /// Past the page cache, whole pages are written as they are; a piece the device refuses
    /// (not aligned to its blocks) goes through the page cache instead, and so does the rest.
    #[test]
    fn pieces_go_past_the_page_cache_and_back_through_it_when_refused() {
        let is_direct = |f: &File| {
            // SAFETY: F_GETFL on a descriptor the test owns; no memory is passed.
            let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(f), libc::F_GETFL) };
            flags & libc::O_DIRECT != 0
        };
        let dir = std::env::temp_dir().join(format!("tern-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m");
        let f = std::fs::File::create_new(&path).unwrap();
        bypass_page_cache(&f);
        if !is_direct(&f) {
            let why = format!("{} has no O_DIRECT", dir.display());
            assert!(std::env::var("CI").is_err(), "{why}");
            eprintln!("SKIPPED: {why}");
            return;
        }
        // O_DIRECT needs an aligned buffer: a page of an anonymous mapping.
        let page = vm_memory::MmapRegion::<()>::new(PAGE as usize).unwrap();
        // SAFETY: the mapping is PAGE bytes, owned by `page` and used by nothing else.
        let buf = unsafe { std::slice::from_raw_parts_mut(page.as_ptr(), PAGE as usize) };
        buf.fill(0xab);
        through_cache_if_refused(&f, || f.write_all_at(buf, PAGE)).unwrap();
        assert!(is_direct(&f), "a whole page turned O_DIRECT off");
        through_cache_if_refused(&f, || f.write_all_at(b"odd", 3)).unwrap();
        assert!(!is_direct(&f));
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len() as u64, 2 * PAGE);
        assert_eq!(&got[3..6], b"odd");
        assert!(got[PAGE as usize..].iter().all(|&b| b == 0xab));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zero_pages_are_skipped() {
        let mut d = vec![0u8; 5 * 4096 + 100];
        d[4096 + 7] = 1; // page 1
        d[2 * 4096] = 2; // page 2
        d[5 * 4096 + 99] = 3; // the partial last page
        assert_eq!(nonzero_runs(&d), vec![(4096, 2 * 4096), (5 * 4096, 100)]);
        assert!(nonzero_runs(&[0u8; 8192]).is_empty());
        // The checksum of the scan is the plain one.
        assert_eq!(scan_pages(99, &d).0, fnv(99, &d));
    }

    /// Reading only the extents that may hold data writes the same file, with the same
    /// checksum, as reading all of memory, when the rest is zeroes.
    #[test]
    fn memory_outside_the_extents_counts_as_zeroes() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 * 4096),
            (GuestAddress(1 << 32), 8 * 4096),
        ])
        .unwrap();
        for (addr, byte) in [
            (4096 + 5, 1u8),
            (9 * 4096, 2),
            ((1 << 32) + 3 * 4096 + 17, 3),
        ] {
            mem.write_obj(byte, GuestAddress(addr)).unwrap();
        }
        let dir = std::env::temp_dir().join(format!("tern-extents-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, extents: &[(u64, u64)]| {
            let path = dir.join(name);
            let f = File::create(&path).unwrap();
            let h = write_full(&f, &path, &mem, extents).unwrap();
            (h, std::fs::read(&path).unwrap())
        };
        let all = write("all", &layout(&mem));
        // Extents that reach across a region's end, cover zero pages, or lie between regions.
        let some = write(
            "some",
            &[
                (4096, 4096),
                (8 * 4096, 10 * 4096),
                ((1 << 32) - 4096, 2 * 4096),
                ((1 << 32) + 3 * 4096, 4096),
            ],
        );
        assert_eq!(some, all);
        // A page with data outside the extents is not read.
        let missed = write("missed", &[(4096, 4096)]);
        assert_ne!(missed.0, all.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
