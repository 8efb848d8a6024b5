//! The contract every stateful part of a tern VM keeps with the VMM: it can be paused and
//! resumed, its state saved as a versioned section and put back, and it can say which guest
//! memory it wrote on its own (outside buffers a driver handed it).
//!
//! A VM is a list of components, each registered under an id that is stable across tern
//! versions (`kvm-vm`, `vcpu0`, `com1`, `rtc`, `virtio-rng`, `disk0`, …). Pausing, snapshotting
//! and restoring the VM are one ordered walk over that list: pause in order, resume in reverse,
//! save each component's section, restore each from the section with its id. A snapshot is
//! the sections plus guest memory; a live migration will send the same sections.
//!
//! This crate is the contract only (plus where every thread starts, [`threads`], and the event
//! loop they wait in, [`event_loop`]): no KVM, no devices. Hand-written because it is tern's
//! own interface between its VMM and its devices; no crate defines one.

pub mod event_loop;
pub mod threads;

use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// One component's saved state: what it was (`id`), which layout its state has (`version`,
/// owned by the component), and the state itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Section {
    /// The component's id in its VM.
    pub id: String,
    /// Version of the state's layout; a component reads the versions it knows.
    pub version: u32,
    /// The state, as JSON.
    pub state: serde_json::Value,
}

impl Section {
    /// A section holding `state` (serialized) under `id`, layout `version`.
    pub fn new<T: Serialize>(id: &str, version: u32, state: &T) -> Result<Section, String> {
        Ok(Section {
            id: id.to_string(),
            version,
            state: serde_json::to_value(state)
                .map_err(|e| format!("{id}: cannot serialize its state: {e}"))?,
        })
    }

    /// The state, when its layout is one of `versions`; an error naming the component
    /// otherwise, or when the state does not parse.
    pub fn parse<T: DeserializeOwned>(&self, versions: &[u32]) -> Result<T, String> {
        if !versions.contains(&self.version) {
            return Err(format!(
                "{}: saved state has layout version {}, this tern reads {:?}",
                self.id, self.version, versions
            ));
        }
        T::deserialize(&self.state).map_err(|e| format!("{}: saved state is invalid: {e}", self.id))
    }
}

/// A stateful part of a VM. Every method is called by the VMM's control thread, never by a
/// vCPU; `save` and `written_memory` only while the VM is paused, `restore` only on a freshly
/// built VM before any vCPU has run.
pub trait Component: Send {
    /// Stops the component by `deadline`: a device finishes the requests it took and takes
    /// no more, a vCPU leaves guest mode. An error (it did not stop in time, or cannot) says
    /// why; the VMM then resumes whatever it paused already.
    fn pause(&mut self, deadline: Instant) -> Result<(), String> {
        let _ = deadline;
        Ok(())
    }

    /// Continues after [`pause`](Self::pause) (or after a restore that left the VM paused).
    fn resume(&mut self) {}

    /// The component's state, or None when it has none worth keeping. `id` is the one it is
    /// registered under, for the section and for messages.
    fn save(&mut self, id: &str) -> Result<Option<Section>, String>;

    /// Puts back a state [`save`](Self::save) returned (possibly from another tern version,
    /// possibly hostile: check everything).
    fn restore(&mut self, section: &Section) -> Result<(), String>;

    /// Guest memory `(address, length)` the component wrote since it was last asked, other
    /// than through buffers a driver handed it (which the memory's dirty log sees): a virtio
    /// device's used rings, for instance. Counted dirty in the next diff snapshot.
    fn written_memory(&mut self) -> Vec<(u64, u64)> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        a: u32,
    }

    #[test]
    fn sections_round_trip_and_check_their_version() {
        let s = Section::new("dev0", 2, &S { a: 7 }).unwrap();
        assert_eq!(s.parse::<S>(&[1, 2]).unwrap(), S { a: 7 });
        let e = s.parse::<S>(&[1]).unwrap_err();
        assert!(e.contains("dev0") && e.contains("version 2"), "{e}");
        let bad = Section {
            id: "dev1".into(),
            version: 1,
            state: serde_json::json!({ "b": 1 }),
        };
        let e = bad.parse::<S>(&[1]).unwrap_err();
        assert!(e.starts_with("dev1: saved state is invalid"), "{e}");
    }
}
