//! `cpuid`: what CPUID shows the guest (executed in ring 3), and whether ring
//! 0 sees the same for leaves 0, 1, 0x40000000 and 0x40000001.

use core::fmt::Write;

use super::{Ctx, Fail, Report, Scenario};
use crate::rt::cpuid::{cpuid, hypervisor, max_leaf, sig_str, vendor};
use crate::rt::sys;

pub const SCENARIO: Scenario = Scenario { name: "cpuid", run };

fn bit(v: u32, n: u32) -> u32 {
    (v >> n) & 1
}

fn run(_ctx: &mut Ctx<'_>, r: &mut Report) -> Result<(), Fail> {
    let mut buf = [0u8; 12];
    let v = vendor();
    let n = sig_str(&v, &mut buf);
    r.kv("vendor", core::str::from_utf8(&buf[..n]).unwrap_or("?"));

    let l1 = cpuid(1, 0);
    let base_family = (l1.eax >> 8) & 0xf;
    let mut family = base_family;
    let mut model = (l1.eax >> 4) & 0xf;
    if base_family == 0xf {
        family += (l1.eax >> 20) & 0xff;
    }
    if base_family == 0x6 || base_family == 0xf {
        model |= ((l1.eax >> 16) & 0xf) << 4;
    }
    r.hex("family", u64::from(family));
    r.hex("model", u64::from(model));
    r.kv("stepping", l1.eax & 0xf);
    r.hex("max_leaf", u64::from(max_leaf()));
    r.hex("max_ext_leaf", u64::from(cpuid(0x8000_0000, 0).eax));

    let (hv_sig, hv_max) = hypervisor();
    let n = sig_str(&hv_sig, &mut buf);
    let hv_present = bit(l1.ecx, 31) == 1;
    r.kv(
        "hv_sig",
        if n == 0 {
            "none"
        } else {
            core::str::from_utf8(&buf[..n]).unwrap_or("?")
        },
    );
    r.hex("hv_max_leaf", u64::from(hv_max));
    let kvm = &hv_sig == b"KVMKVMKVM\0\0\0" && hv_max >= 0x4000_0001;
    let kvm_features = if kvm { cpuid(0x4000_0001, 0).eax } else { 0 };

    r.kv("x2apic", bit(l1.ecx, 21));
    r.kv("hypervisor", u32::from(hv_present));
    r.kv("tsc_deadline", bit(l1.ecx, 24));
    r.kv(
        "kvmclock",
        u32::from(kvm && (bit(kvm_features, 0) | bit(kvm_features, 3)) == 1),
    );
    r.hex("kvm_features", u64::from(kvm_features));

    // Ring 0 vs ring 3, same CPU: on the development host's KVM ring-0 CPUID
    // is the host's raw CPUID while ring 3 gets the VMM's CPUID table.
    let mut diff = super::Line::<128>::new();
    for leaf in [0u32, 1, 0x4000_0000, 0x4000_0001] {
        let a = cpuid(leaf, 0);
        let b = sys::cpuid_ring0(leaf, 0);
        for (name, x, y) in [
            ("eax", a.eax, b[0]),
            ("ebx", a.ebx, b[1]),
            ("ecx", a.ecx, b[2]),
            ("edx", a.edx, b[3]),
        ] {
            if x != y {
                let sep = if diff.as_str().is_empty() { "" } else { "," };
                let _ = write!(diff, "{sep}{leaf:#x}.{name}");
            }
        }
    }
    r.kv("ring0_same", u32::from(diff.as_str().is_empty()));
    if !diff.as_str().is_empty() {
        r.kv("ring0_diff", diff.as_str());
    }
    Ok(())
}
