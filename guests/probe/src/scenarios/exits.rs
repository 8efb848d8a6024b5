//! `exits`: cost of VM exits. `probe.exits` (default 10000) byte writes to
//! the unclaimed port 0x700 and 32-bit writes to the unclaimed MMIO address
//! 0xD000_0000, from ring 3 and from ring 0 (a ring-0 loop behind one
//! syscall), timed with the reference clock. Values are ns per exit, including
//! the loop around it (on the development host each ring-0 instruction is
//! emulated, so `r0_*` include ~4 emulated loop instructions).

use super::{Ctx, Fail, Report, Scenario};
use crate::layout::{MMIO_UNCLAIMED, PORT_UNCLAIMED};
use crate::rt::{clock, io, sys};

pub const SCENARIO: Scenario = Scenario { name: "exits", run };

fn timed(f: impl FnOnce()) -> u64 {
    let t0 = clock::now_ns();
    f();
    clock::now_ns().wrapping_sub(t0)
}

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let n = ctx.param("exits", 10_000)?.max(1);
    let n0 = ctx.param("exits_r0", n)?;

    let pio = timed(|| {
        for _ in 0..n {
            io::outb(PORT_UNCLAIMED, 0);
        }
    });
    let mmio = timed(|| {
        for _ in 0..n {
            // SAFETY: unclaimed MMIO address: the write exits and is discarded.
            unsafe { io::mmio_write32(MMIO_UNCLAIMED, 0) };
        }
    });
    r.kv("pio_n", n);
    r.kv("pio_ns", pio / n);
    r.kv("mmio_n", n);
    r.kv("mmio_ns", mmio / n);
    if n0 > 0 {
        let r0_pio = timed(|| {
            sys::syscall(sys::nr::PIO_WRITE_LOOP, u64::from(PORT_UNCLAIMED), n0, 0, 0);
        });
        let r0_mmio = timed(|| {
            sys::syscall(sys::nr::MMIO_WRITE_LOOP, MMIO_UNCLAIMED, n0, 0, 0);
        });
        r.kv("r0_n", n0);
        r.kv("r0_pio_ns", r0_pio / n0);
        r.kv("r0_mmio_ns", r0_mmio / n0);
    }
    // Cost of a null syscall round trip (ring 3 -> 0 -> 3), for reference.
    let sc = timed(|| {
        for _ in 0..1000 {
            sys::syscall(u64::MAX, 0, 0, 0, 0);
        }
    });
    r.kv("syscall_ns", sc / 1000);
    Ok(())
}
