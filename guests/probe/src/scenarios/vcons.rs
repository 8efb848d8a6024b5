//! `vcons`: write the line `probe: hvc0 hello` (plus `\n`) through transmitq0
//! of the first virtio-console (type 3), virtio-mmio devices first. Both
//! queues (receiveq0, transmitq0) are set up; no receive buffers are posted.

use super::{fail, Ctx, Fail, Report, Scenario};
use crate::rt::clock;
use crate::rt::virtio::{Buf, Virtqueue, ID_CONSOLE};

pub const SCENARIO: Scenario = Scenario { name: "vcons", run };

const LINE: &[u8] = b"probe: hvc0 hello\n";
const TRANSMITQ0: usize = 1;

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let timeout_ns = super::virtio_timeout_ns(ctx)?;
    let devs = super::discover_virtio(ctx)?;
    let Some(d) = devs.iter().find(|d| d.kind == ID_CONSOLE).copied() else {
        fail!("no virtio-console device");
    };
    r.kv("transport", d.transport_name());
    let Some(buf) = ctx.phys.alloc(4096, 4096) else {
        fail!("no memory for the buffer");
    };
    // SAFETY: `buf` is a fresh page of our RAM.
    unsafe { core::ptr::copy_nonoverlapping(LINE.as_ptr(), buf as *mut u8, LINE.len()) };
    let mut qs = [Virtqueue::EMPTY; 2];
    let sent = d.start(&mut ctx.phys, &mut qs, 16).and_then(|()| {
        let q = &mut qs[TRANSMITQ0];
        let t0 = clock::now_ns();
        q.push(&[Buf {
            addr: buf,
            len: LINE.len() as u32,
            device_writes: false,
        }])?;
        d.notify(q);
        q.wait_used(timeout_ns)?;
        Ok(clock::now_ns().wrapping_sub(t0))
    });
    let _ = d.reset();
    match sent {
        Ok(ns) => {
            r.kv("bytes", LINE.len());
            r.kv("tx_ns", ns);
            Ok(())
        }
        Err(why) => fail!("{d}: {why}"),
    }
}
