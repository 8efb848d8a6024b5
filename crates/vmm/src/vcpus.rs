//! The VM's vCPUs as their owner keeps them: created and set up for boot, each a component of
//! the VM (pause parks it outside `KVM_RUN`; its state is saved on its own thread while parked,
//! and restored before it first runs), started on threads of their own, and stopped.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};
use lifecycle::{Component, Section};
use vmm_sys_util::signal::Killable;

use arch::GuestMemoryMmap;
use devices::Bus;

use crate::components::{Components, Phase};
use crate::control::VmControl;
use crate::error::{kvm_err, VmmError};
use crate::snapshot::kvm::{check_cpu_features, restore_vcpu, save_vcpu, VcpuState};
use crate::sync::lock;
use crate::vcpu::{kick_signal, set_boot_msrs, ExitCounters, Vcpu};
use lifecycle::threads::{spawn, Role};

/// Layout versions of [`VcpuState`] this tern reads.
const STATE_VERSIONS: &[u32] = &[1];

/// One vCPU: before it starts, the vCPU itself; then its thread.
pub struct VcpuComponent {
    id: u8,
    ctl: Arc<VmControl>,
    /// The MSRs a snapshot saves.
    msrs: Arc<Vec<u32>>,
    vcpu: Option<Vcpu>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<ExitCounters>,
}

impl VcpuComponent {
    fn kick(&self) {
        if let Some(t) = &self.thread {
            let _ = t.kill(kick_signal());
        }
    }

    fn start(&mut self) -> Result<(), VmmError> {
        if let Some(v) = self.vcpu.take() {
            let counters = self.counters.clone();
            let t = spawn(
                Role::Vcpu,
                &crate::personality::vcpu_thread_name(self.id.into()),
                move || {
                    crate::vcpu_cgroups::join();
                    counters.track_this_thread();
                    // Forgets the thread's clock however the thread ends (its id may be reused).
                    struct Untrack(Arc<ExitCounters>);
                    impl Drop for Untrack {
                        fn drop(&mut self) {
                            self.0.untrack_this_thread();
                        }
                    }
                    let _untrack = Untrack(counters);
                    v.run();
                },
            )
            .map_err(|e| VmmError::Setup(format!("cannot start vCPU thread: {e}")))?;
            self.thread = Some(t);
        }
        Ok(())
    }
}

impl Component for VcpuComponent {
    fn pause(&mut self, deadline: Instant) -> Result<(), String> {
        self.ctl.request_park(self.id);
        if self.thread.is_none() || self.ctl.wait_parked(self.id, deadline, || self.kick()) {
            return Ok(());
        }
        self.ctl.release(self.id);
        Err("did not stop".into())
    }

    fn resume(&mut self) {
        self.ctl.release(self.id);
    }

    fn save(&mut self, id: &str) -> Result<Option<Section>, String> {
        let state = match &self.vcpu {
            Some(v) => save_vcpu(&v.fd, &self.msrs)?,
            None => self.ctl.save_parked(self.id, self.msrs.clone())?,
        };
        Section::new(id, 1, &state).map(Some)
    }

    fn restore(&mut self, section: &Section) -> Result<(), String> {
        let state: VcpuState = section.parse(STATE_VERSIONS)?;
        let Some(v) = &self.vcpu else {
            return Err("cannot restore a vCPU that has run".into());
        };
        // What this host's KVM gives a tern vCPU, read back from the freshly built one before
        // the snapshot's state replaces it.
        let host =
            v.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| format!("get CPUID: {e}"))?;
        check_cpu_features(&state.cpuid, host.as_slice())?;
        restore_vcpu(&v.fd, &state)
    }
}

/// Where vCPU 0 starts a freshly booted guest.
pub struct BootCpu<'a> {
    /// The guest's memory (for page tables and the GDT).
    pub mem: &'a GuestMemoryMmap,
    /// What the kernel loader found.
    pub boot: &'a arch::boot::BootInfo,
}

