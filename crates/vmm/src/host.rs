//! Facts about the host's KVM that change what a user can expect.

use std::path::Path;

/// Why this host's `/dev/kvm` is emulation-backed, if it is: guest ring-0 code is then emulated
/// instruction by instruction and a stock Linux kernel cannot boot in reasonable time.
pub fn emulation_backed_kvm() -> Option<String> {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some("the kvm_pvm module serves /dev/kvm".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    if !has("vmx") && !has("svm") {
        return Some("the CPU has neither the vmx nor the svm flag".into());
    }
    None
}

/// The physical address bits this host's CPUs have (CPUID 0x8000_0008), which KVM passes on to
/// the guest's vCPUs unchanged; 36 if the leaf is missing.
pub fn phys_bits() -> u8 {
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max < 0x8000_0008 {
        return 36;
    }
    (std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff) as u8
}
