//! What a destination lets a migrating VM use of its host. The source describes the VM,
//! including the host files and TAPs it used there; a destination that opened them as named
//! would let whoever connects to it choose this host's files (a disk image `/etc/shadow`, a
//! serial log appended to a system file). So a file the source names is used only inside a
//! directory the destination's operator accepted (`--accept-dir`), and a TAP only when its name
//! was accepted (`--accept-tap`); anything the destination names itself (`--disk-remap`,
//! `--tap-remap`, `--serial`, `--console`) needs no acceptance.
//!
//! Paths are resolved (symlinks followed) before they are compared, so a link inside an
//! accepted directory pointing outside it is refused. A file could still be swapped for a link
//! between this check and its opening by someone who can write the accepted directory; under
//! `--landlock` the accepted directories are the only ones tern reaches, which closes that.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use crate::config::{CharBackend, DiskFormat};
use crate::VmConfig;

use super::ReceiveOptions;

/// Checks that everything `config` (the source's VM with this host's remaps applied) would
/// open on this host is either named here or accepted by `opts`. The error names the first
/// file or TAP refused and the flag that would accept it.
pub fn check(config: &VmConfig, opts: &ReceiveOptions) -> Result<(), String> {
    let dirs: Vec<PathBuf> = opts
        .accept_dirs
        .iter()
        .map(|d| {
            d.canonicalize()
                .map_err(|e| format!("accepted directory {}: {e}", d.display()))
        })
        .collect::<Result<_, _>>()?;
    let ours: BTreeSet<&Path> = opts.disk_remap.values().map(PathBuf::as_path).collect();
    let file = |what: &str, p: &Path| -> Result<(), String> {
        let at = resolve(p).map_err(|e| format!("the source names {what} {}: {e}", p.display()))?;
        if dirs.iter().any(|d| at.starts_with(d)) {
            return Ok(());
        }
        Err(format!(
            "the source names {what} {}, outside the directories this host accepts ({}): \
             accept its directory with --accept-dir DIR (\"accept_dirs\" in the API), or name \
             another file here",
            p.display(),
            listing(&opts.accept_dirs)
        ))
    };
    for (what, p) in [
        ("the kernel", &config.kernel),
        ("the initrd", &config.initrd),
    ] {
        if let Some(p) = p {
            file(what, p)?;
        }
    }
    // A firmware image the source names by path is mapped into the guest: accepted like a
    // kernel. `bios` is this host's own SeaBIOS.
    if let Some(api::firmware::Firmware::Path(p)) = &config.firmware {
        file("the firmware", p)?;
    }
    // The source's UEFI variable file would be written here.
    if let Some(p) = &config.uefi_vars {
        file("the UEFI variable file", p)?;
    }
    for (i, d) in config.disks.iter().enumerate() {
        if !ours.contains(d.path.as_path()) {
            file(&format!("disk {i}"), &d.path)?;
            // A qcow2 image the source chose may name backing files anywhere.
            if d.format == Some(DiskFormat::Qcow2) {
                let chain = block::named_backing_files(&d.path)
                    .map_err(|e| format!("disk {i} ({}): {e}", d.path.display()))?;
                for b in &chain {
                    file(&format!("disk {i}'s backing file"), b)?;
                }
            }
        }
        if let Some(f) = &d.data_file {
            file(&format!("disk {i}'s data file"), f)?;
        }
    }
    for (what, mine, theirs) in [
        (
            "the serial port's file",
            opts.serial.is_some(),
            Some(&config.serial),
        ),
        (
            "the console's file",
            opts.console.is_some(),
            config.console.as_ref(),
        ),
    ] {
        if let (false, Some(CharBackend::File(p))) = (mine, theirs) {
            file(what, p)?;
        }
    }
    // The source's vsock socket would be made here, and guest connections would reach the
    // sockets beside it: its directory must be accepted, or --vsock-socket name another.
    if let (None, Some(v)) = (&opts.vsock_socket, &config.vsock) {
        let dir = v
            .socket
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .ok_or_else(|| format!("the source names vsock socket {}", v.socket.display()))?;
        file("the vsock socket's directory", dir).map_err(|e| {
            format!("{e}; or put the vsock on a socket of this host's with --vsock-socket PATH")
        })?;
    }
    let remapped: BTreeSet<&str> = opts.tap_remap.values().map(String::as_str).collect();
    for n in &config.nets {
        if !remapped.contains(n.tap.as_str())
            && !opts.accept_taps.iter().any(|a| tap_matches(a, &n.tap))
        {
            return Err(format!(
                "the source names TAP {}, which this host does not accept: give --tap-remap \
                 {}=TAP, or accept it with --accept-tap NAME (\"accept_taps\" in the API)",
                n.tap, n.tap
            ));
        }
    }
    Ok(())
}