/// The VM's vCPUs.
pub struct Vcpus {
    list: Vec<Arc<Mutex<VcpuComponent>>>,
    /// vCPU 0's CPUID as tern set it: the features the guest may use.
    cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

impl Vcpus {
    /// Creates `max` vCPUs with tern's CPUID, boot MSRs and LAPIC set-up, the first `count`
    /// plugged in and the rest parked until CPU hotplug plugs them in (KVM cannot destroy a
    /// vCPU: one removed is parked, and plugged in again later); vCPU 0 gets the boot
    /// registers when `boot` is given (a restore brings its own).
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        kvm: &Kvm,
        vm: &VmFd,
        count: u8,
        max: u8,
        boot: Option<BootCpu<'_>>,
        (pio, mmio): (&Arc<Bus>, &Arc<Bus>),
        ctl: &Arc<VmControl>,
    ) -> Result<Vcpus, VmmError> {
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let msrs = Arc::new(
            kvm.get_msr_index_list()
                .map_err(kvm_err("get MSR index list"))?
                .as_slice()
                .to_vec(),
        );
        let mut list = Vec::with_capacity(max.into());
        let mut cpuid0 = Vec::new();
        for id in 0..max {
            if id >= count {
                ctl.set_plugged(id, false);
            }
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create vCPU"))?;
            let entries = arch::cpuid::vcpu_cpuid(
                supported.as_slice(),
                arch::cpuid::CpuidOptions {
                    id,
                    count: max,
                    tsc_deadline,
                },
            );
            if id == 0 {
                cpuid0 = entries.clone();
            }
            let cpuid = CpuId::from_entries(&entries)
                .map_err(|e| VmmError::Setup(format!("CPUID: {e:?}")))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
            set_boot_msrs(&fd).map_err(VmmError::Setup)?;
            let mut lapic = fd.get_lapic().map_err(kvm_err("get LAPIC"))?;
            arch::regs::set_lint(&mut lapic);
            fd.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))?;
            if let (0, Some(b)) = (id, &boot) {
                let mut sregs = fd.get_sregs().map_err(kvm_err("get sregs"))?;
                arch::regs::setup_sregs(b.mem, b.boot.mode, &mut sregs)
                    .map_err(|e| VmmError::Setup(e.to_string()))?;
                fd.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
                fd.set_regs(&arch::regs::boot_regs(b.boot.mode, b.boot.entry))
                    .map_err(kvm_err("set regs"))?;
                fd.set_fpu(&arch::regs::boot_fpu())
                    .map_err(kvm_err("set FPU"))?;
            }
            let counters = Arc::new(ExitCounters::default());
            list.push(Arc::new(Mutex::new(VcpuComponent {
                id,
                ctl: ctl.clone(),
                msrs: msrs.clone(),
                vcpu: Some(Vcpu {
                    fd,
                    id,
                    pio: pio.clone(),
                    mmio: mmio.clone(),
                    ctl: ctl.clone(),
                    counters: counters.clone(),
                }),
                thread: None,
                counters,
            })));
        }
        Ok(Vcpus {
            list,
            cpuid: cpuid0,
        })
    }

    /// Registers each vCPU as component `vcpuN`.
    pub fn register(&self, components: &mut Components) {
        for v in &self.list {
            let id = lock(v).id;
            components.register(
                &format!("vcpu{id}"),
                &format!("vCPU {id}"),
                Phase::Cpu,
                v.clone(),
            );
        }
    }

    /// Each vCPU's exit counters, by id.
    pub fn counters(&self) -> Vec<Arc<ExitCounters>> {
        self.list.iter().map(|v| lock(v).counters.clone()).collect()
    }

    /// vCPU 0's CPUID as tern set it.
    pub fn cpuid(&self) -> &[kvm_bindings::kvm_cpuid_entry2] {
        &self.cpuid
    }

    /// How many there are (plugged in or not).
    pub fn count(&self) -> usize {
        self.list.len()
    }

    /// Starts every vCPU on its own thread (one asked to park parks before it runs).
    pub fn start(&self) -> Result<(), VmmError> {
        self.list.iter().try_for_each(|v| lock(v).start())
    }

    /// Stops every vCPU (the VM is stopping): kicks each out of `KVM_RUN` until its thread
    /// ends, for at most 5 s in all.
    pub fn stop(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for v in &self.list {
            lock(v).kick();
        }
        for v in &self.list {
            let mut v = lock(v);
            let Some(t) = v.thread.take() else { continue };
            while !t.is_finished() && Instant::now() < deadline {
                let _ = t.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}
