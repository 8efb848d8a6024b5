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
}
