//! `vblk`: data integrity on every virtio-blk device (type 2, either
//! transport). Reads the configuration and the serial (get-id), then:
//! - writable disk: writes the pattern below over the whole disk in requests
//!   of `probe.vblk_chunk` bytes (default 65536), tries write-zeroes and
//!   discard on sectors 8–15 when offered (rewriting the pattern after each),
//!   flushes when FLUSH is offered, and reads everything back to verify it;
//! - read-only disk: one 512-byte write at sector 0 must fail (IOERR or
//!   UNSUPP), then sector 0 is read and its FNV-1a 64 reported.
//!
//! Pattern of 512-byte sector `s` (the host checks the image with it): bytes
//! 0..8 little-endian u64 `s`, bytes 8..16 little-endian u64
//! `probe.vblk_seed` (default 0x7465726e), byte `i` in 16..512 is
//! `(s as u8) ^ (i as u8)`.

use core::fmt::{self, Write};

use super::{fail, Ctx, Fail, Line, Report, Scenario};
use crate::rt::virtio::blk::{
    self, Blk, F_BLK_SIZE, F_DISCARD, F_FLUSH, F_MQ, F_WRITE_ZEROES, ID_BYTES, SECTOR, S_IOERR,
    S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use crate::rt::virtio::{Buf, Device, ID_BLK};

pub const SCENARIO: Scenario = Scenario { name: "vblk", run };

/// u64 words per sector.
const WORDS: usize = (SECTOR / 8) as usize;
/// The range write-zeroes and discard work on: sectors 8..16.
const RANGE_SECTOR: u64 = 8;
const RANGE_SECTORS: u32 = 8;
/// Largest request `probe.vblk_chunk` may ask for (tern's per-request limit).
const MAX_CHUNK: u64 = 8 << 20;
/// Fills the read buffer before each read, so a short read shows.
const POISON: u8 = 0xa5;

/// Word `k` of the fixed part of every sector: bytes `8k..8k+8` hold their
/// own index (as u8); XOR with the sector number's low byte in every byte
/// gives bytes 16..512 of the pattern.
const BASE: [u64; WORDS] = {
    let mut t = [0u64; WORDS];
    let mut k = 0;
    while k < WORDS {
        let mut j = 0;
        while j < 8 {
            t[k] |= (((8 * k + j) & 0xff) as u64) << (8 * j);
            j += 1;
        }
        k += 1;
    }
    t
};

/// Writes the pattern of sector `s` into `w` (one sector).
pub(super) fn fill_sector(w: &mut [u64], s: u64, seed: u64) {
    let splat = u64::from(s as u8) * 0x0101_0101_0101_0101;
    w[0] = s.to_le();
    w[1] = seed.to_le();
    for k in 2..WORDS {
        w[k] = BASE[k] ^ splat;
    }
}

fn sector_ok(w: &[u64], s: u64, seed: u64) -> bool {
    let splat = u64::from(s as u8) * 0x0101_0101_0101_0101;
    w[0] == s && w[1] == seed && (2..WORDS).all(|k| w[k] == BASE[k] ^ splat)
}

/// `len` bytes at `addr` as u64 words.
///
/// # Safety
/// `addr` is 8-aligned RAM of ours that no device request is using.
unsafe fn words<'a>(addr: u64, len: u64) -> &'a mut [u64] {
    // SAFETY: forwarded.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u64, (len / 8) as usize) }
}

/// FNV-1a 64 of `data`.
pub(super) fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Per-device values of each key: `key=a,b,…` in device order, `-` where a
/// device has no value. Keys no device set are left out.
pub(super) struct Cols<const K: usize> {
    keys: [Line<24>; K],
    vals: [Line<160>; K],
    filled: [usize; K],
    nk: usize,
    devices: usize,
}

impl<const K: usize> Cols<K> {
    pub fn new() -> Self {
        Cols {
            keys: [const { Line::new() }; K],
            vals: [const { Line::new() }; K],
            filled: [0; K],
            nk: 0,
            devices: 0,
        }
    }

    /// Values that follow belong to the next device.
    pub fn next_device(&mut self) {
        self.devices += 1;
    }

    fn pad(&mut self, i: usize, upto: usize) {
        while self.filled[i] < upto {
            let sep = if self.filled[i] == 0 { "" } else { "," };
            let _ = write!(self.vals[i], "{sep}-");
            self.filled[i] += 1;
        }
    }

    pub fn put(&mut self, key: &str, value: impl fmt::Display) {
        let i = match (0..self.nk).find(|&i| self.keys[i].as_str() == key) {
            Some(i) => i,
            None if self.nk < K => {
                let _ = self.keys[self.nk].write_str(key);
                self.nk += 1;
                self.nk - 1
            }
            None => return,
        };
        self.pad(i, self.devices.saturating_sub(1));
        let sep = if self.filled[i] == 0 { "" } else { "," };
        let _ = write!(self.vals[i], "{sep}{value}");
        self.filled[i] += 1;
    }

    pub fn emit(&mut self, r: &mut Report) {
        for i in 0..self.nk {
            self.pad(i, self.devices);
            r.kv(self.keys[i].as_str(), self.vals[i].as_str());
        }
    }
}

/// The `serial=` text: the get-id bytes up to the first NUL, with anything
/// but printable ASCII other than space and `"` shown as `?`.
pub(super) struct Serial([u8; ID_BYTES as usize]);

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0.iter().take_while(|&&b| b != 0) {
            let c = if b.is_ascii_graphic() && b != b'"' {
                b as char
            } else {
                '?'
            };
            f.write_char(c)?;
        }
        Ok(())
    }
}

