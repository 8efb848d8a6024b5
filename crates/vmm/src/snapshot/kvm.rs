//! Saving and restoring KVM's own state: each vCPU's registers, MSRs, LAPIC and events, and
//! the VM-wide irqchips, PIT and clock; and the check that a snapshot's CPU features exist on
//! this host.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// One vCPU's KVM state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub(crate) cpuid: Vec<kvm_cpuid_entry2>,
    msrs: Vec<kvm_msr_entry>,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
}

/// The VM-wide KVM state.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

impl VcpuState {
    /// The vCPU's CPUID as saved.
    pub fn cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.cpuid
    }
}

/// Captures a vCPU's state; `msr_list` names the MSRs to save. Called on the vCPU's thread
/// while it is parked outside `KVM_RUN`.
pub fn save_vcpu(fd: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(e("get CPUID"))?
        .as_slice()
        .to_vec();
    let mut msrs = Msrs::from_entries(
        &msr_list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .map_err(|err| format!("MSR list: {err:?}"))?;
    // KVM stops at the first MSR it cannot read; skip that one and carry on.
    let mut saved = Vec::new();
    let mut rest: Vec<kvm_msr_entry> = msrs.as_slice().to_vec();
    while !rest.is_empty() {
        msrs = Msrs::from_entries(&rest).map_err(|err| format!("MSR list: {err:?}"))?;
        let n = fd.get_msrs(&mut msrs).map_err(e("get MSRs"))?;
        saved.extend_from_slice(&msrs.as_slice()[..n]);
        rest.drain(..(n + 1).min(rest.len()));
    }
    Ok(VcpuState {
        cpuid,
        msrs: saved,
        regs: fd.get_regs().map_err(e("get registers"))?,
        sregs: fd.get_sregs().map_err(e("get special registers"))?,
        xsave: fd.get_xsave().map_err(e("get XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(e("get XCRs"))?,
        lapic: fd.get_lapic().map_err(e("get LAPIC"))?,
        mp_state: fd.get_mp_state().map_err(e("get MP state"))?,
        events: fd.get_vcpu_events().map_err(e("get vCPU events"))?,
    })
}

/// Puts a saved state into a vCPU (created, not yet run).
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|err| format!("CPUID: {err:?}"))?;
    fd.set_cpuid2(&cpuid).map_err(e("set CPUID"))?;
    fd.set_sregs(&s.sregs).map_err(e("set special registers"))?;
    fd.set_regs(&s.regs).map_err(e("set registers"))?;
    // SAFETY: KVM_SET_XSAVE reads a `kvm_xsave` of the size the process's enabled XSAVE
    // features need; tern never enables dynamic XSTATE features (no arch_prctl
    // ARCH_REQ_XCOMP_GUEST_PERM), so that is the 4096 bytes `s.xsave` holds. Its contents come
    // from the snapshot file and are not trusted: KVM checks them and fails the call with
    // EINVAL on a bad XSAVE header, it never reads past the struct because of them.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(e("set XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(e("set XCRs"))?;
    // The LAPIC before the MSRs: KVM drops a write of IA32_TSC_DEADLINE unless the APIC is
    // enabled (the APIC base, from the special registers) and its timer is in TSC-deadline
    // mode (LVTT, from the LAPIC state). Written earlier, a guest's armed deadline timer would
    // be lost and the guest would wait for a timer interrupt that never comes.
    fd.set_lapic(&s.lapic).map_err(e("set LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|err| format!("MSRs: {err:?}"))?;
    let n = fd.set_msrs(&msrs).map_err(e("set MSRs"))?;
    if n != s.msrs.len() {
        tracing::warn!(
            "KVM took {n} of {} saved MSRs (next: {:#x})",
            s.msrs.len(),
            s.msrs[n].index
        );
    }
    fd.set_mp_state(s.mp_state).map_err(e("set MP state"))?;
    fd.set_vcpu_events(&s.events)
        .map_err(e("set vCPU events"))?;
    Ok(())
}

/// The CPUID feature registers a snapshot's vCPUs may rely on: (leaf, subleaf, register
/// name, register index: eax 0, ebx 1, ecx 2, edx 3).
/// Bits KVM sets in a running vCPU's CPUID from the guest's own control registers, not from
/// what the CPU has: OSXSAVE (leaf 1 ecx bit 27, CR4.OSXSAVE) and OSPKE (leaf 7.0 ecx bit 4,
/// CR4.PKE). A snapshot of any guest that enabled XSAVE carries them; the host's set never does.
const GUEST_SET_BITS: &[(u32, u32, usize, u32)] = &[(0x1, 0, 2, 1 << 27), (0x7, 0, 2, 1 << 4)];

const FEATURE_REGS: &[(u32, u32, &str, usize)] = &[
    (0x1, 0, "ecx", 2),
    (0x1, 0, "edx", 3),
    (0x7, 0, "ebx", 1),
    (0x7, 0, "ecx", 2),
    (0x7, 0, "edx", 3),
    (0x7, 1, "eax", 0),
    (0xd, 1, "eax", 0),
    (0x8000_0001, 0, "ecx", 2),
    (0x8000_0001, 0, "edx", 3),
    (0x8000_0007, 0, "edx", 3),
    (0x8000_0008, 0, "ebx", 1),
];

/// Fails, naming the missing bits, when the saved vCPU CPUID has a feature that `host` (what
/// tern gives a vCPU on this host) lacks: the guest would use an instruction this CPU does not
/// run. Features the host has and the snapshot lacks are fine (the guest does not use them).
pub fn check_cpu_features(
    saved: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> Result<(), String> {
    let reg = |entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32, r: usize| {
        entries
            .iter()
            .find(|e| e.function == leaf && (e.index == sub || (sub == 0 && e.flags & 1 == 0)))
            .map_or(0, |e| [e.eax, e.ebx, e.ecx, e.edx][r])
    };
    let missing: Vec<String> = FEATURE_REGS
        .iter()
        .filter_map(|&(leaf, sub, name, r)| {
            let guest_set: u32 = GUEST_SET_BITS
                .iter()
                .filter(|g| (g.0, g.1, g.2) == (leaf, sub, r))
                .map(|g| g.3)
                .sum();
            let m = reg(saved, leaf, sub, r) & !reg(host, leaf, sub, r) & !guest_set;
            (m != 0).then(|| format!("CPUID {leaf:#x}.{sub} {name} bits {m:#x}"))
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the snapshot was taken on a CPU with features this host lacks ({}); restore it on a host with the same CPU model",
            missing.join(", ")
        ))
    }
}

/// Captures the VM-wide state.
pub fn save_vm(vm: &VmFd) -> Result<VmState, String> {
    let mut irqchips = Vec::new();
    for id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(|err| format!("get irqchip {id}: {err}"))?;
        irqchips.push(c);
    }
    Ok(VmState {
        irqchips,
        pit: vm.get_pit2().map_err(|err| format!("get PIT: {err}"))?,
        clock: vm.get_clock().map_err(|err| format!("get clock: {err}"))?,
    })
}

/// Puts the VM-wide state back.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), String> {
    for c in &s.irqchips {
        vm.set_irqchip(c)
            .map_err(|err| format!("set irqchip {}: {err}", c.chip_id))?;
    }
    vm.set_pit2(&s.pit)
        .map_err(|err| format!("set PIT: {err}"))?;
    let mut clock = s.clock;
    // Only the clock value is restored; the flags describe the host it came from.
    clock.flags = 0;
    vm.set_clock(&clock)
        .map_err(|err| format!("set clock: {err}"))
}

/// The KVM VM's own state (irqchips, PIT, clock) as a component of the VM.
pub struct KvmVm(pub std::sync::Arc<VmFd>);

impl lifecycle::Component for KvmVm {
    fn save(&mut self, id: &str) -> Result<Option<lifecycle::Section>, String> {
        lifecycle::Section::new(id, 1, &save_vm(&self.0)?).map(Some)
    }

    fn restore(&mut self, section: &lifecycle::Section) -> Result<(), String> {
        restore_vm(&self.0, &section.parse(&[1])?)
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use kvm_ioctls::Kvm;

    use super::*;

    const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
    /// LVT timer register offset in the LAPIC page; mode bits 18:17 = 10b is TSC-deadline.
    const APIC_LVTT: usize = 0x320;
    const LVTT_TSC_DEADLINE: u32 = 2 << 17;

    /// A VM with an in-kernel irqchip and one vCPU with KVM's supported CPUID (which offers
    /// the TSC-deadline timer).
    fn vm_and_vcpu(kvm: &Kvm) -> (VmFd, VcpuFd) {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        (vm, vcpu)
    }

    fn tsc_deadline(vcpu: &VcpuFd) -> u64 {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC_DEADLINE,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
        msrs.as_slice()[0].data
    }

    /// A guest's armed TSC-deadline timer survives save and restore (KVM ignores the deadline
    /// MSR unless the LAPIC is already in TSC-deadline mode, so the order of restoring matters;
    /// a lost deadline leaves a Linux guest waiting for a timer interrupt forever).
    #[test]
    fn restore_keeps_an_armed_tsc_deadline_timer() {
        let Some(kvm) =
            crate::component_tests::kvm_or_skip("restore_keeps_an_armed_tsc_deadline_timer")
        else {
            return;
        };
        let (_vm, a) = vm_and_vcpu(&kvm);
        let mut lapic = a.get_lapic().unwrap();
        let lvtt = LVTT_TSC_DEADLINE | 0xec;
        for (i, b) in lvtt.to_le_bytes().iter().enumerate() {
            lapic.regs[APIC_LVTT + i] = *b as _;
        }
        a.set_lapic(&lapic).unwrap();
        // Far in the future: the timer must stay armed, not fire.
        let deadline = 1u64 << 60;
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC_DEADLINE,
            data: deadline,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(a.set_msrs(&msrs).unwrap(), 1);
        assert_eq!(
            tsc_deadline(&a),
            deadline,
            "KVM did not arm the deadline timer"
        );

        let msr_list = kvm.get_msr_index_list().unwrap();
        let saved = save_vcpu(&a, msr_list.as_slice()).unwrap();
        assert!(saved.msrs.iter().any(|m| m.index == MSR_IA32_TSC_DEADLINE));
        let (_vm2, b) = vm_and_vcpu(&kvm);
        restore_vcpu(&b, &saved).unwrap();
        assert_eq!(
            tsc_deadline(&b),
            deadline,
            "the restored vCPU lost its TSC-deadline timer"
        );
    }

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 0x7 || function == 0xd {
                1
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn cpu_features_must_be_a_subset_of_the_hosts() {
        let host = vec![
            leaf(0x1, 0, [0, 0, 0x8000_0001, 0xff]),
            leaf(0x7, 0, [0, 0b1011, 0, 0]),
            leaf(0x7, 1, [0, 0, 0, 0]),
        ];
        // Fewer features than the host: fine.
        let older = vec![
            leaf(0x1, 0, [0, 0, 1, 0x0f]),
            leaf(0x7, 0, [0, 0b0001, 0, 0]),
        ];
        assert!(check_cpu_features(&older, &host).is_ok());
        // A feature the host lacks (leaf 7 ebx bit 2): refused, naming it.
        let newer = vec![
            leaf(0x1, 0, [0, 0, 1, 0x0f]),
            leaf(0x7, 0, [0, 0b0101, 0, 0]),
        ];
        let e = check_cpu_features(&newer, &host).unwrap_err();
        assert!(e.contains("CPUID 0x7.0 ebx bits 0x4"), "{e}");
        // A leaf the host does not have at all.
        let e = check_cpu_features(&[leaf(0x8000_0001, 0, [0, 0, 0x20, 0])], &host).unwrap_err();
        assert!(e.contains("CPUID 0x80000001.0 ecx bits 0x20"), "{e}");
        // OSXSAVE and OSPKE come from the guest's CR4 (KVM sets them in a running vCPU's
        // CPUID), never from the host's set: a guest that enabled XSAVE restores.
        let xsave_guest = vec![
            leaf(0x1, 0, [0, 0, 1 | 1 << 27, 0x0f]),
            leaf(0x7, 0, [0, 0b0001, 1 << 4, 0]),
        ];
        assert!(check_cpu_features(&xsave_guest, &host).is_ok());
    }
}
