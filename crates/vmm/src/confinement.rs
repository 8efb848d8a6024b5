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

/// How a VM uses a file its configuration names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Read to boot the guest afresh (kernel, initrd): a restored VM reads it only when the
    /// guest reboots and the configuration says to restart.
    Boot,
    /// Read: a read-only disk, its data file, a backing file.
    Read,
    /// Read and written: a writable disk and its data file.
    ReadWrite,
    /// Appended to, and made if missing: the serial port's and the console's files.
    Output,
}

/// A file a configuration names, how the VM uses it, and what it is (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    /// The file, as named.
    pub path: PathBuf,
    /// How the VM uses it.
    pub usage: Use,
    /// What it is: "the kernel", "disk 0's backing file", …
    pub what: String,
}

/// Every file `c` names: the kernel and initrd or the firmware image, the disks with their data files and, when the
/// format is stated, the backing files their qcow2 headers name, and the serial and console
/// files. The one list of them, for the jail (which files go in) and Landlock (which files
/// tern may reach). Fails when a stated qcow2 image's backing chain cannot be read.
pub fn named_files(c: &VmConfig) -> Result<Vec<Named>, String> {
    let named = |path: &PathBuf, usage, what: String| Named {
        path: path.clone(),
        usage,
        what,
    };
    let mut out = Vec::new();
    for (what, path) in [("the kernel", &c.kernel), ("the initrd", &c.initrd)] {
        out.extend(path.iter().map(|p| named(p, Use::Boot, what.into())));
    }
    // The firmware image is mapped again when a restored VM is built.
    if let Some(image) = c.firmware.as_ref().and_then(|f| f.image().ok()) {
        out.push(named(&image, Use::Read, "the firmware".into()));
    }
    // UEFI: the variable store template, and the VM's own variable file (made if missing).
    if c.firmware == Some(::api::firmware::Firmware::Uefi) {
        if let Ok((_, template)) = ::api::firmware::uefi_files() {
            out.push(named(
                &template,
                Use::Read,
                "the UEFI variable template".into(),
            ));
        }
        if let Some(v) = &c.uefi_vars {
            out.push(named(v, Use::Output, "the UEFI variable file".into()));
        }
    }
    for (i, d) in c.disks.iter().enumerate() {
        let usage = if d.readonly {
            Use::Read
        } else {
            Use::ReadWrite
        };
        out.push(named(&d.path, usage, format!("disk {i}")));
        if let Some(f) = &d.data_file {
            out.push(named(f, usage, format!("disk {i}'s data file")));
        }
        // tern follows a qcow2 backing chain only when the format was stated.
        if d.format == Some(DiskFormat::Qcow2) {
            let chain = block::named_backing_files(&d.path)
                .map_err(|e| format!("disk {}: {e}", d.path.display()))?;
            for b in &chain {
                out.push(named(b, Use::Read, format!("disk {i}'s backing file")));
            }
        }
    }
    for (what, backend) in [
        ("the serial port's file", Some(&c.serial)),
        ("the console's file", c.console.as_ref()),
    ] {
        if let Some(CharBackend::File(p)) = backend {
            out.push(named(p, Use::Output, what.into()));
        }
    }
    Ok(out)
}

/// What the sandbox allows for `c`: each of its [`named_files`] (written or only read), and
/// `/dev/net/tun` when it has NICs.
pub fn config_paths(c: &VmConfig) -> Result<Vec<Allowed>, String> {
    let mut out: Vec<Allowed> = named_files(c)?
        .into_iter()
        .map(|n| Allowed {
            path: n.path,
            write: matches!(n.usage, Use::ReadWrite | Use::Output),
        })
        .collect();
    if !c.nets.is_empty() {
        out.push(Allowed::write(TUN));
    }
    // The vsock's socket is made in its directory, and the guest's connections reach sockets
    // beside it.
    if let Some(dir) = c.vsock.as_ref().and_then(|v| v.socket.parent()) {
        let dir = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        out.push(Allowed {
            path: dir.to_path_buf(),
            write: true,
        });
    }
    Ok(out)
}

/// Refuses a configuration that names a path outside the sandbox (none when tern runs
/// without one), with one line naming the path.
pub fn check_config(c: &VmConfig) -> Result<(), VmmError> {
    if !sandbox::landlock::active() {
        return Ok(());
    }
    for a in config_paths(c).map_err(VmmError::Setup)? {
        check(&a.path, a.write).map_err(VmmError::Setup)?;
    }
    Ok(())
}
