//! Auto-converge: a guest that writes memory faster than the link carries it gets its vCPUs
//! parked for a growing share of every 100 ms while the migration runs.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lifecycle::threads::{spawn, Role};

use crate::components::Components;

/// The most of each 100 ms the vCPUs are parked (QEMU's `max-cpu-throttle` default): a guest
/// that rewrites its hot memory within a few milliseconds still outpaces 90%.
pub const MAX_THROTTLE_PERCENT: u32 = 99;

/// Parks the vCPUs for `percent` of every 100 ms while the percentage is above zero.
pub struct Throttler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttler {
    pub fn start(components: Arc<Components>, percent: Arc<AtomicU32>) -> Throttler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = spawn(Role::Migration, "tern-throttle", move || {
            while !s.load(Ordering::SeqCst) {
                let pct = u64::from(percent.load(Ordering::Relaxed).min(MAX_THROTTLE_PERCENT));
                if pct == 0 {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                components.park_cpus(Instant::now() + Duration::from_secs(1));
                std::thread::sleep(Duration::from_millis(pct));
                components.unpark_cpus();
                std::thread::sleep(Duration::from_millis(100 - pct));
            }
        })
        .ok();
        Throttler { stop, thread }
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
