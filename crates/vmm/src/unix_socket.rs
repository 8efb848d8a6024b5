//! Listening Unix sockets for the API and for incoming migrations, made so that a client that
//! waits for the socket file to appear can connect at once: the socket is bound and listening
//! under a temporary name in the same directory, then renamed into place (binding at the final
//! path would show the file a moment before `listen`, when connecting is refused). It is 0600
//! from the start. A socket left behind by a process that is gone is replaced; one a live
//! process answers on, or a file that is not a socket, is refused.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Listens on `path`; `what` names the socket in errors ("API socket").
pub fn listen(path: &Path, what: &str) -> Result<UnixListener, String> {
    let show = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!("{what} {show} exists and is not a socket"));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{what} {show} is in use by a running process (another tern?)"
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale {what} {show}: {e}"))?;
    }
    let made = match temporary(path) {
        Some(tmp) => match bind_0600(&tmp) {
            Ok(l) => match std::fs::rename(&tmp, path) {
                Ok(()) => Ok(l),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
            },
            // A temporary name too long for a socket address: bind in place.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => bind_0600(path),
            Err(e) => Err(e),
        },
        None => bind_0600(path),
    };
    let l = made.map_err(|e| format!("cannot create the {what} {show}: {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("{what} {show}: {e}"))?;
    Ok(l)
}

/// A name beside `path` for binding before the rename.
fn temporary(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_string_lossy();
    Some(path.with_file_name(format!(".{name}.{}.tmp", std::process::id())))
}

fn bind_0600(path: &Path) -> std::io::Result<UnixListener> {
    // SAFETY: umask only changes this process's file-creation mask; restored right after.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_live_socket_is_refused_a_stale_one_replaced_and_the_new_one_is_private() {
        let dir = std::env::temp_dir().join(format!("tern-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("api.sock");
        let live = UnixListener::bind(&p).unwrap();
        let e = listen(&p, "API socket").unwrap_err();
        assert!(
            e.contains("API socket") && e.contains("in use by a running process"),
            "{e}"
        );
        drop(live); // leaves the file behind, like a killed tern
        let l = listen(&p, "API socket").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Listening as soon as the file is there, and nothing else left in the directory.
        UnixStream::connect(&p).unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("api.sock")]);
        drop(l);
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"not a socket").unwrap();
        assert!(listen(&p, "API socket")
            .unwrap_err()
            .contains("is not a socket"));
        assert_eq!(std::fs::read(&p).unwrap(), b"not a socket");
        std::fs::remove_dir_all(&dir).ok();
    }
}
