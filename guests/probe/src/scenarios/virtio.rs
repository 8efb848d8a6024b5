//! `virtio`: enumerate the virtio devices on both transports (virtio-mmio v2
//! and modern virtio-pci on bus 0). Nothing is driven; discovery maps the
//! devices' registers and enables memory decoding + bus mastering on the PCI
//! functions.

use core::fmt::Write;

use super::{Ctx, Fail, Line, Report, Scenario};

pub const SCENARIO: Scenario = Scenario {
    name: "virtio",
    run,
};

fn run(ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    let devs = super::discover_virtio(ctx)?;
    let count = |t: &str| devs.iter().filter(|d| d.transport_name() == t).count();
    r.kv("devices", devs.len());
    r.kv("mmio", count("mmio"));
    r.kv("pci", count("pci"));
    r.kv("legacy", devs.legacy);
    let mut list = Line::<512>::new();
    let mut regs = Line::<1024>::new();
    for (i, d) in devs.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(list, "{sep}{}:{}", d.transport_name(), d.kind);
        let _ = write!(regs, "{sep}{:#x}", d.regs_addr());
    }
    let none = devs.is_empty();
    r.kv("list", if none { "none" } else { list.as_str() });
    r.kv("regs", if none { "none" } else { regs.as_str() });
    Ok(())
}
