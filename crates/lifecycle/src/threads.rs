//! Every thread tern starts is started here, with its role: the one place where a per-role
//! policy (a seccomp filter, for instance) is applied as the thread begins, before it runs any
//! of its own code.
//!
//! Once a policy is set, one thread, the *spawner* (role [`Role::Spawner`]), creates every
//! other thread. A thread inherits the seccomp filters of the thread that created it, and a
//! filter can only be narrowed; without the spawner, a device worker started from a vCPU thread
//! (which activates a device when the guest writes its status register) would be bound by the
//! vCPU's list as well as its own, and the vCPU's list would need `clone`. With it, only the
//! spawner may create threads, and each thread ends up with exactly its own role's list.

use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread::JoinHandle;

/// What a thread does, which decides what it may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs one vCPU (`KVM_RUN` and the device registers it exits to).
    Vcpu,
    /// Serves one device's queues; what it may do depends on the kind of device.
    DeviceWorker(Device),
    /// Serves the control API.
    Api,
    /// Set-up and housekeeping of the VMM itself: preparing the VM while tern waits,
    /// registering memory, the INTx resampler.
    Vmm,
    /// Moves bytes between the host and a character device (terminal input, buffered output).
    Io,
    /// Creates every other thread once a policy is set, and does nothing else.
    Spawner,
    /// Sends a live migration: reads guest memory and the dirty log, stops and saves the VM,
    /// and writes to a TCP or Unix connection.
    Migration,
}

/// The kind of device a [`Role::DeviceWorker`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// A disk: reads and writes its image (io_uring or a thread of its own).
    Block,
    /// A network card: reads and writes its TAP device.
    Net,
    /// An entropy source: reads the host's random numbers.
    Rng,
    /// A console: reads and writes its character device.
    Console,
    /// A memory balloon: frees the guest memory its driver gives back.
    Balloon,
    /// Hotpluggable memory (virtio-mem): frees the guest memory its driver unplugs.
    Mem,
    /// Sockets between guest and host (virtio-vsock): accepts and makes Unix connections.
    Vsock,
}

impl Role {
    /// The role's name, as messages and policies call it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vcpu => "vcpu",
            Role::DeviceWorker(Device::Block) => "device-block",
            Role::DeviceWorker(Device::Net) => "device-net",
            Role::DeviceWorker(Device::Rng) => "device-rng",
            Role::DeviceWorker(Device::Console) => "device-console",
            Role::DeviceWorker(Device::Balloon) => "device-balloon",
            Role::DeviceWorker(Device::Mem) => "device-mem",
            Role::DeviceWorker(Device::Vsock) => "device-vsock",
            Role::Api => "api",
            Role::Vmm => "vmm",
            Role::Io => "io",
            Role::Spawner => "spawner",
            Role::Migration => "migration",
        }
    }
}

type Policy = Box<dyn Fn(Role, &str) + Send + Sync>;
type Job = Box<dyn FnOnce() + Send>;

static POLICY: OnceLock<Policy> = OnceLock::new();
static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

/// Sets what every thread started from now on runs first, given its role and name, and starts
/// the spawner thread (named `tern-spawner`), which runs the policy for [`Role::Spawner`] and
/// from then on creates every thread. Once per process; a second call is refused.
///
/// Call it before the calling thread narrows what it may do itself: the spawner starts with
/// the caller's restrictions.
pub fn set_policy(policy: Policy) -> Result<(), String> {
    POLICY
        .set(policy)
        .map_err(|_| "a thread policy is set already".to_string())?;
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("tern-spawner".into())
        .spawn(move || {
            if let Some(p) = POLICY.get() {
                p(Role::Spawner, "tern-spawner");
            }
            for job in rx {
                job();
            }
        })
        .map_err(|e| format!("cannot start the spawner thread: {e}"))?;
    SPAWNER
        .set(tx)
        .map_err(|_| "the spawner is started already".to_string())
}

/// Starts `f` on a thread named `name` (as `ps -L` and `/proc/PID/task/*/comm` show it; the
/// kernel keeps 15 bytes of a name) in `role`.
pub fn spawn<F, T>(role: Role, name: &str, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let label = name.to_string();
    let builder = std::thread::Builder::new().name(name.to_string());
    let body = move || {
        if let Some(p) = POLICY.get() {
            p(role, &label);
        }
        f()
    };
    let Some(spawner) = SPAWNER.get() else {
        return builder.spawn(body);
    };
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(builder.spawn(body));
    });
    let gone = || std::io::Error::other("the spawner thread is gone");
    spawner.send(job).map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_named_and_run_the_policy_first() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static SEEN: AtomicUsize = AtomicUsize::new(0);
        set_policy(Box::new(|role, name| {
            if role == Role::DeviceWorker(Device::Block) && name == "tern-test" {
                SEEN.fetch_add(1, Ordering::SeqCst);
            }
        }))
        .unwrap();
        assert!(set_policy(Box::new(|_, _| {})).is_err());
        let name = spawn(Role::DeviceWorker(Device::Block), "tern-test", || {
            (
                SEEN.load(Ordering::SeqCst),
                std::thread::current().name().map(String::from),
            )
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(name, (1, Some("tern-test".to_string())));
        // A thread started from a thread started through `spawn` goes through the spawner too.
        let inner = spawn(Role::Vcpu, "tern-outer", || {
            spawn(Role::DeviceWorker(Device::Block), "tern-test", || {
                SEEN.load(Ordering::SeqCst)
            })
            .unwrap()
            .join()
            .unwrap()
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(inner, 2);
        assert_eq!(Role::Vcpu.name(), "vcpu");
    }
}
