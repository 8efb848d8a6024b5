//! The VM's components in order, and the walks over them: pause, resume, save, restore.
//!
//! Everything stateful in a VM registers here once, under an id that names its section in a
//! snapshot (`kvm-vm`, `vcpu0`…, `com1`, `rtc`, then the virtio devices: `virtio-rng`,
//! `virtio-console`, `disk0`…, `net0`…) and a name for messages. Registration order is the
//! order of every walk: the KVM VM (irqchip, PIT, clock) before the vCPUs, whose LAPICs need
//! it; the vCPUs before devices, so no vCPU is inside a device's registers while the device
//! pauses, and devices last on restore, since their workers may raise interrupts at once.
//! Resume walks backwards.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;
use lifecycle::{Component, Section};

/// How long each phase of a pause may take: the vCPUs leaving guest mode, then the devices
/// finishing their in-flight I/O.
pub const PHASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which pause phase a component belongs to (each phase gets [`PHASE_TIMEOUT`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// VM-wide KVM state: nothing runs, nothing to stop.
    Platform,
    /// A vCPU.
    Cpu,
    /// A device: legacy or virtio.
    Device,
}

/// A component handle as the registry keeps it.
pub type Shared = Arc<Mutex<dyn Component>>;

#[derive(Clone)]
struct Entry {
    id: String,
    name: String,
    phase: Phase,
    /// Keeps its fresh state when a snapshot has no section for it (one written before the
    /// component was saved at all).
    optional: bool,
    component: Shared,
}

/// The VM's components, in walk order.
#[derive(Default)]
pub struct Components {
    /// Registered at build; devices plugged in or out while the guest runs come and go
    /// ([`add`](Self::add), [`remove`](Self::remove)). Each walk goes over a copy.
    entries: std::sync::RwLock<Vec<Entry>>,
    /// How many entries (from the first) are paused.
    paused: Mutex<usize>,
}

impl Components {
    /// Adds `component` under `id` (unique; its section's key) and `name` (for messages).
    pub fn register(&mut self, id: &str, name: &str, phase: Phase, component: Shared) {
        let entries = self.entries.get_mut().unwrap_or_else(|p| p.into_inner());
        debug_assert!(entries.iter().all(|e| e.id != id), "duplicate id {id}");
        entries.push(Entry {
            id: id.to_string(),
            name: name.to_string(),
            phase,
            optional: false,
            component,
        });
    }

    /// Marks the last registered component as one older snapshots may lack.
    pub fn optional_in_old_snapshots(&mut self) {
        let entries = self.entries.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.last_mut() {
            e.optional = true;
        }
    }

    /// A device plugged in while the guest runs (not while it is paused), last in the walk.
    pub fn add(&self, id: &str, name: &str, component: Shared) -> Result<(), String> {
        let paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        if *paused > 0 {
            return Err("the VM is paused".into());
        }
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.iter().any(|e| e.id == id) {
            return Err(format!("a component `{id}` exists already"));
        }
        entries.push(Entry {
            id: id.to_string(),
            name: name.to_string(),
            phase: Phase::Device,
            optional: false,
            component,
        });
        Ok(())
    }

    /// A device plugged out: it leaves the walks (paused or not).
    pub fn remove(&self, id: &str) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = entries.iter().position(|e| e.id == id) {
            entries.remove(i);
            if i < *paused {
                *paused -= 1;
            }
        }
    }

    fn list(&self) -> Vec<Entry> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The registered ids, in walk order.
    pub fn ids(&self) -> Vec<String> {
        self.list().into_iter().map(|e| e.id).collect()
    }

    /// Whether the VM is paused (every component).
    pub fn paused(&self) -> bool {
        let n = *self.paused.lock().unwrap_or_else(|p| p.into_inner());
        n > 0 && n == self.list().len()
    }

    /// Pauses every component in order; each phase has [`PHASE_TIMEOUT`] from its start. On a
    /// failure, resumes what it paused and names the component that did not stop.
    pub fn pause(&self) -> Result<(), String> {
        self.pause_with(PHASE_TIMEOUT)
    }

    fn pause_with(&self, timeout: Duration) -> Result<(), String> {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let mut phase = None;
        let mut deadline = Instant::now();
        let mut started = deadline;
        let entries = self.list();
        for (i, e) in entries.iter().enumerate().skip(*paused) {
            if phase != Some(e.phase) {
                phase = Some(e.phase);
                started = Instant::now();
                deadline = started + timeout;
            }
            // (The component's lock is released before a failure resumes it.)
            let result = lock(&e.component).pause(deadline);
            if let Err(why) = result {
                // It may have stopped in part (a device asked to stop that did not finish in
                // time): it is resumed with the others.
                *paused = i + 1;
                drop(paused);
                self.resume();
                return Err(format!(
                    "{} {why} within {:.1} s",
                    e.name,
                    deadline.saturating_duration_since(started).as_secs_f64()
                ));
            }
            *paused = i + 1;
        }
        Ok(())
    }

    /// Resumes what is paused, last first.
    pub fn resume(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let entries = self.list();
        for e in entries[..(*paused).min(entries.len())].iter().rev() {
            lock(&e.component).resume();
        }
        *paused = 0;
    }

    /// Parks every vCPU for a moment without pausing the VM (a migration slowing a guest
    /// that writes memory faster than it can be sent); [`unpark_cpus`](Self::unpark_cpus)
    /// lets them go. Not while the VM is paused, nor mixed with [`pause`](Self::pause).
    pub fn park_cpus(&self, deadline: Instant) {
        for e in self.list().iter().filter(|e| e.phase == Phase::Cpu) {
            let _ = lock(&e.component).pause(deadline);
        }
    }

    /// Lets the vCPUs [`park_cpus`](Self::park_cpus) parked run again.
    pub fn unpark_cpus(&self) {
        for e in self.list().iter().filter(|e| e.phase == Phase::Cpu) {
            lock(&e.component).resume();
        }
    }

    /// Every component's section, in walk order (the VM must be paused).
    pub fn save(&self) -> Result<Vec<Section>, String> {
        let entries = self.list();
        let mut out = Vec::with_capacity(entries.len());
        for e in &entries {
            if let Some(s) = lock(&e.component)
                .save(&e.id)
                .map_err(|m| prefix(&e.name, m))?
            {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Puts each component's section back, in walk order; fails on a section no component
    /// has, or a component without its section (unless older snapshots may lack it).
    pub fn restore(&self, sections: &[Section]) -> Result<(), String> {
        let entries = self.list();
        for s in sections {
            if !entries.iter().any(|e| e.id == s.id) {
                return Err(format!(
                    "the snapshot has state for `{}`, which this VM does not have (it has: {})",
                    s.id,
                    self.ids().join(", ")
                ));
            }
        }
        for e in &entries {
            let mut found = sections.iter().filter(|s| s.id == e.id);
            match (found.next(), found.next()) {
                (Some(_), Some(_)) => {
                    return Err(format!("the snapshot has `{}` more than once", e.id))
                }
                (Some(s), None) => lock(&e.component)
                    .restore(s)
                    .map_err(|m| prefix(&e.name, m))?,
                (None, _) if e.optional => {}
                (None, _) => {
                    return Err(format!(
                        "the snapshot has no state for `{}` ({})",
                        e.id, e.name
                    ))
                }
            }
        }
        Ok(())
    }

    /// Guest memory the components wrote on their own since last asked (the VM is paused).
    pub fn written_memory(&self) -> Vec<(u64, u64)> {
        self.list()
            .iter()
            .flat_map(|e| lock(&e.component).written_memory())
            .collect()
    }
}

/// `m` about component `name`, unless it names it already.
fn prefix(name: &str, m: String) -> String {
    if m.starts_with(name) {
        m
    } else {
        format!("{name}: {m}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A component whose pause succeeds or hangs past any deadline; it counts its resumes
    /// and keeps one number as its state.
    struct Fake {
        hangs: bool,
        resumed: Arc<AtomicU32>,
        value: u32,
    }

    impl Component for Fake {
        fn pause(&mut self, deadline: Instant) -> Result<(), String> {
            if self.hangs {
                std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                return Err("did not finish its in-flight I/O and stop".into());
            }
            Ok(())
        }
        fn resume(&mut self) {
            self.resumed.fetch_add(1, Ordering::SeqCst);
        }
        fn save(&mut self, id: &str) -> Result<Option<Section>, String> {
            Section::new(id, 1, &self.value).map(Some)
        }
        fn restore(&mut self, s: &Section) -> Result<(), String> {
            self.value = s.parse(&[1])?;
            Ok(())
        }
    }

    fn fake(hangs: bool, resumed: &Arc<AtomicU32>, value: u32) -> Shared {
        Arc::new(Mutex::new(Fake {
            hangs,
            resumed: resumed.clone(),
            value,
        }))
    }

    #[test]
    fn a_component_that_does_not_stop_fails_the_pause_by_name_and_everything_resumes() {
        let resumed = Arc::new(AtomicU32::new(0));
        let mut c = Components::default();
        c.register("vcpu0", "vCPU 0", Phase::Cpu, fake(false, &resumed, 0));
        c.register(
            "virtio-rng",
            "virtio-rng",
            Phase::Device,
            fake(false, &resumed, 0),
        );
        c.register(
            "disk0",
            "virtio-blk disk 0 (/hung.img)",
            Phase::Device,
            fake(true, &resumed, 0),
        );
        c.register(
            "net0",
            "virtio-net 0",
            Phase::Device,
            fake(false, &resumed, 0),
        );
        let t0 = Instant::now();
        let e = c.pause_with(Duration::from_millis(200)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(
            e,
            "virtio-blk disk 0 (/hung.img) did not finish its in-flight I/O and stop within 0.2 s"
        );
        // Those that stopped go on, the one that did not stop too: the VM stays as it was.
        assert_eq!(resumed.load(Ordering::SeqCst), 3);
        assert!(!c.paused());
    }

    #[test]
    fn pause_resume_walks_in_order_and_back() {
        let resumed = Arc::new(AtomicU32::new(0));
        let mut c = Components::default();
        c.register("a", "a", Phase::Cpu, fake(false, &resumed, 0));
        c.register("b", "b", Phase::Device, fake(false, &resumed, 0));
        c.pause().unwrap();
        assert!(c.paused());
        c.resume();
        assert!(!c.paused());
        assert_eq!(resumed.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn restore_matches_sections_by_id_and_refuses_strangers_and_gaps() {
        let r = Arc::new(AtomicU32::new(0));
        let mut a = Components::default();
        a.register("x", "X", Phase::Device, fake(false, &r, 1));
        a.register("y", "Y", Phase::Device, fake(false, &r, 2));
        let saved = a.save().unwrap();
        let mut b = Components::default();
        // Registered in another order: sections are found by id.
        b.register("y", "Y", Phase::Device, fake(false, &r, 0));
        b.register("x", "X", Phase::Device, fake(false, &r, 0));
        b.restore(&saved).unwrap();
        let again = b.save().unwrap();
        assert_eq!(
            again.iter().find(|s| s.id == "x"),
            saved.iter().find(|s| s.id == "x")
        );
        assert_eq!(
            again.iter().find(|s| s.id == "y"),
            saved.iter().find(|s| s.id == "y")
        );

        let mut c = Components::default();
        c.register("x", "X", Phase::Device, fake(false, &r, 0));
        let e = c.restore(&saved).unwrap_err();
        assert!(e.contains("state for `y`"), "{e}");
        let mut d = Components::default();
        d.register("x", "X", Phase::Device, fake(false, &r, 0));
        d.register("y", "Y", Phase::Device, fake(false, &r, 0));
        d.register("z", "Z", Phase::Device, fake(false, &r, 0));
        let e = d.restore(&saved).unwrap_err();
        assert!(e.contains("no state for `z`"), "{e}");
        d.optional_in_old_snapshots();
        d.restore(&saved).unwrap();
    }

    #[test]
    fn components_come_and_go_while_the_vm_runs_but_not_while_it_is_paused() {
        let resumed = Arc::new(AtomicU32::new(0));
        let mut c = Components::default();
        c.register("a", "component a", Phase::Device, fake(false, &resumed, 1));
        c.add("b", "component b", fake(false, &resumed, 2)).unwrap();
        assert_eq!(c.ids(), ["a", "b"]);
        let again = c.add("b", "again", fake(false, &resumed, 3)).unwrap_err();
        assert!(again.contains("exists"), "{again}");
        c.pause().unwrap();
        let paused = c.add("x", "x", fake(false, &resumed, 4)).unwrap_err();
        assert!(paused.contains("paused"), "{paused}");
        // Removed while paused: the rest resumes, each once.
        c.remove("b");
        assert_eq!(c.ids(), ["a"]);
        assert!(c.paused());
        c.resume();
        assert!(!c.paused());
        assert_eq!(resumed.load(Ordering::SeqCst), 1);
        c.remove("nope");
        assert_eq!(c.ids(), ["a"]);
    }
}
