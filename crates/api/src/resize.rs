//! The body of `PUT /v1/vm/resize` (`tern resize`): the VM's new size.

use serde::{Deserialize, Serialize};

/// What to change; absent fields stay as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    /// The number of vCPUs the guest should have: 1 up to the VM's `max_cpus`. vCPUs are
    /// added and removed through ACPI CPU hotplug; the guest's kernel onlines (or offlines and
    /// ejects) them.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// The guest memory the guest should have in all: from the VM's `memory` up to its
    /// `max_memory`, in steps of [`HOTPLUG_BLOCK_SIZE`](crate::config::HOTPLUG_BLOCK_SIZE).
    /// The part above `memory` is plugged into and unplugged from the guest through its
    /// virtio-mem device; the guest's driver does the work.
    #[serde(default)]
    pub memory: Option<crate::config::MemSize>,
}
