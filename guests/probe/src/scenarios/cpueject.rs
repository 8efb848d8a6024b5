//! `cpueject`: plays the part of a guest's ACPI code ejecting a vCPU, on tern's CPU hotplug
//! controller (ports 0xcd8..0xce4: a 32-bit selector at +0, flags at +4, bit 3 ejects). After
//! `probe.cpueject_ms` (default 500) ms it selects vCPU `probe.cpueject_id` (default 1), reads
//! its flags, writes the eject bit, reads them again, and prints
//! `probe: cpueject id=N before=F after=G`. The host checks that tern parked that vCPU and
//! goes on.

use super::{Ctx, Fail, Report, Scenario};
use crate::rt::clock;
use crate::rt::io::{inb, outb, outl};

pub const SCENARIO: Scenario = Scenario {
    name: "cpueject",
    run,
};

const PORT: u16 = 0xcd8;

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    ctx.need_clock()?;
    let id = ctx.param("cpueject_id", 1)?;
    let wait = ctx.param("cpueject_ms", 500)? * 1_000_000;
    clock::delay_ns(wait);
    outl(PORT, id as u32);
    let before = inb(PORT + 4);
    outb(PORT + 4, 8);
    let after = inb(PORT + 4);
    crate::println!("probe: cpueject id={id} before={before} after={after}");
    r.kv("id", id);
    r.kv("before", before);
    r.kv("after", after);
    Ok(())
}
