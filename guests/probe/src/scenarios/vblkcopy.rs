//! `vblkcopy`: the guest rewrites the start of its own disk, then reboots.
//! On the first virtio-blk device it compares sectors 0.. with
//! `probe.vblkcopy_sectors` sectors (default 512) starting at sector
//! `probe.vblkcopy_from` (default 2048). If they differ, it copies those
//! sectors to sector 0, flushes, prints `probe: rebooting (vblkcopy copied …)`
//! and resets the machine through the i8042 (run tern with
//! `--on-reboot restart`). If they are equal (the boot after the copy), it
//! reports `copied=0` with the FNV-1a 64 of sector 0 and passes.
//!
//! tern's tests put an image file (say a qcow2 header naming a host file as
//! its backing file) at the source, to check that a guest writing such a
//! header into its own disk does not change how tern opens that disk.

use super::{fail, Ctx, Fail, Report, Scenario};
use crate::rt::virtio::blk::{self, Blk, F_FLUSH, SECTOR, S_OK, T_FLUSH};
use crate::rt::virtio::ID_BLK;

pub const SCENARIO: Scenario = Scenario {
    name: "vblkcopy",
    run,
};

/// Largest copy (the buffers are two of this size).
const MAX_SECTORS: u64 = 2048;

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let from = ctx.param("vblkcopy_from", 2048)?;
    let sectors = ctx.param("vblkcopy_sectors", 512)?;
    if sectors == 0 || sectors > MAX_SECTORS || from < sectors {
        fail!("probe.vblkcopy_sectors must be 1..=2048 and at most probe.vblkcopy_from");
    }
    let timeout_ns = super::virtio_timeout_ns(ctx)?;
    let devs = super::discover_virtio(ctx)?;
    let Some(d) = devs.iter().find(|d| d.kind == ID_BLK) else {
        fail!("no virtio-blk device");
    };
    let len = sectors * SECTOR;
    let (Some(src), Some(dst)) = (ctx.phys.alloc(len, 4096), ctx.phys.alloc(len, 4096)) else {
        fail!("no memory for two {len}-byte buffers");
    };
    let mut b = match Blk::start(d, &mut ctx.phys, blk::MAX_QUEUE, timeout_ns) {
        Ok(b) => b,
        Err(e) => fail!("{d}: start: {e}"),
    };
    if b.capacity < from + sectors {
        fail!("{d}: the disk is smaller than sector {}", from + sectors);
    }
    if let Err(e) = b.transfer(false, from, src, len) {
        fail!("{d}: reading the source: {e}");
    }
    if let Err(e) = b.transfer(false, 0, dst, len) {
        fail!("{d}: reading sector 0: {e}");
    }
    // SAFETY: both buffers are ours, `len` bytes, and no request uses them now.
    let (s, t) = unsafe {
        (
            core::slice::from_raw_parts(src as *const u8, len as usize),
            core::slice::from_raw_parts(dst as *const u8, len as usize),
        )
    };
    if s == t {
        r.kv("copied", 0);
        r.hex("sector0_fnv", super::vblk::fnv1a64(&t[..SECTOR as usize]));
        let _ = d.reset();
        return Ok(());
    }
    if let Err(e) = b.transfer(true, 0, src, len) {
        fail!("{d}: writing sector 0: {e}");
    }
    if b.has(F_FLUSH) {
        match b.request(T_FLUSH, 0, &[]) {
            Ok(S_OK) => {}
            Ok(st) => fail!("{d}: flush: status {st}"),
            Err(e) => fail!("{d}: flush: {e}"),
        }
    }
    let _ = d.reset();
    crate::println!("probe: rebooting (vblkcopy copied its source to sector 0)");
    crate::rt::io::outb(0x64, 0xfe);
    crate::rt::sys::halt_forever()
}
