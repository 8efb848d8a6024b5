//! Process-wide behaviour that follows the dialect tern was started in. `tern firecracker`
//! (or tern started through a link named `firecracker`) behaves as Firecracker's clients expect:
//!
//! - SIGTERM stops the VM at once, as it stops Firecracker, instead of pressing the guest's
//!   power button and waiting for it to power off (tern's own default, `--shutdown-timeout`);
//! - vCPU threads are named `fc_vcpu N`, the names Kata Containers looks for in
//!   `/proc/PID/task/*/comm` to place vCPU threads in their own cgroup.

use std::sync::atomic::{AtomicBool, Ordering};

static FIRECRACKER: AtomicBool = AtomicBool::new(false);

/// Switches this process to Firecracker's behaviour. Called once, before any VM is built.
pub fn set_firecracker() {
    FIRECRACKER.store(true, Ordering::Relaxed);
}

/// Whether this process speaks Firecracker's dialect.
pub fn firecracker() -> bool {
    FIRECRACKER.load(Ordering::Relaxed)
}

/// The name of vCPU `id`'s thread: `tern-vcpuID`, or Firecracker's `fc_vcpu ID`.
pub fn vcpu_thread_name(id: u32) -> String {
    thread_name(firecracker(), id)
}

fn thread_name(firecracker: bool, id: u32) -> String {
    if firecracker {
        format!("fc_vcpu {id}")
    } else {
        format!("tern-vcpu{id}")
    }
}

#[cfg(test)]
mod tests {
    use super::thread_name;

    #[test]
    fn vcpu_thread_names_fit_linux_comm() {
        assert_eq!(thread_name(false, 3), "tern-vcpu3");
        assert_eq!(thread_name(true, 3), "fc_vcpu 3");
        // Linux keeps 15 bytes of a thread's name: both forms survive for every vCPU id.
        assert!(thread_name(false, u32::from(u8::MAX)).len() <= 15);
        assert!(thread_name(true, u32::from(u8::MAX)).len() <= 15);
    }
}