struct Params {
    chunk: u64,
    seed: u64,
    timeout_ns: u64,
    /// `chunk` bytes of data buffer, and one page for small buffers.
    buf: u64,
    small: u64,
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let chunk = ctx.param("vblk_chunk", 65536)?;
    let seed = ctx.param("vblk_seed", 0x7465_726e)?;
    let timeout_ns = super::virtio_timeout_ns(ctx)?;
    if chunk == 0 || !chunk.is_multiple_of(SECTOR) || chunk > MAX_CHUNK {
        fail!("probe.vblk_chunk must be a multiple of 512 from 512 to 8 MiB");
    }
    let devs = super::discover_virtio(ctx)?;
    let (Some(buf), Some(small)) = (ctx.phys.alloc(chunk, 4096), ctx.phys.alloc(4096, 4096)) else {
        fail!("no memory for a {chunk}-byte buffer");
    };
    let p = Params {
        chunk,
        seed,
        timeout_ns,
        buf,
        small,
    };
    let mut cols = Cols::<16>::new();
    let mut n = 0;
    for d in devs.iter().filter(|d| d.kind == ID_BLK) {
        n += 1;
        cols.next_device();
        cols.put("transports", d.transport_name());
        let res = check_disk(ctx, d, &p, &mut cols);
        let _ = d.reset();
        if let Err(why) = res {
            r.kv("devices", n);
            cols.emit(r);
            fail!("{d}: {}", why.as_str());
        }
    }
    if n == 0 {
        fail!("no virtio-blk device");
    }
    r.kv("devices", n);
    cols.emit(r);
    Ok(())
}

/// Formats a failure reason.
macro_rules! why {
    ($($arg:tt)*) => {{
        let mut l = Line::<200>::new();
        let _ = write!(l, $($arg)*);
        l
    }};
}

