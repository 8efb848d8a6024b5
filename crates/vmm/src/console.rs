//! The host side of the guest's character devices: where their output goes, and terminal
//! input forwarded to the guest.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifecycle::threads::{spawn, Role};
use vmm_sys_util::eventfd::EventFd;

use devices::serial::SerialDevice;

use crate::config::CharBackend;
use crate::error::VmmError;

/// Where a character device's output goes: stdout, a file opened for appending, or nowhere.
/// A file tern creates is readable by its owner only (mode 0600: guest output may hold
/// secrets); an existing file keeps its mode.
pub fn open_char_sink(
    backend: &CharBackend,
    what: &'static str,
) -> Result<Option<Box<dyn std::io::Write + Send>>, VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    Ok(match backend {
        CharBackend::Stdio => Some(Box::new(std::io::stdout())),
        CharBackend::File(p) => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(p)
                .map_err(|err| VmmError::File {
                    what,
                    path: p.display().to_string(),
                    err,
                })?,
        )),
        CharBackend::None => None,
    })
}

/// Where terminal input goes: the serial port, or the virtio-console when it owns stdio.
pub enum StdinTarget {
    /// COM1.
    Serial(Arc<Mutex<SerialDevice>>),
    /// The virtio-console.
    Console(virtio::devices::ConsoleInput),
}

/// Forwards stdin to `target` (the current VM's serial port or console) on a thread of its
/// own. Ctrl-A x quits tern (as in QEMU, by writing `quit`); Ctrl-A Ctrl-A sends a literal
/// Ctrl-A.
pub fn spawn_stdin_thread(target: Arc<Mutex<Option<StdinTarget>>>, quit: EventFd) {
    let _ = spawn(Role::Io, "tern-stdin", move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 256];
        let mut escape = false;
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut out = Vec::with_capacity(n);
            for &b in &buf[..n] {
                if escape {
                    escape = false;
                    match b {
                        b'x' | b'X' => {
                            let _ = quit.write(1);
                            return;
                        }
                        0x01 => out.push(0x01),
                        _ => out.push(b),
                    }
                } else if b == 0x01 {
                    escape = true;
                } else {
                    out.push(b);
                }
            }
            let mut pending = &out[..];
            while !pending.is_empty() {
                let taken = match &*target.lock().unwrap_or_else(|p| p.into_inner()) {
                    Some(StdinTarget::Serial(d)) => {
                        d.lock().unwrap_or_else(|p| p.into_inner()).enqueue(pending)
                    }
                    Some(StdinTarget::Console(c)) => c.push(pending),
                    None => pending.len(),
                };
                pending = &pending[taken..];
                if taken == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    });
}
