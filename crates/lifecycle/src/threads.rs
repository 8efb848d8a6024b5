//! Every thread tern starts is started here, with its role: the one place where a per-role
//! policy (a seccomp filter, for instance) is applied as the thread begins, before it runs any
//! of its own code.

use std::sync::OnceLock;
use std::thread::JoinHandle;

/// What a thread does, which decides what it may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs one vCPU (`KVM_RUN` and the device registers it exits to).
    Vcpu,
    /// Serves one device's queues (disk, network, entropy, console I/O).
    DeviceWorker,
    /// Serves the control API.
    Api,
    /// Set-up and housekeeping of the VMM itself: preparing the VM while tern waits,
    /// registering memory, the INTx resampler.
    Vmm,
    /// Moves bytes between the host and a character device (terminal input, buffered output).
    Io,
}

impl Role {
    /// The role's name, as messages and policies call it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vcpu => "vcpu",
            Role::DeviceWorker => "device",
            Role::Api => "api",
            Role::Vmm => "vmm",
            Role::Io => "io",
        }
    }
}

type Policy = Box<dyn Fn(Role, &str) + Send + Sync>;

static POLICY: OnceLock<Policy> = OnceLock::new();

/// Sets what every thread started from now on runs first, given its role and name (once per
/// process; a second call is refused).
pub fn set_policy(policy: Policy) -> Result<(), &'static str> {
    POLICY
        .set(policy)
        .map_err(|_| "a thread policy is set already")
}

/// Starts `f` on a thread named `name` (as `ps -L` and `/proc/PID/task/*/comm` show it; the
/// kernel keeps 15 bytes of a name) in `role`.
pub fn spawn<F, T>(role: Role, name: &str, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let label = name.to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Some(p) = POLICY.get() {
                p(role, &label);
            }
            f()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_named_and_run_the_policy_first() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static SEEN: AtomicUsize = AtomicUsize::new(0);
        set_policy(Box::new(|role, name| {
            if role == Role::DeviceWorker && name == "tern-test" {
                SEEN.fetch_add(1, Ordering::SeqCst);
            }
        }))
        .unwrap();
        assert!(set_policy(Box::new(|_, _| {})).is_err());
        let name = spawn(Role::DeviceWorker, "tern-test", || {
            (
                SEEN.load(Ordering::SeqCst),
                std::thread::current().name().map(String::from),
            )
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(name, (1, Some("tern-test".to_string())));
        assert_eq!(Role::Vcpu.name(), "vcpu");
    }
}