fn check_disk(
    ctx: &mut Ctx<'_>,
    d: &Device,
    p: &Params,
    cols: &mut Cols<16>,
) -> Result<(), Line<200>> {
    let mut b = Blk::start(d, &mut ctx.phys, blk::MAX_QUEUE, p.timeout_ns)
        .map_err(|e| why!("start: {e}"))?;
    let ro = b.read_only();
    cols.put("capacity", b.capacity);
    cols.put("features", format_args!("{:#x}", b.offered));
    cols.put("ro", u8::from(ro));
    if b.has(F_BLK_SIZE) {
        cols.put("blk_size", b.blk_size);
    }
    if b.offered & F_MQ != 0 {
        cols.put("num_queues", b.num_queues);
    }

    // Serial number.
    // SAFETY: `small` is a page of ours, not in use by any device.
    unsafe { core::ptr::write_bytes(p.small as *mut u8, 0, ID_BYTES as usize) };
    let id_buf = Buf {
        addr: p.small,
        len: ID_BYTES,
        device_writes: true,
    };
    match b.request(T_GET_ID, 0, &[id_buf]) {
        Ok(S_OK) => {}
        Ok(s) => return Err(why!("get-id: status {s}")),
        Err(e) => return Err(why!("get-id: {e}")),
    }
    let mut id = [0u8; ID_BYTES as usize];
    // SAFETY: as above; the request has completed.
    unsafe { core::ptr::copy_nonoverlapping(p.small as *const u8, id.as_mut_ptr(), id.len()) };
    cols.put("serial", Serial(id));

    if b.capacity == 0 {
        return Err(why!("capacity is 0"));
    }
    let unit = b.unit();
    if ro {
        return read_only(&mut b, p, unit, cols);
    }
    if !p.chunk.is_multiple_of(unit) {
        return Err(why!(
            "probe.vblk_chunk is not a multiple of blk_size {unit}"
        ));
    }
    let cap = b.capacity;
    let per = p.chunk / SECTOR;

    // Whole disk.
    let mut written = 0;
    let mut s = 0;
    while s < cap {
        let n = per.min(cap - s);
        write_pattern(&mut b, p, s, n).map_err(|e| why!("write at sector {s}: {e}"))?;
        written += n;
        s += n;
    }
    cols.put("sectors_written", written);

    let range_fits = cap >= RANGE_SECTOR + u64::from(RANGE_SECTORS);
    if b.has(F_WRITE_ZEROES) && range_fits {
        match b.range_op(T_WRITE_ZEROES, RANGE_SECTOR, RANGE_SECTORS) {
            Ok(S_OK) => {}
            Ok(s) => return Err(why!("write-zeroes: status {s}")),
            Err(e) => return Err(why!("write-zeroes: {e}")),
        }
        // The range is 4 KiB: it fits the small page.
        let len = u64::from(RANGE_SECTORS) * SECTOR;
        // SAFETY: `small` is a page of ours, idle.
        unsafe { core::ptr::write_bytes(p.small as *mut u8, POISON, len as usize) };
        b.transfer(false, RANGE_SECTOR, p.small, len)
            .map_err(|e| why!("read after write-zeroes: {e}"))?;
        // SAFETY: the read has completed.
        let w = unsafe { words(p.small, len) };
        if w.iter().any(|&x| x != 0) {
            return Err(why!("write-zeroes: sectors 8-15 are not zero"));
        }
        rewrite_range(&mut b, p).map_err(|e| why!("rewrite after write-zeroes: {e}"))?;
        cols.put("write_zeroes", "ok");
    }
    if b.has(F_DISCARD) && range_fits {
        match b.range_op(T_DISCARD, RANGE_SECTOR, RANGE_SECTORS) {
            Ok(S_OK) => {}
            Ok(s) => {
                cols.put("discard", format_args!("status{s}"));
                return Err(why!("discard: status {s}"));
            }
            Err(e) => return Err(why!("discard: {e}")),
        }
        rewrite_range(&mut b, p).map_err(|e| why!("rewrite after discard: {e}"))?;
        cols.put("discard", "ok");
    }
    if b.has(F_FLUSH) {
        match b.request(T_FLUSH, 0, &[]) {
            Ok(S_OK) => {}
            Ok(s) => return Err(why!("flush: status {s}")),
            Err(e) => return Err(why!("flush: {e}")),
        }
    }

    // Read back and verify.
    let (mut verified, mut mismatches, mut first_bad) = (0u64, 0u64, None);
    let mut s = 0;
    while s < cap {
        let n = per.min(cap - s);
        let len = n * SECTOR;
        // SAFETY: `buf` holds `chunk` >= `len` bytes of ours, idle.
        unsafe { core::ptr::write_bytes(p.buf as *mut u8, POISON, len as usize) };
        b.transfer(false, s, p.buf, len)
            .map_err(|e| why!("read at sector {s}: {e}"))?;
        // SAFETY: the read has completed.
        let w = unsafe { words(p.buf, len) };
        for (i, sec) in w.chunks_exact(WORDS).enumerate() {
            if !sector_ok(sec, s + i as u64, p.seed) {
                mismatches += 1;
                first_bad.get_or_insert(s + i as u64);
            }
        }
        verified += n;
        s += n;
    }
    cols.put("sectors_verified", verified);
    cols.put("mismatches", mismatches);
    if let Some(bad) = first_bad {
        return Err(why!("{mismatches} sectors differ, the first is {bad}"));
    }
    Ok(())
}

