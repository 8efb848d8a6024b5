//! Scenario registry and the output-line helpers.
//!
//! Adding a scenario: write `scenarios/<name>.rs` with a
//! `pub const SCENARIO: Scenario`, and list it in `SCENARIOS`. A scenario gets
//! the shared context (boot info, parameters, memory, CPUs, clock) and a
//! `Report` to which it adds `key=value` pairs; it returns `Err(Fail)` with a
//! reason to fail. It runs on the BSP in ring 3.

use core::fmt::{self, Write};

use crate::rt::bootinfo::BootInfo;
use crate::rt::clock;
use crate::rt::cmdline::Params;
use crate::rt::phys::PhysAlloc;
use crate::rt::smp::Topology;

mod count;
mod cpueject;
mod cpuid;
mod exits;
mod hello;
mod mem;
mod smp;
mod timer;
mod vballoon;
mod vblk;
mod vblkbench;
mod vblkcopy;
mod vblkhostile;
mod vcons;
mod vhostile;
mod virtio;
mod vmem;
mod vnet;
mod vnetbench;
mod vnethostile;
mod vrng;

pub struct Scenario {
    pub name: &'static str,
    pub run: fn(&mut Ctx<'_>, &mut Report) -> Result<(), Fail>,
}

/// Every scenario, in the order documented in the README.
pub static SCENARIOS: &[Scenario] = &[
    hello::SCENARIO,
    smp::SCENARIO,
    mem::SCENARIO,
    timer::SCENARIO,
    exits::SCENARIO,
    cpuid::SCENARIO,
    virtio::SCENARIO,
    vrng::SCENARIO,
    vcons::SCENARIO,
    vhostile::SCENARIO,
    vblk::SCENARIO,
    vblkhostile::SCENARIO,
    vblkbench::SCENARIO,
    vblkcopy::SCENARIO,
    vnet::SCENARIO,
    vnethostile::SCENARIO,
    vnetbench::SCENARIO,
    count::SCENARIO,
    vballoon::SCENARIO,
    vmem::SCENARIO,
    cpueject::SCENARIO,
];

pub struct Ctx<'a> {
    pub boot: &'a BootInfo,
    pub params: Params<'a>,
    pub phys: PhysAlloc,
    pub topo: Topology,
    pub clock: clock::Source,
}

impl Ctx<'_> {
    /// Numeric `probe.<key>` parameter, failing the scenario if malformed.
    pub fn param(&self, key: &str, default: u64) -> Result<u64, Fail> {
        self.params
            .u64(key, default)
            .map_err(|v| Fail::new(format_args!("bad probe.{key}={v}")))
    }

    /// Fail unless a reference clock is available.
    pub fn need_clock(&self) -> Result<(), Fail> {
        if self.clock == clock::Source::None {
            return Err(Fail::new(format_args!(
                "no reference clock (kvmclock or TSC frequency)"
            )));
        }
        Ok(())
    }
}

/// Every virtio device on both transports (see `rt::virtio::discover`).
fn discover_virtio(ctx: &mut Ctx<'_>) -> Result<crate::rt::virtio::Devices, Fail> {
    crate::rt::virtio::discover(ctx.boot.cmdline(), &mut ctx.phys)
        .map_err(|e| Fail::new(format_args!("virtio discovery: {e}")))
}

/// `probe.virtio_timeout_ms` (default 1000) in nanoseconds: how long a
/// virtio request may take.
fn virtio_timeout_ns(ctx: &Ctx<'_>) -> Result<u64, Fail> {
    Ok(ctx
        .param("virtio_timeout_ms", 1000)?
        .saturating_mul(1_000_000))
}

/// A fixed-capacity text buffer (no allocator in the probe).
pub struct Line<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Line<N> {
    pub const fn new() -> Self {
        Line {
            buf: [0; N],
            len: 0,
        }
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl<const N: usize> Write for Line<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The `key=value` pairs of a scenario's output line.
pub struct Report(Line<1536>);

impl Report {
    /// `key=value` with the value's Display form.
    pub fn kv(&mut self, key: &str, value: impl fmt::Display) {
        let _ = write!(self.0, " {key}={value}");
    }

    /// `key=0x…` (lower-case hex).
    pub fn hex(&mut self, key: &str, value: u64) {
        let _ = write!(self.0, " {key}={value:#x}");
    }

    /// `key="…"` (the value must not contain `"`).
    pub fn quoted(&mut self, key: &str, value: &str) {
        let _ = write!(self.0, " {key}=\"{value}\"");
    }

    /// `key=a,b,c`.
    pub fn list(&mut self, key: &str, values: impl Iterator<Item = u64>) {
        let _ = write!(self.0, " {key}=");
        for (i, v) in values.enumerate() {
            let _ = write!(self.0, "{}{v}", if i == 0 { "" } else { "," });
        }
    }
}

/// Why a scenario failed.
pub struct Fail(Line<256>);

impl Fail {
    pub fn new(args: fmt::Arguments<'_>) -> Self {
        let mut l = Line::new();
        let _ = l.write_fmt(args);
        Fail(l)
    }
}

/// `fail!("why {}", x)` returns `Err(Fail)` from a scenario.
macro_rules! fail {
    ($($arg:tt)*) => { return Err($crate::scenarios::Fail::new(format_args!($($arg)*))) };
}
pub(crate) use fail;

fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

fn run_one(ctx: &mut Ctx<'_>, s: &Scenario) -> bool {
    let mut report = Report(Line::new());
    match (s.run)(ctx, &mut report) {
        Ok(()) => {
            crate::println!("probe: {} ok{}", s.name, report.0.as_str());
            true
        }
        Err(why) => {
            crate::println!(
                "probe: {} FAIL {}{}",
                s.name,
                why.0.as_str(),
                report.0.as_str()
            );
            false
        }
    }
}

/// Run `hello`, then every scenario of `probe.run=` in order. Returns the
/// exit status: 0 if all passed, 1 otherwise.
pub fn run_all(ctx: &mut Ctx<'_>) -> u8 {
    let mut ok = run_one(ctx, &hello::SCENARIO);
    let list = ctx.params.get("run").unwrap_or("hello");
    for name in list.split(',').filter(|n| !n.is_empty() && *n != "hello") {
        ok &= match find(name) {
            Some(s) => run_one(ctx, s),
            None => {
                crate::println!("probe: {name} FAIL unknown scenario");
                false
            }
        };
    }
    if ok {
        crate::layout::EXIT_PASS
    } else {
        crate::layout::EXIT_FAIL
    }
}
