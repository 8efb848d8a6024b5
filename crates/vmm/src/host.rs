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

/// This process' memory and CPU time: `getrusage` for the peak and the CPU time, and
/// `/proc/self/statm` for the resident memory now (left out where it cannot be read).
pub fn process_counters() -> ::api::ProcessCounters {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage; RUSAGE_SELF needs nothing else.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } == 0;
    let ns = |t: libc::timeval| {
        (t.tv_sec.max(0) as u64).saturating_mul(1_000_000_000)
            + (t.tv_usec.max(0) as u64).saturating_mul(1_000)
    };
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let resident_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages.saturating_mul(page));
    ::api::ProcessCounters {
        resident_bytes,
        // ru_maxrss is in KiB on Linux, and the kernel updates it lazily: the memory resident
        // now may be more.
        peak_resident_bytes: if ok {
            (u.ru_maxrss.max(0) as u64).saturating_mul(1024)
        } else {
            0
        }
        .max(resident_bytes.unwrap_or(0)),
        cpu_time_ns: if ok {
            ns(u.ru_utime).saturating_add(ns(u.ru_stime))
        } else {
            0
        },
    }
}