/// Write the pattern of sectors `s..s+n` (n * 512 <= chunk) from `buf`.
fn write_pattern(b: &mut Blk, p: &Params, s: u64, n: u64) -> Result<(), blk::Error> {
    // SAFETY: `buf` holds `chunk` >= n * 512 bytes of ours, idle.
    let w = unsafe { words(p.buf, n * SECTOR) };
    for (i, sec) in w.chunks_exact_mut(WORDS).enumerate() {
        fill_sector(sec, s + i as u64, p.seed);
    }
    b.transfer(true, s, p.buf, n * SECTOR)
}

/// Restore the pattern of the write-zeroes/discard range.
fn rewrite_range(b: &mut Blk, p: &Params) -> Result<(), blk::Error> {
    let per = p.chunk / SECTOR;
    let end = RANGE_SECTOR + u64::from(RANGE_SECTORS);
    let mut s = RANGE_SECTOR;
    while s < end {
        let n = per.min(end - s);
        write_pattern(b, p, s, n)?;
        s += n;
    }
    Ok(())
}

/// A read-only disk: a write must fail; report sector 0's checksum.
fn read_only(b: &mut Blk, p: &Params, unit: u64, cols: &mut Cols<16>) -> Result<(), Line<200>> {
    let len = unit.min(4096);
    // SAFETY: `small` is a page of ours, idle.
    let w = unsafe { words(p.small, len) };
    for (i, sec) in w.chunks_exact_mut(WORDS).enumerate() {
        fill_sector(sec, i as u64, p.seed);
    }
    let data = Buf {
        addr: p.small,
        len: len as u32,
        device_writes: false,
    };
    let status = b
        .request(T_OUT, 0, &[data])
        .map_err(|e| why!("write to the read-only disk: {e}"))?;
    cols.put("ro_write_status", status);
    if status != S_IOERR && status != S_UNSUPP {
        return Err(why!("write to the read-only disk returned status {status}"));
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_bytes(p.small as *mut u8, POISON, len as usize) };
    let data = Buf {
        addr: p.small,
        len: len as u32,
        device_writes: true,
    };
    match b.request(T_IN, 0, &[data]) {
        Ok(S_OK) => {}
        Ok(s) => return Err(why!("read of sector 0: status {s}")),
        Err(e) => return Err(why!("read of sector 0: {e}")),
    }
    // SAFETY: the read has completed.
    let sector0 = unsafe { core::slice::from_raw_parts(p.small as *const u8, SECTOR as usize) };
    cols.put("sector0_crc", format_args!("{:#x}", fnv1a64(sector0)));
    Ok(())
}
