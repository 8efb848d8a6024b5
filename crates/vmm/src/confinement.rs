//! Which paths a VM's configuration makes tern reach, for the Landlock sandbox: what to allow
//! when tern confines itself, and the check a configuration sent later (through the API) must
//! pass before tern tries to open anything it names.

use std::path::PathBuf;

use ::api::config::{CharBackend, DiskFormat, VmConfig};
use sandbox::landlock::{check, Allowed};

use crate::error::VmmError;

/// The device nodes every VM uses.
pub const KVM: &str = "/dev/kvm";
/// The TAP clone device.
pub const TUN: &str = "/dev/net/tun";

/// Every path `c` names, with the access the VM needs: the kernel and initrd (read), the disks
/// (read, or read-write), the files their qcow2 headers name when the format is stated (read),
/// the serial and console files (read-write).
pub fn config_paths(c: &VmConfig) -> Vec<Allowed> {
    let mut out = Vec::new();
    out.extend(c.kernel.iter().map(Allowed::read));
    out.extend(c.initrd.iter().map(Allowed::read));
    for d in &c.disks {
        let rw = |p: &PathBuf| Allowed {
            path: p.clone(),
            write: !d.readonly,
        };
        out.push(rw(&d.path));
        out.extend(d.data_file.iter().map(rw));
        if d.format == Some(DiskFormat::Qcow2) {
            out.extend(
                block::named_backing_files(&d.path)
                    .unwrap_or_default()
                    .into_iter()
                    .map(Allowed::read),
            );
        }
    }
    for b in [Some(&c.serial), c.console.as_ref()].into_iter().flatten() {
        if let CharBackend::File(p) = b {
            out.push(Allowed::write(p));
        }
    }
    if !c.nets.is_empty() {
        out.push(Allowed::write(TUN));
    }
    out
}

/// Refuses a configuration that names a path outside the sandbox (none when tern runs
/// without one), with one line naming the path.
pub fn check_config(c: &VmConfig) -> Result<(), VmmError> {
    for a in config_paths(c) {
        check(&a.path, a.write).map_err(VmmError::Setup)?;
    }
    Ok(())
}
