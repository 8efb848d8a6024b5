//! What the VM's threads share: whether and why the VM is stopping, and the parking of vCPUs
//! (pause, and saving a parked vCPU's state on its own thread, where KVM wants it).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::error::VmmError;
use crate::snapshot::kvm::{save_vcpu, VcpuState};

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The guest reset (reboot).
    Reset,
    /// The guest wrote `status` to the debug-exit port.
    DebugExit(u8),
    /// The guest kernel panicked (seen on its console, or reported by the guest).
    GuestPanic,
    /// A vCPU triple-faulted.
    TripleFault {
        /// Which vCPU.
        vcpu: u8,
        /// Its registers.
        regs: String,
    },
    /// KVM could not emulate something.
    InternalError {
        /// Which vCPU.
        vcpu: u8,
        /// KVM's suberror code.
        suberror: u32,
        /// Registers at the time.
        regs: String,
    },
    /// tern was asked to stop (signal number).
    Signal(i32),
    /// The power button was pressed but the guest did not power off within this many seconds.
    ShutdownTimeout(u64),
    /// The user pressed the escape sequence.
    UserQuit,
    /// Stopped through the API (`PUT /v1/vm/shutdown?force=true`).
    ApiStop,
    /// The VM migrated to another tern, which runs it now.
    Migrated {
        /// Where.
        url: String,
        /// How long it stood still, in microseconds.
        downtime_us: u64,
    },
    /// A VMM error while running.
    Error(String),
}

impl std::fmt::Display for VmExit {
    /// How the VM ended, in a few words (registers left out).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::PowerOff => f.write_str("the guest powered off"),
            VmExit::Reset => f.write_str("the guest rebooted"),
            VmExit::DebugExit(s) => write!(f, "the guest exited with status {s}"),
            VmExit::GuestPanic => f.write_str("the guest kernel panicked"),
            VmExit::TripleFault { vcpu, .. } => write!(f, "guest triple fault on vCPU {vcpu}"),
            VmExit::InternalError { vcpu, suberror, .. } => {
                write!(f, "KVM internal error (suberror {suberror}) on vCPU {vcpu}")
            }
            VmExit::Signal(s) => write!(f, "stopped by signal {s}"),
            VmExit::ShutdownTimeout(secs) => write!(
                f,
                "the guest did not power off within {secs} s of the power button"
            ),
            VmExit::UserQuit => f.write_str("stopped from the console"),
            VmExit::ApiStop => f.write_str("stopped through the API"),
            VmExit::Migrated { url, .. } => write!(f, "the VM migrated to {url}"),
            VmExit::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// Which vCPUs are asked to park and which have, and a pending request for one's state.
#[derive(Default)]
struct Parking {
    requested: BTreeSet<u8>,
    /// vCPUs not plugged in (CPU hotplug): parked until plugged, whatever else is asked.
    unplugged: BTreeSet<u8>,
    parked: BTreeSet<u8>,
    /// A vCPU asked for its state, with the MSRs to save.
    save: Option<(u8, std::sync::Arc<Vec<u32>>)>,
    /// Its answer.
    saved: Option<Result<VcpuState, String>>,
}

/// State shared between the VM's threads.
pub struct VmControl {
    stop: AtomicBool,
    exit: Mutex<Option<VmExit>>,
    /// Readable when the VM is stopping (the main loop waits on it).
    pub exit_evt: EventFd,
    parking: Mutex<Parking>,
    parking_cv: Condvar,
}

impl VmControl {
    /// A running VM's control.
    pub fn new() -> Result<Self, VmmError> {
        Ok(VmControl {
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VmmError::Setup(format!("eventfd: {e}")))?,
            parking: Mutex::new(Parking::default()),
            parking_cv: Condvar::new(),
        })
    }

    /// Whether the VM is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Ends the VM with `reason` (the first reason wins).
    pub fn request_exit(&self, reason: VmExit) {
        let mut g = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(reason);
        }
        self.stop.store(true, Ordering::Release);
        let _ = self.exit_evt.write(1);
        // Parked vCPUs wake up to stop.
        let _p = self.parking();
        self.parking_cv.notify_all();
    }

    /// Why the VM stopped (taken once).
    pub fn take_exit(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn parking(&self) -> MutexGuard<'_, Parking> {
        self.parking.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by vCPU `id`'s thread outside `KVM_RUN`: waits while it is asked to park,
    /// saving its state when asked.
    pub fn park_if_paused(&self, id: u8, fd: &kvm_ioctls::VcpuFd) {
        let mut s = self.parking();
        let held = |s: &Parking| s.requested.contains(&id) || s.unplugged.contains(&id);
        if !held(&s) {
            return;
        }
        s.parked.insert(id);
        self.parking_cv.notify_all();
        while held(&s) && !self.stopping() {
            if let Some((_, msrs)) = s.save.take_if(|(who, _)| *who == id) {
                s.saved = Some(save_vcpu(fd, &msrs));
                self.parking_cv.notify_all();
                continue;
            }
            s = self.parking_cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked.remove(&id);
    }

    /// Asks vCPU `id` to park (it does at its next exit from `KVM_RUN`, or before its first).
    pub fn request_park(&self, id: u8) {
        self.parking().requested.insert(id);
    }

    /// Plugs vCPU `id` in (it runs unless asked to park) or pulls it out (it parks at its next
    /// exit from `KVM_RUN`, or before its first, until plugged in again).
    pub fn set_plugged(&self, id: u8, plugged: bool) {
        let mut s = self.parking();
        if plugged {
            s.unplugged.remove(&id);
        } else {
            s.unplugged.insert(id);
        }
        self.parking_cv.notify_all();
    }

    /// The vCPUs not plugged in.
    pub fn unplugged(&self) -> Vec<u8> {
        self.parking().unplugged.iter().copied().collect()
    }

    /// Lets vCPU `id` run again.
    pub fn release(&self, id: u8) {
        self.parking().requested.remove(&id);
        self.parking_cv.notify_all();
    }

    /// Waits until vCPU `id` has parked, calling `kick` (to get it out of `KVM_RUN`) every
    /// millisecond; false at `deadline`.
    pub fn wait_parked(&self, id: u8, deadline: Instant, kick: impl Fn()) -> bool {
        loop {
            let s = self.parking();
            if s.parked.contains(&id) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            kick();
            let _ = self
                .parking_cv
                .wait_timeout(s, Duration::from_millis(1))
                .map_err(|p| p.into_inner());
        }
    }

    /// The state of parked vCPU `id`, saved on its thread (`msrs`: the MSRs to save).
    pub fn save_parked(&self, id: u8, msrs: std::sync::Arc<Vec<u32>>) -> Result<VcpuState, String> {
        let mut s = self.parking();
        if !s.parked.contains(&id) {
            return Err("it is not parked".into());
        }
        s.saved = None;
        s.save = Some((id, msrs));
        self.parking_cv.notify_all();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(r) = s.saved.take() {
                return r;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stopping() {
                s.save = None;
                return Err("it did not report its state within 5 s".into());
            }
            s = self
                .parking_cv
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}
