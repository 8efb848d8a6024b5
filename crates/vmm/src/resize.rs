//! `PUT /v1/vm/resize` and the sizes `GET /v1/vm` reports: vCPUs through the CPU hotplug
//! controller ([`crate::cpu_hotplug`]), memory through the virtio-mem device
//! (`virtio::devices::mem`).

use virtio::devices::MemHandle;

use crate::api::Reply;
use crate::cpu_hotplug::CpuHotplug;
use crate::VmConfig;

/// (present, last asked for, most) vCPUs.
pub fn vcpu_counts(hp: Option<&CpuHotplug>, config: &VmConfig) -> (u32, u32, u32) {
    match hp {
        Some(hp) => hp.counts(),
        None => (config.cpus, config.cpus, config.cpus),
    }
}

/// (now, last asked for, most) bytes of guest memory: the boot memory and what the guest
/// plugged, was asked to plug, may plug.
pub fn memory_sizes(mem: Option<&MemHandle>, config: &VmConfig) -> (u64, u64, u64) {
    let boot = config.memory.0;
    match mem {
        Some(m) => {
            let st = m.status();
            (boot + st.plugged, boot + st.requested, boot + st.region)
        }
        None => (boot, boot, boot),
    }
}

/// `PUT /v1/vm/resize`: vCPUs, memory, or both. Both are checked before either changes, so a
/// refused request changes nothing.
pub fn resize(
    cpus: Option<&CpuHotplug>,
    mem: Option<&MemHandle>,
    r: &::api::resize::ResizeRequest,
    config: &VmConfig,
) -> Reply {
    if r.cpus.is_none() && r.memory.is_none() {
        return Reply::error(400, "nothing to resize: give cpus, memory or both");
    }
    let hp = match (r.cpus, cpus) {
        (Some(n), None) => {
            return Reply::error(
                400,
                format!(
                    "invalid cpus {n}: the VM has no CPU hotplug (its max_cpus is its {} cpus; start it with --max-cpus N)",
                    config.cpus
                ),
            )
        }
        (Some(n), Some(hp)) => {
            if let Err(e) = hp.check(n) {
                return Reply::error(400, e);
            }
            Some((n, hp))
        }
        (None, _) => None,
    };
    if let Some(size) = r.memory {
        if let Err(reply) = resize_memory(mem, size.0, config) {
            return reply;
        }
    }
    if let Some((n, hp)) = hp {
        match hp.resize(n) {
            Ok(()) => tracing::info!("resize: {n} vCPUs asked for"),
            Err(e) if e.starts_with("invalid") => return Reply::error(400, e),
            Err(e) => return Reply::error(500, format!("cannot resize: {e}")),
        }
    }
    Reply::done()
}

/// Asks the guest to have `total` bytes of memory (its boot memory and hotplugged).
fn resize_memory(mem: Option<&MemHandle>, total: u64, config: &VmConfig) -> Result<(), Reply> {
    let boot = config.memory.0;
    let mib = |b: u64| format!("{} MiB", b >> 20);
    let Some(m) = mem else {
        return Err(Reply::error(
            400,
            format!(
                "invalid memory {}: the VM has no memory hotplug (its max_memory is its {} memory; start it with --max-memory SIZE)",
                mib(total),
                mib(boot)
            ),
        ));
    };
    let max = boot + m.status().region;
    if !(boot..=max).contains(&total) {
        return Err(Reply::error(
            400,
            format!(
                "invalid memory {} ({total} bytes): must be between the VM's memory ({}) and its max_memory ({})",
                mib(total),
                mib(boot),
                mib(max)
            ),
        ));
    }
    match m.set_requested(total - boot) {
        Ok(()) => {
            tracing::info!("resize: {} of memory asked for", mib(total));
            Ok(())
        }
        Err(e) if e.starts_with("invalid") => Err(Reply::error(
            400,
            format!("invalid memory {} ({total} bytes): {e}", mib(total)),
        )),
        Err(e) => Err(Reply::error(500, format!("cannot resize: {e}"))),
    }
}
