//! Per-vCPU CPUID, derived from what KVM supports on this host.
//!
//! tern starts from `KVM_GET_SUPPORTED_CPUID` and then: writes the APIC ID and topology for
//! vCPU `id` of `count` (leaves 0x1, 0x4, 0xb, 0x1f, 0x8000_0008, 0x8000_001e), sets the
//! hypervisor bit, and hides what a guest must not see or use (nested virtualization, the
//! performance-monitoring unit, and leaves that would leak the host's cache/core layout).

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: VMX.
const ECX_VMX: u32 = 1 << 5;
/// Leaf 1 ECX: PDCM (perf capabilities MSR).
const ECX_PDCM: u32 = 1 << 15;
/// Leaf 1 ECX: TSC deadline timer.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: hypervisor present.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: HTT (more than one logical processor per package).
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: SVM.
const ECX_SVM: u32 = 1 << 2;
/// Leaf 0x8000_0001 ECX: CmpLegacy.
const ECX_CMP_LEGACY: u32 = 1 << 1;

/// Number of bits needed to hold `n` distinct IDs.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Options for CPUID derivation.
#[derive(Clone, Copy, Debug)]
pub struct CpuidOptions {
    /// This vCPU's index (= its APIC ID).
    pub id: u8,
    /// Number of vCPUs in the VM.
    pub count: u8,
    /// Whether the in-kernel LAPIC supports the TSC-deadline timer.
    pub tsc_deadline: bool,
}

/// Returns the CPUID entries for one vCPU, derived from the host-supported set.
pub fn vcpu_cpuid(supported: &[kvm_cpuid_entry2], opts: CpuidOptions) -> Vec<kvm_cpuid_entry2> {
    let id = u32::from(opts.id);
    let count = u32::from(opts.count.max(1));
    let core_bits = bits_for(count);
    let mut out = Vec::with_capacity(supported.len());
    for e in supported {
        let mut e = *e;
        match e.function {
            0x1 => {
                // EBX[31:24] initial APIC ID, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size (keep).
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count.min(255)) << 16);
                e.ecx |= ECX_HYPERVISOR;
                e.ecx &= !(ECX_VMX | ECX_PDCM);
                if opts.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // Deterministic cache parameters: EAX[31:26] = cores per package - 1 (one vCPU per
            // core); only for real cache levels (type != 0).
            0x4 if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & 0x3fff) | ((count - 1).min(63) << 26);
            }
            0x6 => {
                // Thermal and power management: nothing for a guest.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xa => {
                // Architectural performance monitoring: hidden.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (one thread per core), level 1 = core.
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = 1 | (2 << 8);
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
            }
            0x8000_0001 => {
                e.ecx &= !ECX_SVM;
                if count > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 => {
                // ECX[15:12] APIC ID size, [7:0] number of cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits.max(1) << 12) | (count - 1);
            }
            0x8000_001e => {
                // Extended APIC ID, compute unit (one thread per unit), node 0.
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0008_0800,
            ecx: ECX_VMX | ECX_PDCM,
            eax: 0x121,
            ..Default::default()
        }
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn bits() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(254), 8);
    }

    #[test]
    fn apic_ids_and_topology_for_n_vcpus() {
        let base = vec![
            entry(1, 0),
            entry(4, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0xa, 0),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
        ];
        for (id, count) in [(0u8, 1u8), (1, 2), (5, 6), (253, 254)] {
            let v = vcpu_cpuid(
                &base,
                CpuidOptions {
                    id,
                    count,
                    tsc_deadline: true,
                },
            );
            let l1 = find(&v, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(id));
            assert_eq!((l1.ebx >> 16) & 0xff, u32::from(count));
            assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_eq!(l1.ecx & (ECX_VMX | ECX_PDCM), 0);
            assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
            assert_eq!(l1.edx & EDX_HTT != 0, count > 1);
            assert_eq!(find(&v, 0xb, 0).edx, u32::from(id));
            assert_eq!(find(&v, 0xb, 1).ebx, u32::from(count));
            assert!(1u32 << find(&v, 0xb, 1).eax >= u32::from(count));
            assert_eq!(find(&v, 0xb, 2).ecx, 2);
            assert_eq!(find(&v, 4, 0).eax >> 26, (u32::from(count) - 1).min(63));
            assert_eq!(find(&v, 0xa, 0).eax, 0);
            assert_eq!(find(&v, 0x8000_0001, 0).ecx & ECX_SVM, 0);
            assert_eq!(find(&v, 0x8000_0008, 0).ecx & 0xff, u32::from(count) - 1);
        }
    }

    #[test]
    fn zero_count_is_treated_as_one() {
        let v = vcpu_cpuid(
            &[entry(1, 0)],
            CpuidOptions {
                id: 0,
                count: 0,
                tsc_deadline: false,
            },
        );
        assert_eq!((v[0].ebx >> 16) & 0xff, 1);
        assert_eq!(v[0].ecx & ECX_TSC_DEADLINE, 0);
    }
}
