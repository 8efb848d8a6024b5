//! `hello`: how the probe was booted and what it found.

use super::{fail, Ctx, Fail, Report, Scenario};

pub const SCENARIO: Scenario = Scenario { name: "hello", run };

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    let mib = ctx.boot.usable_bytes().div_ceil(1 << 20);
    r.kv("entry", ctx.boot.entry.name());
    r.kv("cpus", ctx.topo.count);
    r.kv("mem_mib", mib);
    r.quoted("cmdline", ctx.boot.cmdline());
    r.kv("cpus_from", ctx.topo.source.name());
    r.kv("clock", ctx.clock.name());
    if mib == 0 {
        fail!("no memory map from the boot protocol");
    }
    Ok(())
}
