//! tern as a systemd service: readiness and status through the notification socket
//! (`Type=notify`), and log lines the journal files under their own priority.
//!
//! **Notifications.** When systemd starts tern with `NOTIFY_SOCKET` set, [`init`] connects a
//! datagram socket to it before any sandbox closes, and every later message is one `write` on
//! that socket: `READY=1` once the VM runs (or, for a tern waiting for a VM through the API or
//! a migration, once it waits), `STATUS=` lines as the VM is paused, resumed or migrated, and
//! `STOPPING=1` when the VM has ended. Without `NOTIFY_SOCKET` every call does nothing. The
//! address is a path or, starting with `@`, a name in the abstract namespace.
//!
//! Written here rather than taken from the `sd-notify` crate: that crate makes a new socket
//! for every message, which the seccomp filters of tern's threads refuse once the VM runs
//! (and Landlock may refuse the path); connecting once at start and writing later needs only
//! the `write` every thread may make.
//!
//! **Journal.** systemd connects a service's standard error to the journal and says so in
//! `JOURNAL_STREAM` (the stream's device and inode). When standard error is that stream,
//! [`stderr_is_journal`] is true and tern starts each line with its syslog priority (`<3>`
//! error, `<4>` warning, `<5>` notice, `<6>` info, `<7>` debug), which the journal strips and
//! keeps as the line's priority: `journalctl -p warning -u tern@vm1` shows tern's warnings
//! and errors only. [`report!`](crate::report) writes such a line.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;

/// Syslog priority of an error.
pub const ERR: u8 = 3;
/// Syslog priority of a warning.
pub const WARNING: u8 = 4;
/// Syslog priority of a notice: normal but significant (how the VM ended).
pub const NOTICE: u8 = 5;
/// Syslog priority of an informational line.
pub const INFO: u8 = 6;
/// Syslog priority of a debug line.
pub const DEBUG: u8 = 7;

static SOCKET: OnceLock<Option<UnixDatagram>> = OnceLock::new();
static JOURNAL: OnceLock<bool> = OnceLock::new();
static REDIRECTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Standard error was pointed elsewhere (a Firecracker logger's file): no journal prefixes
/// from now on.
pub fn stderr_redirected() {
    REDIRECTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Connects to the notification socket `NOTIFY_SOCKET` names, if it names one; call before
/// any thread starts and any sandbox closes. The variable is removed from the environment,
/// so that no process tern starts takes the messages for its own.
pub fn init() -> Result<(), String> {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET").filter(|a| !a.is_empty()) else {
        let _ = SOCKET.set(None);
        return Ok(());
    };
    // Called before tern starts any thread (see above), so nothing reads the environment at
    // the same time.
    std::env::remove_var("NOTIFY_SOCKET");
    let socket = connect(&addr.to_string_lossy())
        .map_err(|e| format!("NOTIFY_SOCKET {}: {e}", addr.to_string_lossy()))?;
    let _ = SOCKET.set(Some(socket));
    Ok(())
}

fn connect(addr: &str) -> std::io::Result<UnixDatagram> {
    let socket = UnixDatagram::unbound()?;
    // A full queue on systemd's side drops the message rather than stalling the VMM.
    socket.set_nonblocking(true)?;
    if let Some(name) = addr.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        socket.connect_addr(&a)?;
    } else if addr.starts_with('/') {
        socket.connect(addr)?;
    } else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a socket path or an @abstract name (tern does not speak vsock: notifications)",
        ));
    }
    Ok(socket)
}

/// Sends `fields` (`KEY=value` lines) to systemd, if it listens. A message systemd does not
/// take is dropped: the VM never waits for it.
pub fn notify(fields: &[&str]) {
    let Some(Some(socket)) = SOCKET.get() else {
        return;
    };
    let mut msg = fields.join("\n");
    msg.push('\n');
    if let Err(e) = send(socket, msg.as_bytes()) {
        tracing::debug!("systemd notification not sent: {e}");
    }
}

/// Sends `msg` as one datagram with a plain `write`, which every thread's seccomp filter
/// allows (unlike `sendto`); a connected datagram socket sends it whole or not at all.
fn send(socket: &UnixDatagram, msg: &[u8]) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: `socket` stays open while the borrowed `File` lives, and the `File` is never
    // dropped (`ManuallyDrop`), so it never closes the descriptor.
    let file =
        std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(socket.as_raw_fd()) });
    match (&*file).write(msg)? {
        n if n == msg.len() => Ok(()),
        n => Err(std::io::Error::other(format!(
            "sent {n} of {} bytes",
            msg.len()
        ))),
    }
}

/// tern is ready: the VM runs, or tern waits for one. `status` says which.
pub fn ready(status: &str) {
    notify(&["READY=1", &format!("STATUS={status}")]);
}

/// A new status line (`systemctl status` shows it).
pub fn status(status: &str) {
    notify(&[&format!("STATUS={status}")]);
}

/// tern is stopping; `status` says why.
pub fn stopping(status: &str) {
    notify(&["STOPPING=1", &format!("STATUS={status}")]);
}

/// Whether standard error is the journal's stream (`JOURNAL_STREAM` names its device and
/// inode).
pub fn stderr_is_journal() -> bool {
    if REDIRECTED.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    *JOURNAL.get_or_init(|| {
        let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
            return false;
        };
        let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
            return false;
        };
        let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
            return false;
        };
        use std::os::unix::fs::MetadataExt;
        let stderr = std::io::stderr();
        let fd = std::os::fd::AsFd::as_fd(&stderr);
        match fd.try_clone_to_owned().map(std::fs::File::from) {
            Ok(f) => f.metadata().is_ok_and(|m| m.dev() == dev && m.ino() == ino),
            Err(_) => false,
        }
    })
}

/// The prefix of a line of priority `priority` on standard error: `<N>` for the journal,
/// nothing elsewhere.
pub fn prefix(priority: u8) -> &'static str {
    if !stderr_is_journal() {
        return "";
    }
    match priority {
        0 => "<0>",
        1 => "<1>",
        2 => "<2>",
        3 => "<3>",
        4 => "<4>",
        5 => "<5>",
        6 => "<6>",
        _ => "<7>",
    }
}

/// `eprintln!` with a syslog priority ([`ERR`], [`WARNING`], [`NOTICE`]…) that the journal
/// keeps when standard error is the journal.
#[macro_export]
macro_rules! report {
    ($priority:expr, $($arg:tt)*) => {
        eprintln!("{}{}", $crate::systemd::prefix($priority), format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        let dir = std::env::temp_dir().join(format!("tern-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let s = connect(path.to_str().unwrap()).unwrap();
        send(&s, b"READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("tern-notify-test-{}", std::process::id());
        let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&a).unwrap();
        let s = connect(&format!("@{name}")).unwrap();
        send(&s, b"STATUS=x\n").unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=x\n");

        assert!(connect("vsock:2:1234").is_err());
        assert!(connect("relative").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
