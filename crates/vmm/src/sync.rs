//! Locks that outlive a panicked holder: a thread that panicked while holding one has lost
//! its own work (and said so), and must not take the rest of the VM down with it.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking it over from a holder that panicked.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
