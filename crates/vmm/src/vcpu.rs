//! vCPU threads: configure each vCPU, loop on `KVM_RUN`, dispatch PIO/MMIO exits to the buses,
//! and get kicked out of `KVM_RUN` cleanly (`immediate_exit` set from a signal handler).

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Once};

use kvm_bindings::{
    kvm_regs, kvm_sregs, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::control::{VmControl, VmExit};
use devices::Bus;

/// Signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer was set by this thread to its own kvm_run mapping, which
            // outlives the thread's run loop; a single volatile byte store is signal-safe.
            unsafe { p.write_volatile(1) };
        }
    });
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    res
}

/// What a read nobody answers returns, byte by byte: all ones, as on a PC's buses where no
/// device drives the lines. Firmware and drivers take it as "nothing here": OVMF, for one,
/// probes the TPM interface at 0xfed40000 and gives up at once on 0xff, where a 0 made it poll
/// for 1.5 s of timeouts (about 100,000 exits) on every boot.
pub const UNCLAIMED_READ: u8 = 0xff;

/// Exit counters of one vCPU.
#[derive(Default)]
pub struct ExitCounters {
    /// Port I/O exits.
    pub pio: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// Other exits.
    pub other: AtomicU64,
    /// The CPU-time clock of the vCPU's thread (0 until the thread starts).
    cpu_clock: AtomicI32,
    /// The last CPU time read from that clock, in nanoseconds: what is shown once the thread
    /// has ended.
    cpu_time_ns: AtomicU64,
}

impl ExitCounters {
    /// Called on the vCPU's thread: its CPU time is what [`cpu_time_ns`](Self::cpu_time_ns)
    /// reads from now on.
    pub fn track_this_thread(&self) {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_getcpuclockid only writes the clock id it is given a place for, and
        // pthread_self is this live thread.
        if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } == 0 {
            self.cpu_clock.store(clock, Ordering::Relaxed);
        }
    }

    /// Called on the vCPU's thread as it ends: its last CPU time stays.
    pub fn untrack_this_thread(&self) {
        self.cpu_time_ns();
        self.cpu_clock.store(0, Ordering::Relaxed);
    }

    /// CPU time the vCPU's thread has used, in nanoseconds (from any thread).
    pub fn cpu_time_ns(&self) -> u64 {
        let clock = self.cpu_clock.load(Ordering::Relaxed);
        if clock != 0 {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime only writes the timespec it is given; a clock whose thread
            // has ended makes it fail (EINVAL), and the last value read stays.
            // `untrack_this_thread` forgets the clock before its thread id can be reused.
            if unsafe { libc::clock_gettime(clock, &mut ts) } == 0 {
                let ns = (ts.tv_sec as u64)
                    .saturating_mul(1_000_000_000)
                    .saturating_add(ts.tv_nsec as u64);
                // Concurrent readers: the counter never goes back.
                self.cpu_time_ns.fetch_max(ns, Ordering::Relaxed);
            }
        }
        self.cpu_time_ns.load(Ordering::Relaxed)
    }
}

/// One vCPU and what it needs to run.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Its index (= APIC ID).
    pub id: u8,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Shared VM control.
    pub ctl: Arc<VmControl>,
    /// Exit counters.
    pub counters: Arc<ExitCounters>,
}

fn describe_regs(fd: &VcpuFd) -> String {
    let r: kvm_regs = fd.get_regs().unwrap_or_default();
    let s: kvm_sregs = fd.get_sregs().unwrap_or_default();
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer
    )
}

impl Vcpu {
    /// Runs until the VM stops. Called on the vCPU's own thread.
    pub fn run(mut self) {
        let ie: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(ie));
        loop {
            self.ctl.park_if_paused(self.id, &self.fd);
            if self.ctl.stopping() {
                break;
            }
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) => {
                        self.counters.pio.fetch_add(1, Ordering::Relaxed);
                        if !self.pio.write(u64::from(port), data) {
                            tracing::trace!("unclaimed port write {port:#x}");
                        }
                    }
                    VcpuExit::IoIn(port, data) => {
                        self.counters.pio.fetch_add(1, Ordering::Relaxed);
                        if !self.pio.read(u64::from(port), data) {
                            data.fill(UNCLAIMED_READ);
                        }
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        self.counters.mmio.fetch_add(1, Ordering::Relaxed);
                        if !self.mmio.write(addr, data) {
                            tracing::trace!("unclaimed MMIO write {addr:#x}");
                        }
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        self.counters.mmio.fetch_add(1, Ordering::Relaxed);
                        if !self.mmio.read(addr, data) {
                            data.fill(UNCLAIMED_READ);
                        }
                    }
                    VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => {
                        self.counters.other.fetch_add(1, Ordering::Relaxed);
                    }
                    VcpuExit::Shutdown => {
                        self.ctl.request_exit(VmExit::TripleFault {
                            vcpu: self.id,
                            regs: describe_regs(&self.fd),
                        });
                    }
                    VcpuExit::SystemEvent(kind, _) => {
                        let r = match kind {
                            KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                            KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                            KVM_SYSTEM_EVENT_CRASH => VmExit::GuestPanic,
                            k => VmExit::Error(format!(
                                "vCPU {} reported unknown system event {k}",
                                self.id
                            )),
                        };
                        self.ctl.request_exit(r);
                    }
                    VcpuExit::InternalError => {
                        let sub = self.fd.get_kvm_run();
                        // SAFETY: on KVM_EXIT_INTERNAL_ERROR the `internal` member of the
                        // exit union is the one KVM filled in.
                        let suberror = unsafe { sub.__bindgen_anon_1.internal.suberror };
                        self.ctl.request_exit(VmExit::InternalError {
                            vcpu: self.id,
                            suberror,
                            regs: describe_regs(&self.fd),
                        });
                    }
                    VcpuExit::FailEntry(reason, cpu) => {
                        self.ctl.request_exit(VmExit::Error(format!(
                            "KVM could not enter vCPU {} (hardware entry failure {reason:#x} on host CPU {cpu})",
                            self.id
                        )));
                    }
                    other => {
                        self.counters.other.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("vCPU {}: unhandled exit {other:?}", self.id);
                    }
                },
                Err(e) => match e.errno() {
                    libc::EINTR => {
                        self.fd.set_kvm_immediate_exit(0);
                    }
                    libc::EAGAIN => {}
                    _ => {
                        self.ctl.request_exit(VmExit::Error(format!(
                            "KVM_RUN failed on vCPU {}: {e}",
                            self.id
                        )));
                    }
                },
            }
        }
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Sets the boot MSRs on a vCPU.
pub fn set_boot_msrs(fd: &VcpuFd) -> Result<(), String> {
    let entries = arch::regs::boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|e| format!("cannot build MSR list: {e:?}"))?;
    let n = fd
        .set_msrs(&msrs)
        .map_err(|e| format!("KVM_SET_MSRS: {e}"))?;
    if n != entries.len() {
        return Err(format!(
            "KVM accepted only {n} of {} boot MSRs",
            entries.len()
        ));
    }
    Ok(())
}
