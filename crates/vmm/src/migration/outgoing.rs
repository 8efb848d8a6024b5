//! The handle the VMM keeps on a migration it started: its status, its cancel switch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use lifecycle::threads::{spawn, Role};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::send::{run, VmParts};
use super::{MigrationState, MigrationStatus, SendOptions, Target};
use crate::sync::lock;

/// A migration started from this tern: its status, and how to cancel it.
pub struct Outgoing {
    /// What the API reports.
    pub status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    /// Set once a client has read the completed status (the source then exits at once).
    seen: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Outgoing {
    /// Starts migrating the VM to `opts.url` (resolved as `target`) on a thread of its own.
    pub fn start(
        parts: VmParts,
        opts: SendOptions,
        target: Target,
        status: Arc<Mutex<MigrationStatus>>,
    ) -> Result<Outgoing, String> {
        *lock(&status) = MigrationStatus {
            state: MigrationState::Setup,
            url: Some(opts.url.to_string()),
            memory_bytes: parts.ram.mem().iter().map(|r| r.len()).sum(),
            downtime_limit_ms: opts.downtime_ms,
            ..MigrationStatus::default()
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicBool::new(false));
        let (st, c, s) = (status.clone(), cancel.clone(), seen.clone());
        let thread = spawn(Role::Migration, "tern-migrate", move || {
            let ctl = parts.ctl.clone();
            let exit = run(&parts, &opts, &target, &st, &c, &s);
            // The VM's parts go first (see `run`).
            drop(parts);
            if let Some(exit) = exit {
                ctl.request_exit(exit);
            }
        })
        .map_err(|e| {
            let e = format!("cannot start the migration thread: {e}");
            let mut s = lock(&status);
            s.state = MigrationState::Failed;
            s.error = Some(e.clone());
            e
        })?;
        Ok(Outgoing {
            status,
            cancel,
            seen,
            thread: Some(thread),
        })
    }

    /// Whether it still runs.
    pub fn active(&self) -> bool {
        !lock(&self.status).state.finished()
    }

    /// Asks it to stop; the VM keeps running here. False when it is past the point of no
    /// return (the VM is being handed over) or over.
    pub fn cancel(&self) -> bool {
        let st = lock(&self.status).state;
        if matches!(st, MigrationState::Setup | MigrationState::Active) {
            self.cancel.store(true, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Notes that a client read the status.
    pub fn status_read(&self) {
        if lock(&self.status).state == MigrationState::Completed {
            self.seen.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}