/// Whether `pattern` (a name, or a prefix ending in `*`) accepts TAP `name`.
fn tap_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// `p` with its symlinks resolved, as far as it exists (a serial log may not exist yet): the
/// longest existing ancestor canonicalized, the rest appended. Relative paths and `..` are
/// refused, since where they lead depends on more than the path.
fn resolve(p: &Path) -> Result<PathBuf, String> {
    if !p.is_absolute() {
        return Err("not an absolute path".into());
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err("the path has a '..' component".into());
    }
    let mut rest = Vec::new();
    let mut at = p;
    loop {
        match at.canonicalize() {
            Ok(mut base) => {
                for c in rest.iter().rev() {
                    base.push(c);
                }
                return Ok(base);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (at.parent(), at.file_name()) else {
                    return Err(e.to_string());
                };
                rest.push(name.to_os_string());
                at = parent;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn listing(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        "none".into()
    } else {
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, NetConfig};

    fn opts(dirs: &[&Path]) -> ReceiveOptions {
        ReceiveOptions {
            url: super::super::MigrationUrl::Unix("/x".into()),
            disk_remap: Default::default(),
            tap_remap: Default::default(),
            serial: None,
            console: None,
            vsock_socket: None,
            accept_dirs: dirs.iter().map(|d| d.to_path_buf()).collect(),
            accept_taps: Vec::new(),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tern-accept-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.canonicalize().unwrap()
    }

    fn disk(p: &Path) -> DiskConfig {
        serde_json::from_value(serde_json::json!({ "path": p })).unwrap()
    }

    #[test]
    fn the_source_names_a_vsock_socket_only_in_an_accepted_directory() {
        let ok = scratch("vsock");
        let mut c = VmConfig {
            kernel: Some(ok.join("vmlinux")),
            ..VmConfig::default()
        };
        c.vsock = Some(api::config::VsockConfig {
            cid: 3,
            socket: PathBuf::from("/run/elsewhere/v.sock"),
        });
        let e = check(&c, &opts(&[&ok])).unwrap_err();
        assert!(
            e.contains("the vsock socket's directory /run/elsewhere")
                && e.contains("--vsock-socket"),
            "{e}"
        );
        // Its directory accepted, or another socket named here.
        c.vsock.as_mut().unwrap().socket = ok.join("v.sock");
        check(&c, &opts(&[&ok])).unwrap();
        c.vsock.as_mut().unwrap().socket = PathBuf::from("/run/elsewhere/v.sock");
        let mine = ReceiveOptions {
            vsock_socket: Some(ok.join("mine.sock")),
            ..opts(&[&ok])
        };
        check(&c, &mine).unwrap();
    }

    #[test]
    fn files_the_source_names_are_used_only_in_accepted_directories() {
        let ok = scratch("ok");
        let img = ok.join("vm.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let mut c = VmConfig {
            kernel: Some(ok.join("vmlinux")),
            ..VmConfig::default()
        };
        c.disks.push(disk(&img));
        c.serial = CharBackend::File(ok.join("logs/serial.log"));
        check(&c, &opts(&[&ok])).unwrap();

        // Nothing accepted: the first file is refused, by name, with the flag that helps.
        let e = check(&c, &opts(&[])).unwrap_err();
        assert!(
            e.contains("the kernel") && e.contains("--accept-dir"),
            "{e}"
        );

        // A host file as a disk, directly or through a link in an accepted directory.
        for bad in [PathBuf::from("/etc/shadow"), ok.join("link")] {
            let _ = std::os::unix::fs::symlink("/etc/shadow", ok.join("link"));
            let mut c2 = c.clone();
            c2.disks[0].path = bad.clone();
            let e = check(&c2, &opts(&[&ok])).unwrap_err();
            assert!(e.contains("disk 0") && e.contains("outside"), "{e}");
        }
        // '..' out of an accepted directory.
        let mut c3 = c.clone();
        c3.serial = CharBackend::File(ok.join("../../etc/passwd"));
        let e = check(&c3, &opts(&[&ok])).unwrap_err();
        assert!(e.contains("'..'"), "{e}");
        // The destination's own serial file and disk need no acceptance.
        let mut o = opts(&[]);
        o.serial = Some(CharBackend::None);
        o.disk_remap.insert("/old.img".into(), img.clone());
        let mut c4 = c.clone();
        c4.kernel = None;
        c4.serial = CharBackend::File("/etc/passwd".into());
        check(&c4, &o).unwrap();
        // A firmware image by path is a host file the guest would read; `bios` is this host's.
        let mut c5 = c4.clone();
        c5.firmware = Some(api::firmware::Firmware::Path("/etc/shadow".into()));
        let e = check(&c5, &o).unwrap_err();
        assert!(e.contains("the firmware") && e.contains("outside"), "{e}");
        c5.firmware = Some(api::firmware::Firmware::Bios);
        check(&c5, &o).unwrap();
        let _ = std::fs::remove_dir_all(&ok);
    }

    #[test]
    fn taps_the_source_names_need_acceptance_or_a_remap() {
        let mut c = VmConfig::default();
        let net: NetConfig = serde_json::from_value(serde_json::json!({"tap": "vm-a"})).unwrap();
        c.nets.push(net);
        let e = check(&c, &opts(&[])).unwrap_err();
        assert!(e.contains("TAP vm-a") && e.contains("--accept-tap"), "{e}");
        let mut o = opts(&[]);
        o.accept_taps = vec!["vm-*".into()];
        check(&c, &o).unwrap();
        o.accept_taps = vec!["vm-b".into()];
        assert!(check(&c, &o).is_err());
        // Remapped here: the name is this host's choice.
        let mut moved = c.clone();
        moved.nets[0].tap = "tap9".into();
        let mut o = opts(&[]);
        o.tap_remap.insert("vm-a".into(), "tap9".into());
        check(&moved, &o).unwrap();
    }
}
